"""The batches of one EM epoch over an (N, D) array of tokens, and how they are read from a token store on disk.

Rows are drawn in contiguous blocks of ``block_rows`` rows (the DPMM: one block per image, so a batch is
``batch_images`` whole images, as in the paper): per epoch the blocks are permuted and split into near-equal
batches, and each block is read with one positional read of the store file (several in flight) instead of one
page fault per row, the next batch read ahead by a thread while the EM computes. A store that fits in half the
available memory is read through the page cache (it stays there for the next epochs); a larger one directly
(O_DIRECT into huge-page buffers): its pages would not survive until the next epoch, and the virtual disk
measured reads random blocks into contiguous memory about as fast as it reads the file in order, into the page
cache's single pages at 0.4-0.8 of that (benchmarks/bench_disk_reads.py, benchmarks/bench_fit_scale.py).
``block_rows=1`` draws single rows (a uniform random subset of the rows per batch, gathered from the array).
The rows of a batch always come in file order, so a batch's bytes do not depend on how it was read.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import queue
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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
DIRECT_ALIGN = 4096
"""File offsets, lengths and memory of direct reads are multiples of this (a page: what O_DIRECT may ask)."""
HUGE_PAGE = 2 << 20
DIRECT_BUFFER_BYTES = HUGE_PAGE
"""Bytes a reading thread moves per direct read (a larger block is read in several)."""
TRUNCATED = "the token store file is shorter than its array; it was truncated while the fit read it."


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


def memory_available() -> int | None:
    """Bytes of memory the kernel can give without swapping (Linux's MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def wants_direct_reads(store_bytes: int, available: int | None) -> bool:
    """Read a store directly (O_DIRECT, past the page cache) when it is larger than half the available memory:
    its pages could not stay cached from one epoch to the next, so caching them buys nothing."""
    return hasattr(os, "O_DIRECT") and available is not None and store_bytes > available // 2


def huge_page_buffer(nbytes: int) -> np.ndarray:
    """``nbytes`` of anonymous memory starting on a 2 MB boundary, advised to use huge pages: a direct read into
    physically contiguous memory is one segment per 2 MB for the disk instead of one per 4 KB page, which the
    virtual disk measured serves ~1.5x faster (benchmarks/bench_disk_reads.py); plain pages where refused."""
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):
            mapping.madvise(mmap.MADV_HUGEPAGE)
    whole = np.frombuffer(mapping, dtype=np.uint8)  # keeps the mapping alive
    skip = -whole.ctypes.data % HUGE_PAGE
    return whole[skip: skip + nbytes]


def _read_exactly(fd: int, out: np.ndarray, offset: int) -> None:
    """Fill the contiguous array ``out`` from the file at ``offset`` (positional reads, no shared file position)."""
    view = memoryview(out).cast("B")
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n <= 0:
            raise InputError(TRUNCATED)
        view, offset = view[n:], offset + n


