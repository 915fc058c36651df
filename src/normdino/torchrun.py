"""Joining a torchrun job and sharing the inputs among its ranks, without importing torch outside a job.

A plain run (one process) never imports :mod:`normdino.distributed` (and torch) through this module: every
helper answers "one process, all the inputs". Under ``torchrun`` :func:`join_job` initialises the process group
(:func:`normdino.distributed.init_from_env`), and :func:`my_share` hands each rank its contiguous share of the
one input list a single process reads (the images, then the volumes), in rank order, so that gathering in rank
order gives back the one-process order.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import TypeVar

from normdino.errors import InputError, NormdinoError

DISTRIBUTED_COMMANDS = ("fit", "predict", "evaluate")
"""The workflows that run under torchrun; the others refuse a job of more than one process."""

T = TypeVar("T")


def in_process_group() -> bool:
    """True inside a torchrun job's process group (normdino.distributed is imported only there)."""
    dist = sys.modules.get("normdino.distributed")
    return bool(dist is not None and dist.is_distributed())


def is_main_rank() -> bool:
    """True on the process that logs and writes files: rank 0 of a job, or the only process."""
    return not in_process_group() or sys.modules["normdino.distributed"].is_main()


def world_size() -> int:
    """Processes in the job (1 outside torchrun)."""
    return sys.modules["normdino.distributed"].world_size() if in_process_group() else 1


def my_share(inputs: T, allow_empty: bool = False) -> T:
    """This rank's contiguous share of the inputs (all of them outside a job), see :func:`share_of`.

    ``inputs`` is a :class:`normdino.io.inputs.Inputs`. Unless ``allow_empty``, a job with more processes than
    inputs is refused (a rank with nothing to fit on would stall the collectives).
    """
    if not in_process_group():
        return inputs
    from normdino import distributed as dist

    n = len(inputs.images) + len(inputs.volumes)
    if not allow_empty and n < dist.world_size():
        raise InputError(f"{n} inputs cannot be shared by {dist.world_size()} processes; start at most that many")
    return share_of(inputs, *dist.shard_range(n))


def share_of(inputs: T, start: int, stop: int) -> T:
    """The inputs at positions [start, stop) of the one list a single process reads: the images, then the volumes.

    Images and volumes are not shared out as two lists: rank-order concatenation of such shares would interleave
    them (images of rank 0, its volumes, images of rank 1, ...) and a model fitted on a mix would differ from the
    one-process model (another memory bank order, another seeded one-shot pick).
    """
    n_images = len(inputs.images)
    return dataclasses.replace(inputs, images=list(inputs.images[start:stop]),
                               volumes=list(inputs.volumes[max(start - n_images, 0):max(stop - n_images, 0)]))


def join_job(command: str, device: str | None) -> tuple[bool, str | None]:
    """Under torchrun: join the job for ``command``, each rank on its own GPU.

    Returns (joined, device): ``joined`` is True when this call created the process group (the caller leaves it
    with :func:`normdino.distributed.shutdown` at the end); ``device`` is this rank's device (``cuda:LOCAL_RANK``
    for CUDA), or the given one unchanged (None stays None). A command that cannot run under torchrun is refused.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if command not in DISTRIBUTED_COMMANDS and world > 1:
        raise NormdinoError(f"normdino {command} does not run under torchrun yet (only "
                            f"{', '.join(DISTRIBUTED_COMMANDS)} does); run it as one process: python -m normdino {command} ...")
    joined = False
    if command in DISTRIBUTED_COMMANDS and world > 1:
        from normdino import distributed as dist

        if not dist.is_distributed():
            rank_device = dist.init_from_env(device or "cpu")
            device = rank_device if device is not None else None
            joined = dist.is_distributed()
    return joined, device
