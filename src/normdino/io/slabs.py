"""Volumes a slab at a time: bounded-memory reading and transposing of 3D arrays.

A slab is a run of consecutive planes along the third array axis, at most :data:`SLAB_BYTES` large.
Slicing a volume along another axis goes through :class:`SliceStore`, a slice-major copy in a temp
file (page cache and disk, not process memory).
"""

from __future__ import annotations

import tempfile
from typing import Any, Iterable, Iterator

import numpy as np

SLAB_BYTES = 32 * 2**20


def runs(indices: Iterable[int], max_len: int) -> Iterator[tuple[int, int]]:
    """Group sorted indices into [start, stop) runs of consecutive values, each at most ``max_len`` long."""
    start = stop = None
    for k in indices:
        if start is not None and k == stop and stop - start < max_len:
            stop += 1
            continue
        if start is not None:
            yield start, stop
        start, stop = k, k + 1
    if start is not None:
        yield start, stop


class SliceStore:
    """Slices along axis 0 or 1 of a 3D array, kept slice-major in a temp file, in blocks of the third axis.

    Block b holds planes [b*m, (b+1)*m) as a C-order (n, other, m) array, so one slice is a few
    contiguous reads (one per block) and one block is one read: transposing a volume costs
    temp-file I/O (page cache, not process memory) and one block (<= 32 MB) in memory.
    """

    def __init__(self, n: int, other: int, depth: int, dtype: Any, block: int) -> None:
        self.n, self.other, self.depth, self.block = n, other, depth, max(1, block)
        self.dtype = np.dtype(dtype)
        self._file = tempfile.TemporaryFile(prefix="normdino-volume-")
        self._file.truncate(n * other * depth * self.dtype.itemsize)  # sparse: unwritten slices read as 0

    def _blocks(self) -> Iterator[tuple[int, int, int]]:
        """(first plane, plane count, byte offset) of each block."""
        for first in range(0, self.depth, self.block):
            yield first, min(self.block, self.depth - first), first * self.n * self.other * self.dtype.itemsize

    def write_slice(self, k: int, values: np.ndarray) -> None:
        for first, count, offset in self._blocks():
            self._file.seek(offset + k * self.other * count * self.dtype.itemsize)
            self._file.write(np.ascontiguousarray(values[:, first:first + count], dtype=self.dtype).tobytes())

    def read_slice(self, k: int) -> np.ndarray:
        out = np.empty((self.other, self.depth), dtype=self.dtype)
        for first, count, offset in self._blocks():
            self._file.seek(offset + k * self.other * count * self.dtype.itemsize)
            data = self._file.read(self.other * count * self.dtype.itemsize)
            out[:, first:first + count] = np.frombuffer(data, dtype=self.dtype).reshape(self.other, count)
        return out

    def write_block(self, first: int, values: np.ndarray) -> None:
        """Planes [first, first + values.shape[2]) given slice-major, shape (n, other, count); ``first`` starts a block."""
        self._file.seek(first * self.n * self.other * self.dtype.itemsize)
        self._file.write(np.ascontiguousarray(values, dtype=self.dtype).tobytes())

    def iter_blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first plane, slice-major (n, other, count) array) per block."""
        for first, count, offset in self._blocks():
            self._file.seek(offset)
            data = self._file.read(self.n * self.other * count * self.dtype.itemsize)
            yield first, np.frombuffer(data, dtype=self.dtype).reshape(self.n, self.other, count)

    def close(self) -> None:
        self._file.close()


def planes_per_slab(plane_shape: tuple[int, int], dtype: np.dtype) -> int:
    """How many planes of ``plane_shape`` and ``dtype`` fit in one slab of SLAB_BYTES (at least one)."""
    return max(1, SLAB_BYTES // max(1, plane_shape[0] * plane_shape[1] * np.dtype(dtype).itemsize))
