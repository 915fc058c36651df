"""The batches of one EM epoch over an (N, D) array of tokens, and how they are read from a token store on disk.

Rows are drawn in contiguous blocks of ``block_rows`` rows (the DPMM: one block per image, so a batch is
``batch_images`` whole images, as in the paper): per epoch the blocks are permuted and split into near-equal
batches, and each block is read with one positional read of the store file (several in flight), so a store
larger than memory is read at close to the disk's sequential rate instead of one page fault per row.
``block_rows=1`` draws single rows (a uniform random subset of the rows per batch, gathered from the array).
The rows of a batch always come in file order, so a batch's bytes do not depend on how it was read.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from normdino import distributed as dist
from normdino.errors import InputError

EXACT_SHUFFLE_MAX_ROWS = 1 << 25
"""Under torchrun, up to this many rows in all (32 768 images of 1024 tokens) the global batches are exactly a
one-process fit's (every rank draws the global permutation of blocks, 8 bytes each); above, each rank shuffles its own share."""
READ_THREADS = 4
"""Blocks of a batch read at a time from a store file: a few reads in flight keep a disk busy (measured in
benchmarks/bench_fit_scale.py); the rows read do not depend on it."""


def shard_layout(X: Any) -> tuple[int, int] | None:
    """(first global row of this rank's share, rows on all ranks) for an array X; None for lists of batches."""
    if not isinstance(X, (torch.Tensor, np.ndarray)):
        return None
    counts = dist.all_gather_object(int(X.shape[0]) if X.ndim == 2 else 0)
    if sum(counts) == 0:
        raise InputError("X is empty on every rank (0 rows); pass at least one sample.")
    return sum(counts[: dist.rank()]), sum(counts)


def store_file(X: np.ndarray) -> tuple[str, int] | None:
    """(file, byte offset of X[0] in it) when X is C-contiguous rows of a shared file memory map, else None.

    The offset is where X's first byte lies inside the mapping plus where the mapping starts in the file; it is
    checked by reading X's first row back from the file, so a wrong guess falls back to reading the map. A
    copy-on-write map (mode "c") is not the file's content, and without os.preadv (Windows) there is no reader.
    """
    if not isinstance(X, np.memmap) or X.ndim != 2 or len(X) == 0 or not X.flags.c_contiguous or not X.filename:
        return None
    if X.mode not in ("r", "r+", "w+") or not hasattr(os, "preadv"):
        return None
    mapping: Any = X
    while isinstance(mapping, np.ndarray):
        mapping = mapping.base
    if not isinstance(mapping, mmap.mmap):
        return None
    start = np.frombuffer(mapping, dtype=np.uint8)[:1].ctypes.data
    offset = int(X.offset) - int(X.offset) % mmap.ALLOCATIONGRANULARITY + (X.ctypes.data - start)
    try:
        with open(X.filename, "rb", buffering=0) as f:
            first = os.pread(f.fileno(), X[0].nbytes, offset)
    except OSError:
        return None
    return (str(X.filename), offset) if first == X[0].tobytes() else None


def _read_exactly(fd: int, out: np.ndarray, offset: int) -> None:
    """Fill the contiguous array ``out`` from the file at ``offset`` (positional reads, no shared file position)."""
    view = memoryview(out).cast("B")
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n <= 0:
            raise InputError("the token store file is shorter than its array; it was truncated while the fit read it.")
        view, offset = view[n:], offset + n


