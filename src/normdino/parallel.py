"""Threads that keep the model fed: read and preprocess images ahead of it, write outputs behind it
(and, beside a GPU, processes that encode the output files without holding the model's Python lock).

Decoding, resizing and PNG encoding happen in Pillow, NumPy and zlib, which release the GIL, so threads
scale them over the cores without the copies and start-up of worker processes. On a GPU this is what
decides the images/s (the forward takes ~0.5 ms an image, the CPU work around it ~5 ms); on a CPU it
overlaps that work with the forward.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
R = TypeVar("R")

MAX_WORKERS = 8


def default_workers(device: "torch.device | str" = "cpu") -> int:
    """Threads for the CPU work around the model: up to 8 beside a GPU, 1 beside a CPU model (it uses the cores)."""
    if str(device).split(":")[0] == "cpu":
        return 1
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


def default_writer_processes(device: "torch.device | str" = "cpu") -> int:
    """Processes that encode output files beside the model: none beside a CPU model (a thread suffices and the
    cores are the model's), up to 8 beside a GPU, where work holding Python's lock would starve the model's feed."""
    if str(device).split(":")[0] == "cpu":
        return 0
    return max(1, min(MAX_WORKERS, (os.cpu_count() or 2) - 1))


def process_pool(processes: int) -> "ProcessPoolExecutor":
    """A pool of fresh worker processes (forkserver where the platform has it, else spawn; never a fork of a
    process that runs torch's threads) that import only what their functions need."""
    import multiprocessing

    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(max_workers=processes, mp_context=multiprocessing.get_context(method))


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, ahead: int | None = None) -> Iterator[R]:
    """fn(item) for each item, in order, computed by ``workers`` threads at most ``ahead`` items in advance.

    ``workers=0`` runs inline. An exception raised by fn, or by ``items`` itself, surfaces when its turn comes,
    as if the loop were serial; closing the iterator early drops the work not yet started.
    """
    if workers <= 0:
        yield from map(fn, items)
        return
    ahead = max(1, ahead if ahead is not None else 2 * workers)
    pending: deque[Future] = deque()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="normdino")
    source = iter(items)
    try:
        while True:
            try:
                item = next(source)
            except StopIteration:
                break
            except Exception as err:  # the source failed: the results before it come first
                while pending:
                    yield pending.popleft().result()
                raise err
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
