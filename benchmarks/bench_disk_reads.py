"""How fast does this disk serve random reads, by read size, reads in flight and the memory read into?

    python benchmarks/bench_disk_reads.py                      # a 384 MB temp file, 3 rounds
    python benchmarks/bench_disk_reads.py --file STORE.npy --rounds 5

Each case reads about 192 MB at random 4 KB-aligned offsets of the file, its pages evicted first (fsync +
posix_fadvise DONTNEED), and is printed as a ratio to the geometric mean of cold sequential reads of the whole
file (16 MB reads through the page cache) right before and right after it, median over the rounds. Cases: reads
through the page cache (the kernel reads into its own 4 KB pages), and direct reads (O_DIRECT) into a plain
buffer (4 KB pages) or into a 2 MB huge-page buffer (normdino.methods.batches.huge_page_buffer), at 256 KB,
768 KB (one image of ViT-S tokens at 448 px) and 4 MB, with 1, 4 and 16 reads in flight. It says why the EM
reads a store that does not stay cached directly into huge pages (docs/speed.md, "Fitting at scale").
"""

from __future__ import annotations

import argparse
import math
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from normdino.methods.batches import huge_page_buffer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fit_scale import evict  # noqa: E402  (drops a file's pages from the page cache)


def sequential_mb_s(path: Path) -> float:
    evict(path)
    buf = bytearray(16 << 20)
    total, started = 0, time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return total / (time.perf_counter() - started) / 1e6


def plain_buffer(nbytes: int) -> np.ndarray:
    """Page-aligned anonymous memory without huge pages (what O_DIRECT into an ordinary buffer gets)."""
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        mapping.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(mapping, dtype=np.uint8)


def random_mb_s(path: Path, size: int, in_flight: int, memory: str, seed: int, total: int = 192 << 20) -> float:
    """MB/s of ``total`` bytes read at random aligned offsets, ``in_flight`` reads at a time."""
    file_size = path.stat().st_size
    count = max(in_flight, total // size)
    offsets = (np.random.default_rng(seed).integers(0, (file_size - size) // 4096, count) * 4096).tolist()
    direct = memory != "page cache"
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    make = {"huge pages": lambda: huge_page_buffer(-(-size // (2 << 20)) * (2 << 20))[:size],
            "4 KB pages": lambda: plain_buffer(size), "page cache": lambda: np.empty(size, np.uint8)}[memory]
    buffers = [make() for _ in range(in_flight)]
    for b in buffers:
        b[::4096] = 0  # touch every page before timing
    local, handed = threading.local(), iter(buffers)

    def read(offset: int) -> None:
        if not hasattr(local, "buffer"):
            local.buffer = next(handed)
        view, position = memoryview(local.buffer), offset
        while len(view):
            n = os.preadv(fd, [view], position)
            if n <= 0:
                break
            view, position = view[n:], position + n

    evict(path)
    started = time.perf_counter()
    try:
        if in_flight == 1:
            for offset in offsets:
                read(offset)
        else:
            with ThreadPoolExecutor(in_flight) as pool:
                list(pool.map(read, offsets))
    finally:
        os.close(fd)
    return count * size / (time.perf_counter() - started) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", type=Path, default=None, help="file to read (default: a 384 MB temp file)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"start: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    temp = None
    path = args.file
    if path is None:
        temp = tempfile.NamedTemporaryFile(prefix="normdino-disk-", suffix=".bin", delete=False)
        rng = np.random.default_rng(0)
        for _ in range(24):
            temp.write(rng.integers(0, 256, 16 << 20, dtype=np.uint8).tobytes())
        temp.close()
        path = Path(temp.name)
    cases = [(memory, size, n) for memory in ("page cache", "4 KB pages", "huge pages")
             for size in (256 << 10, 768 << 10, 4 << 20) for n in (1, 4, 16)]
    ratios: dict[tuple, list[float]] = {case: [] for case in cases}
    rates: dict[tuple, list[float]] = {case: [] for case in cases}
    sequential: list[float] = []
    try:
        for r in range(args.rounds):
            previous = sequential_mb_s(path)
            sequential.append(previous)
            for case in cases:
                value = random_mb_s(path, case[1], case[2], case[0], seed=r)
                following = sequential_mb_s(path)
                sequential.append(following)
                rates[case].append(value)
                ratios[case].append(value / math.sqrt(previous * following))
                previous = following
    finally:
        if temp is not None:
            os.unlink(temp.name)
    name = path.name if args.file else "temp file"
    print(f"\n{name}: cold sequential reads {statistics.median(sequential):.0f} MB/s median "
          f"({min(sequential):.0f}-{max(sequential):.0f}); random reads, median of {args.rounds} round(s)")
    print("| read into | size | in flight | MB/s | x sequential (cold) | lowest - highest |")
    print("|---|---:|---:|---:|---:|---:|")
    for case in cases:
        memory, size, n = case
        label = memory if memory == "page cache" else f"O_DIRECT, {memory}"
        print(f"| {label} | {size >> 10} KB | {n} | {statistics.median(rates[case]):.0f} | "
              f"{statistics.median(ratios[case]):.2f} | {min(ratios[case]):.2f} - {max(ratios[case]):.2f} |")
    print(f"end: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")


if __name__ == "__main__":
    main()