class BlockReader:
    """Reads row ranges of X into one array, in the order given: positional reads of a store file when X maps
    one (``threads`` at a time), else slices of X."""

    def __init__(self, X: Any, threads: int = READ_THREADS) -> None:
        self.X = X
        self.threads = max(1, int(threads))
        self.file = store_file(X) if isinstance(X, np.ndarray) else None
        self._fd: int | None = None
        self._pool: ThreadPoolExecutor | None = None

    @contextlib.contextmanager
    def opened(self) -> Iterator["BlockReader"]:
        """Keep the store file open and the reading threads alive over a series of reads (an epoch)."""
        if self.file is None or self._fd is not None:
            yield self
            return
        with open(self.file[0], "rb", buffering=0) as f, ThreadPoolExecutor(self.threads) as pool:
            self._fd, self._pool = f.fileno(), pool
            try:
                yield self
            finally:
                self._fd = self._pool = None

    def read(self, ranges: Sequence[tuple[int, int]]) -> Any:
        X = self.X
        if self.file is None:
            parts = [X[a:b] for a, b in ranges]
            return parts[0] if len(parts) == 1 else (torch.cat(parts) if isinstance(X, torch.Tensor) else np.concatenate(parts))
        row_bytes = X.shape[1] * X.itemsize
        sizes = [b - a for a, b in ranges]
        out = np.empty((sum(sizes), X.shape[1]), dtype=X.dtype)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        with self.opened():
            fd, base = self._fd, self.file[1]
            self._advise(ranges)  # every block asked of the disk at once, then read in order

            def read_one(i: int) -> None:
                _read_exactly(fd, out[starts[i]: starts[i + 1]], base + ranges[i][0] * row_bytes)

            if self.threads == 1 or len(ranges) == 1:
                for i in range(len(ranges)):
                    read_one(i)
            else:
                list(self._pool.map(read_one, range(len(ranges))))
        return out

    def prefetch(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Ask the disk for these rows now (a hint, no wait): the next batch arrives while the EM computes."""
        if self.file is not None and ranges:
            with self.opened():
                self._advise(ranges)

    def _advise(self, ranges: Sequence[tuple[int, int]]) -> None:
        if not hasattr(os, "posix_fadvise"):
            return
        row_bytes = self.X.shape[1] * self.X.itemsize
        for a, b in ranges:
            os.posix_fadvise(self._fd, self.file[1] + a * row_bytes, (b - a) * row_bytes, os.POSIX_FADV_WILLNEED)


class BatchSource:
    """The batches of X per epoch (blocks permuted with a generator, or in order without one), and a uniform
    random sample of its rows (what the mixture initialises from when batches are made of blocks).

    ``shard`` = (first global row, global rows): X is a torchrun rank's contiguous share of a larger array.
    Up to EXACT_SHUFFLE_MAX_ROWS global rows every rank draws the one-process permutation of all blocks and
    keeps its own rows of each batch, so the global batches are exactly those of a one-process fit; above it
    each rank permutes its own blocks into as many batches. Parts may be empty.
    """

    def __init__(self, X: Any, batch_size: int, shard: tuple[int, int] | None = None, block_rows: int = 1,
                 read_threads: int = READ_THREADS) -> None:
        if X.ndim != 2:
            raise InputError(f"X must be a 2-D array of shape (n_samples, n_features), got shape {tuple(X.shape)}.")
        if isinstance(block_rows, bool) or not isinstance(block_rows, (int, np.integer)) or block_rows < 1:
            raise InputError(f"block_rows must be a positive integer, got {block_rows!r}.")
        self.X, self.n = X, int(X.shape[0])
        if self.n == 0 and shard is None:
            raise InputError("X is empty (0 rows); pass at least one sample.")
        self.start, self.n_global = shard if shard is not None else (0, self.n)
        self.exact = shard is not None and self.n_global <= EXACT_SHUFFLE_MAX_ROWS
        self.block_rows = int(block_rows)
        space = self.n_global if self.exact else self.n  # the rows the permutation runs over
        self.offset = self.start if self.exact else 0  # global row of local row 0 in that space
        self.space = space
        self.n_blocks = -(-space // self.block_rows)
        # as many batches on every rank: counted from the global rows (fewer when blocks are larger than batches)
        self.n_batches = max(1, min(-(-self.n_global // int(batch_size)), -(-self.n_global // self.block_rows)))
        self.reader = BlockReader(X, read_threads)

    def _local_ranges(self, blocks: torch.Tensor) -> list[tuple[int, int]]:
        """This rank's row ranges of some blocks (ascending), adjacent ranges merged."""
        ranges: list[tuple[int, int]] = []
        b = self.block_rows
        lo, hi = self.offset, self.offset + self.n
        for k in blocks.tolist():
            a, z = max(k * b, lo), min((k + 1) * b, self.space, hi)
            if a >= z:
                continue
            if ranges and ranges[-1][1] == a - lo:
                ranges[-1] = (ranges[-1][0], z - lo)
            else:
                ranges.append((a - lo, z - lo))
        return ranges

    def __call__(self, g: torch.Generator | None) -> Iterator[Any]:
        X = self.X
        order = torch.randperm(self.n_blocks, generator=g) if g is not None else torch.arange(self.n_blocks)
        parts = torch.tensor_split(order, self.n_batches)
        if self.block_rows > 1:
            with self.reader.opened():  # one open file and one set of reading threads for the epoch
                upcoming = self._local_ranges(torch.sort(parts[0]).values)
                for i in range(len(parts)):
                    ranges = upcoming
                    batch = self.reader.read(ranges) if ranges else X[:0]
                    if i + 1 < len(parts):
                        upcoming = self._local_ranges(torch.sort(parts[i + 1]).values)
                        self.reader.prefetch(upcoming)
                    yield batch
            return
        for part in parts:  # single rows: one gather in file order
            rows = part if g is None else torch.sort(part).values
            if self.exact:
                rows = rows[(rows >= self.start) & (rows < self.start + self.n)] - self.start
            if len(rows) == 0:
                yield X[:0]
            elif g is None:  # contiguous rows: a plain slice, also for memory maps
                yield X[int(rows[0]): int(rows[-1]) + 1]
            else:  # same batches for any X type; sequential reads from a memory map that fits in memory
                yield X[rows] if isinstance(X, torch.Tensor) else X[rows.numpy()]

    def sample(self, rows: int, g: torch.Generator) -> Any:
        """About ``rows`` rows drawn uniformly from all the data (this rank's among them), in file order."""
        if not self.exact and self.n_global > self.n:  # a rank drawing from its own share: its part of the rows
            rows = -(-rows * self.n // self.n_global)
        rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=g)))  # O(rows) memory, not O(N)
        picked = torch.from_numpy(np.sort(rng.choice(self.space, min(rows, self.space), replace=False))) - self.offset
        picked = picked[(picked >= 0) & (picked < self.n)]
        if len(picked) == 0:
            return self.X[:0]
        if self.reader.file is not None:  # positional reads: a gather through the map would map most of the file
            return self.reader.read([(r, r + 1) for r in picked.tolist()])
        return self.X[picked] if isinstance(self.X, torch.Tensor) else self.X[picked.numpy()]