def _read_direct(fd: int, buffer: np.ndarray, out: np.ndarray, offset: int) -> None:
    """Fill the bytes ``out`` from the file at ``offset`` with direct reads: aligned spans of the file into the
    aligned ``buffer``, then the bytes wanted copied out (rows need not start on an aligned offset)."""
    done = 0
    while done < len(out):
        position = offset + done
        start = position - position % DIRECT_ALIGN
        skip = position - start
        span = min(len(buffer), -(-(skip + len(out) - done) // DIRECT_ALIGN) * DIRECT_ALIGN)
        n = os.preadv(fd, [buffer[:span]], start)
        if n <= skip:
            raise InputError(TRUNCATED)
        take = min(n - skip, len(out) - done)
        out[done: done + take] = buffer[skip: skip + take]
        done += take


class BlockReader:
    """Reads row ranges of X into one array, in the order given: positional reads of a store file when X maps
    one (``threads`` at a time), else slices of X.

    From a file, reads go through the page cache (each read first asks the disk for all its blocks with
    posix_fadvise), or, for a store larger than half the available memory (``direct=None``; True/False force it),
    directly from the disk into huge-page buffers (O_DIRECT). Within an epoch (``opened``) a thread reads the
    next batch ahead into its own array (one batch more in memory), so the EM seldom waits. Either way the rows
    read are the same bytes.
    """

    def __init__(self, X: Any, threads: int = READ_THREADS, direct: bool | None = None) -> None:
        self.X = X
        self.threads = max(1, int(threads))
        self.file = store_file(X) if isinstance(X, np.ndarray) else None
        if direct is None and self.file is not None:
            direct = wants_direct_reads(int(X.nbytes), memory_available())
        self.direct = bool(direct) and self.file is not None and hasattr(os, "O_DIRECT")
        self._fd: int | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._direct_fd: int | None = None  # open while an epoch reads directly
        self._buffers: queue.SimpleQueue | None = None  # one huge-page buffer per reading thread
        self._ahead: ThreadPoolExecutor | None = None
        self._pending: tuple[list[tuple[int, int]], Future] | None = None  # the next batch, being read

    @contextlib.contextmanager
    def opened(self) -> Iterator["BlockReader"]:
        """Keep the store file open and the reading threads alive over a series of reads (an epoch)."""
        if self.file is None or self._fd is not None:
            yield self
            return
        with open(self.file[0], "rb", buffering=0) as f, ThreadPoolExecutor(self.threads) as pool:
            self._fd, self._pool, self._ahead = f.fileno(), pool, ThreadPoolExecutor(1)
            try:
                if self.direct:
                    self._open_direct()
                yield self
            finally:
                if self._ahead is not None:
                    self._ahead.shutdown(wait=True, cancel_futures=True)
                if self._direct_fd is not None:
                    os.close(self._direct_fd)
                self._fd = self._pool = self._direct_fd = self._buffers = self._ahead = self._pending = None

    def _open_direct(self) -> None:
        """Open the file for direct reads; a file system that refuses them leaves the reads to the page cache."""
        try:
            fd = os.open(self.file[0], os.O_RDONLY | os.O_DIRECT)
        except OSError:
            self.direct = False
            return
        buffers: queue.SimpleQueue = queue.SimpleQueue()
        try:
            for _ in range(self.threads):
                buffers.put(huge_page_buffer(DIRECT_BUFFER_BYTES))
            probe = buffers.get_nowait()
            os.preadv(fd, [probe[:DIRECT_ALIGN]], 0)  # an aligned read, which a file system taking O_DIRECT takes
            buffers.put(probe)
        except OSError:
            os.close(fd)
            self.direct = False
            return
        self._direct_fd, self._buffers = fd, buffers

    def read(self, ranges: Sequence[tuple[int, int]]) -> Any:
        X = self.X
        if self.file is None:
            parts = [X[a:b] for a, b in ranges]
            return parts[0] if len(parts) == 1 else (torch.cat(parts) if isinstance(X, torch.Tensor) else np.concatenate(parts))
        with self.opened():
            pending, self._pending = self._pending, None
            if pending is not None:
                if pending[0] == list(ranges):
                    return pending[1].result()
                pending[1].result()  # another batch: done with the buffers before this one takes them
            return self._read_file(ranges)

    def _read_file(self, ranges: Sequence[tuple[int, int]]) -> np.ndarray:
        X = self.X
        row_bytes = X.shape[1] * X.itemsize
        sizes = [b - a for a, b in ranges]
        out = np.empty((sum(sizes), X.shape[1]), dtype=X.dtype)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        fd, base = self._fd, self.file[1]
        if self._direct_fd is not None:
            flat = out.reshape(-1).view(np.uint8)

            def read_one(i: int) -> None:
                buffer = self._buffers.get()
                try:
                    _read_direct(self._direct_fd, buffer, flat[starts[i] * row_bytes: starts[i + 1] * row_bytes],
                                 base + ranges[i][0] * row_bytes)
                finally:
                    self._buffers.put(buffer)
        else:
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
        """Ask for these rows now, no wait, so they arrive while the EM computes: within an epoch a thread reads
        them into their own array (the next ``read`` of the same ranges takes it); else a hint to the disk."""
        if self.file is None or not ranges:
            return
        if self._ahead is not None:
            self._pending = (list(ranges), self._ahead.submit(self._read_file, list(ranges)))
        elif not self.direct:
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
                 read_threads: int = READ_THREADS, direct: bool | None = None) -> None:
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
        self.reader = BlockReader(X, read_threads, direct)

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
                 read_threads: int = READ_THREADS,
                 direct: bool | None = None) -> Callable[[torch.Generator | None], Iterator[Any]]:
    """A function giving, per epoch, the batches of X: a :class:`BatchSource` for arrays; for a sequence of
    batches, its batches in an order permuted per epoch; for another iterable, its batches as they come."""
    if isinstance(X, (torch.Tensor, np.ndarray)):
        return BatchSource(X, batch_size, shard, block_rows, read_threads, direct)
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
                 read_threads: int = READ_THREADS, direct: bool | None = None) -> Iterator[Any]:
    """The batches of one epoch over the array X as a one-process ``DirichletProcessMixture.fit`` reads them
    (``direct``: see :class:`BlockReader`)."""
    return BatchSource(X, int(batch_size), None, block_rows, read_threads, direct)(generator)