def batch_source(X: Any, batch_size: int, shard: tuple[int, int] | None = None, block_rows: int = 1,
                 read_threads: int = READ_THREADS) -> Callable[[torch.Generator | None], Iterator[Any]]:
    """A function giving, per epoch, the batches of X: a :class:`BatchSource` for arrays; for a sequence of
    batches, its batches in an order permuted per epoch; for another iterable, its batches as they come."""
    if isinstance(X, (torch.Tensor, np.ndarray)):
        return BatchSource(X, batch_size, shard, block_rows, read_threads)
    if isinstance(X, Sequence) and not isinstance(X, (str, bytes)):
        def list_batches(g: torch.Generator | None) -> Iterator[Any]:
            order = torch.randperm(len(X), generator=g).tolist() if g is not None else range(len(X))
            for i in order:
                yield X[i]

        return list_batches
    if isinstance(X, Iterable):
        return lambda g: iter(X)
    raise InputError(f"X must be an array, a tensor or an iterable of batches, got {type(X).__name__}.")


def iter_batches(X: Any, batch_size: int, generator: torch.Generator | None = None, block_rows: int = 1,
                 read_threads: int = READ_THREADS) -> Iterator[Any]:
    """The batches of one epoch over the array X as a one-process ``DirichletProcessMixture.fit`` reads them."""
    return BatchSource(X, int(batch_size), None, block_rows, read_threads)(generator)
