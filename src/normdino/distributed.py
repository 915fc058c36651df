"""Scale-out through ``torch.distributed`` launched by ``torchrun``: small helpers that are identities without it.

Without a process group (a plain ``python -m normdino`` run) every helper returns its input: one rank of
one, nothing sent. Under ``torchrun`` :func:`init_from_env` joins the job (gloo on CPU, NCCL on CUDA) and
the helpers run the collectives. Work is split in **contiguous** shards in rank order (:func:`shard_range`),
so concatenating the ranks' results in rank order (:func:`gather_rows`) gives back the input order.

Faults: a Python error inside :func:`failing_together` on any rank becomes the same :class:`DistributedError`
on every rank, naming the rank and its message; the CLI prints it on rank 0 only. A rank that dies (killed,
out of memory) breaks the others' next collective (gloo and NCCL see the closed connection; torchrun also
stops the remaining workers); :func:`failing_together` turns that into one DistributedError too. Files are
written by rank 0 only after the last collective, so a failed job leaves no model file.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from normdino.errors import NormdinoError

if TYPE_CHECKING:
    from normdino.features.tokens import TokenSet

logger = logging.getLogger(__name__)

T = TypeVar("T")
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT_VARIABLE = "NORMDINO_DIST_TIMEOUT"
"""Seconds a collective may wait for the other ranks before the job ends (default 1800)."""
_DEFAULT_TIMEOUT_S = 1800.0


class DistributedError(NormdinoError, RuntimeError):
    """A rank of a torchrun job failed; every rank raises this with the same message."""


class PeerFailedError(DistributedError):
    """Raised on the ranks that did NOT fail when a collective learns that another rank did."""


# ---------------------------------------------------------------------- who am I


_ALONE = [0]  # depth of local_only() blocks: inside one, this process acts as a plain run


def is_distributed() -> bool:
    """True inside an initialised process group (torchrun), False in a plain run or inside :func:`local_only`."""
    return bool(not _ALONE[0] and torch.distributed.is_available() and torch.distributed.is_initialized())


@contextlib.contextmanager
def local_only() -> Iterator[None]:
    """Work done by one rank alone (e.g. a fit on rank 0): every helper is an identity inside, so code that
    would otherwise start a collective (the DPMM's EM inside another method) cannot wait for absent ranks."""
    _ALONE[0] += 1
    try:
        yield
    finally:
        _ALONE[0] -= 1


def rank() -> int:
    """This process's rank (0 in a plain run)."""
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    """How many processes share the job (1 in a plain run)."""
    return torch.distributed.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on the rank that logs progress and writes files (rank 0, or the only process)."""
    return rank() == 0


def launched_by_torchrun(environ: dict[str, str] | None = None) -> bool:
    """True when torchrun's environment variables describe a job of more than one process."""
    env = os.environ if environ is None else environ
    return all(key in env for key in TORCHRUN_VARIABLES) and int(env["WORLD_SIZE"]) > 1


def backend_for(device: str | torch.device) -> str:
    """The collective backend for a device: NCCL for CUDA, gloo for everything else."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_from_env(device: str | torch.device = "cpu") -> str:
    """Join the torchrun job if there is one and return the device this rank should use.

    CUDA devices become ``cuda:LOCAL_RANK`` (one GPU per process); CPU stays CPU. Without torchrun's
    variables (or with WORLD_SIZE 1) nothing is initialised and ``device`` is returned unchanged.
    """
    device = str(device)
    if is_distributed() or not launched_by_torchrun():
        return device
    if torch.device(device).type == "cuda":
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(torch.device(device))
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_VARIABLE, _DEFAULT_TIMEOUT_S)))
    torch.distributed.init_process_group(backend_for(device), timeout=timeout)
    logger.info("rank %d of %d joined (%s, %s)", rank(), world_size(), backend_for(device), device)
    return device


def shutdown() -> None:
    """Leave the process group (no-op without one)."""
    if is_distributed():
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------- sharding


def shard_range(n: int, ranks: int | None = None, index: int | None = None) -> tuple[int, int]:
    """(start, stop) of this rank's contiguous share of n items; shares differ in size by at most one.

    Contiguous (not strided) so every rank's share is one run of the input and rank-order concatenation
    restores the input order; the first ``n % ranks`` ranks get one item more.
    """
    ranks = world_size() if ranks is None else ranks
    index = rank() if index is None else index
    base, extra = divmod(int(n), int(ranks))
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def shard(items: Sequence[T], ranks: int | None = None, index: int | None = None) -> Sequence[T]:
    """This rank's contiguous share of ``items`` (all of them in a plain run)."""
    start, stop = shard_range(len(items), ranks, index)
    return items[start:stop]


# ---------------------------------------------------------------------- collectives (identities without a group)


def _device_for_backend() -> torch.device:
    """Where collective buffers must live: the current CUDA device for NCCL, else CPU."""
    if is_distributed() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place, and return it (unchanged in a plain run)."""
    if not is_distributed():
        return tensor
    buffer = tensor.to(_device_for_backend())
    torch.distributed.all_reduce(buffer, op=torch.distributed.ReduceOp.SUM)
    if buffer is not tensor:
        tensor.copy_(buffer)
    return tensor


def global_sum(value: float) -> float:
    """A float summed over all ranks in float64."""
    return float(all_reduce_sum(torch.tensor([float(value)], dtype=torch.float64))[0])


def global_mean(local_sum: float, local_count: int) -> float:
    """(Σ_ranks local_sum) / (Σ_ranks local_count) in float64, e.g. a validation log-likelihood over all shards."""
    totals = all_reduce_sum(torch.tensor([float(local_sum), float(local_count)], dtype=torch.float64))
    return float(totals[0] / totals[1]) if float(totals[1]) > 0 else float("nan")


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` on every rank with rank ``src``'s (in place; shapes and dtypes must already agree)."""
    if not is_distributed():
        return tensor
    buffer = tensor.to(_device_for_backend())
    torch.distributed.broadcast(buffer, src=src)
    if buffer is not tensor:
        tensor.copy_(buffer)
    return tensor


def broadcast_tensors(tensors: dict[str, torch.Tensor] | None, src: int = 0) -> dict[str, torch.Tensor]:
    """Rank ``src``'s dict of tensors on every rank (other ranks may pass None): e.g. a method's state_dict."""
    if not is_distributed():
        return dict(tensors or {})
    spec = broadcast_object(None if tensors is None else {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}, src)
    out = {}
    for key, (shape, dtype) in spec.items():
        buffer = tensors[key].detach().cpu().contiguous().clone() if rank() == src else torch.empty(shape, dtype=dtype)
        out[key] = broadcast(buffer, src)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable object on every rank (small things only: settings, shapes, messages)."""
    if not is_distributed():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src, device=_device_for_backend())
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable object, in rank order (``[obj]`` in a plain run). Small things only."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def gather_rows(array: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Rows of every rank's array concatenated in rank order (row counts may differ; other axes must agree).

    The same type comes back (numpy or CPU torch). With contiguous shards this restores the input order.
    Every rank receives the whole result: use it for what all ranks need (a memory bank, healthy scores).
    """
    if not is_distributed():
        return array
    is_numpy = isinstance(array, np.ndarray)
    local = torch.from_numpy(np.ascontiguousarray(array)) if is_numpy else array.detach().contiguous()
    counts = all_gather_object((int(local.shape[0]), tuple(local.shape[1:]), local.dtype))
    tails = {c[1] for c in counts}
    if len(tails) != 1 or len({c[2] for c in counts}) != 1:
        raise DistributedError(f"ranks hold arrays of different row shapes or dtypes ({[c[1:] for c in counts]}); they cannot be gathered.")
    rows = [c[0] for c in counts]
    device = _device_for_backend()
    raw = local.to(device)
    if raw.dtype == torch.bool:  # gloo cannot reduce or gather bool on every version: move bytes
        raw = raw.to(torch.uint8)
    padded = raw.new_zeros((max(rows), *raw.shape[1:]))
    padded[: raw.shape[0]] = raw
    parts = [torch.empty_like(padded) for _ in rows]
    torch.distributed.all_gather(parts, padded)
    out = torch.cat([p[:n] for p, n in zip(parts, rows)]).cpu()
    if local.dtype == torch.bool:
        out = out.bool()
    return out.numpy() if is_numpy else out


def gather_token_set(tokens: "TokenSet") -> "TokenSet":
    """Every rank's share of a token set as one TokenSet in rank order (the input order with contiguous shards).

    For methods that need all training tokens on every rank (memory bank, coreset): after this their
    single-process ``fit`` runs unchanged and gives exactly the single-process result. Float16 rows travel.
    """
    from normdino.features.tokens import TokenSet

    if not is_distributed():
        return tokens
    patches = gather_rows(np.ascontiguousarray(tokens.patches))
    cls = None if tokens.cls is None else gather_rows(np.ascontiguousarray(tokens.cls))
    parts = all_gather_object(([tuple(int(v) for v in s) for s in tokens.shapes], list(tokens.sources)))
    shapes = [shape for part in parts for shape in part[0]]
    sources = [source for part in parts for source in part[1]]
    return TokenSet(patches, shapes, cls, sources)


def on_main(compute: Callable[[], dict[str, torch.Tensor]], what: str) -> dict[str, torch.Tensor]:
    """Run ``compute`` on rank 0 only and give its tensors to every rank (e.g. a coreset's selected indices).

    If it raises on rank 0, every rank raises: rank 0 its own error, the others a DistributedError with its
    message (the error is sent before any tensor, so nobody waits for tensors that never come).
    """
    if not is_distributed():
        return compute()
    result, failure = None, None
    if is_main():
        try:
            with local_only():
                result = compute()
        except Exception as exc:  # sent to the other ranks below
            failure = exc
    message = broadcast_object(None if failure is None else _describe(failure))
    if message is not None:
        if failure is not None:
            raise failure
        raise PeerFailedError(f"rank 0 failed during {what}: {message}")
    return broadcast_tensors(result)


def gather_list(items: Sequence[T]) -> list[T]:
    """Every rank's list (small picklable items: file names, sources) concatenated in rank order."""
    return [item for part in all_gather_object(list(items)) for item in part]


def local_indices(global_indices: np.ndarray, n_local: int) -> np.ndarray:
    """The entries of ``global_indices`` (positions in the rank-order concatenation) that fall in this rank's
    ``n_local`` items, as local positions: e.g. a held-out split decided on all ranks' sources at once."""
    counts = all_gather_object(int(n_local))
    start = sum(counts[: rank()])
    g = np.asarray(global_indices, dtype=np.int64)
    return g[(g >= start) & (g < start + n_local)] - start


def fit_method(method: Any, train: "TokenSet", val: "TokenSet | None" = None) -> Any:
    """``method.fit`` on this rank's shares: sharded when the method says it can (``fits_shards = True``, the
    DPMM's EM), else :func:`fit_on_main`; a plain ``method.fit`` without a process group."""
    if not is_distributed() or getattr(method, "fits_shards", False):
        return method.fit(train, val)
    return fit_on_main(method, train, val)


def fit_on_main(method: Any, train: "TokenSet", val: "TokenSet | None" = None) -> Any:
    """Fit any NormativeMethod under torchrun: every rank's shares gathered, ``fit`` on rank 0, its state everywhere.

    The generic path for methods without a sharded fit (memory bank, coreset, HiMatch, ...): the result is
    exactly the single-process fit on the whole data (same tokens in the same order), installed on every rank
    through ``state_dict`` / ``load_state_dict`` so each rank can score its share of the calibration images.
    It saves no time, only makes the method usable in a torchrun job. In a plain run it is ``method.fit``.
    """
    if not is_distributed():
        return method.fit(train, val)
    train_all = gather_token_set(train)
    has_val = all_gather_object(val is not None)
    if any(has_val) and not all(has_val):
        raise DistributedError("some ranks have validation tokens and others none; give every rank a share (possibly empty) or none.")
    val_all = gather_token_set(val) if val is not None else None
    info: list[dict] = []

    def fit_here() -> dict[str, torch.Tensor]:
        method.fit(train_all, val_all)
        info.append(method.fit_info())
        return method.state_dict()

    state = on_main(fit_here, f"the {getattr(method, 'name', '') or type(method).__name__} fit")
    fit_info = broadcast_object(info[0] if info else None)
    if not is_main():
        method.load_state_dict(state, fit_info)
    return method


def gather_scores(samples: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """Every rank's healthy scores (e.g. calibration pixel samples) as one flat array, in rank order.

    Thresholds are quantiles, so the order does not matter: the gathered multiset is the one a single
    process would have scored, and the thresholds are exactly equal to a one-process calibration. Every rank
    sends float64 whatever its data (float32 maps, Python-float image scores) and also when its share is
    empty, so the ranks' rows always agree in dtype.
    """
    parts = [np.asarray(a, dtype=np.float64).ravel() for a in (samples if isinstance(samples, (list, tuple)) else [samples])]
    return gather_rows(np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64))


def thresholds_at_fprs(samples: Sequence[np.ndarray] | np.ndarray, fprs: Sequence[float] | np.ndarray) -> np.ndarray:
    """normdino.thresholds.thresholds_at_fprs over the healthy scores of ALL ranks (identical on every rank)."""
    from normdino.thresholds import thresholds_at_fprs as local_thresholds

    return local_thresholds(gather_scores(samples), fprs)


def reduce_accumulator(accumulator: Any) -> Any:
    """A PixelScoreAccumulator holding every rank's images (merged in rank order; identical on every rank).

    Its histogram and confusion counts are integer sums, so the metrics equal a one-process run's. Each
    rank's accumulator travels once (pickled for transport only: its occupied bins, a few MiB).
    """
    if not is_distributed():
        return accumulator
    parts = all_gather_object(accumulator)
    merged = parts[0]
    for part in parts[1:]:
        merged.merge(part)
    return merged


def barrier() -> None:
    """Wait for every rank (no-op in a plain run)."""
    if is_distributed():
        torch.distributed.barrier()


# ---------------------------------------------------------------------- failing together


@contextlib.contextmanager
def failing_together(what: str) -> Iterator[None]:
    """Run a block on every rank; if it raises on any rank, raise the same DistributedError on all of them.

    On exit every rank reports success or its error message (one small all-gather), so a bad file on
    rank 2 ends the job with "rank 2 of 4 failed during <what>: <message>" everywhere instead of a hang.
    A collective broken by a rank that died inside the block is reported the same way. In a plain run
    the block's own exception passes through unchanged.
    """
    if not is_distributed():
        yield
        return
    error: BaseException | None = None
    try:
        yield
    except DistributedError as exc:
        if not isinstance(exc, PeerFailedError):
            raise  # already agreed by every rank
        error = exc
    except Exception as exc:  # reported to every rank below, then re-raised as one DistributedError
        error = exc
        if _is_broken_collective(exc):
            raise DistributedError(f"a rank of the job stopped during {what} (the connection to it broke: {_first_line(exc)}); its own message is above.") from exc
    try:
        reports = all_gather_object(None if error is None else _describe(error))
    except Exception as exc:  # the peers are gone
        raise DistributedError(f"a rank of the job stopped during {what} ({_first_line(exc)}).") from (error or exc)
    failed = [(r, message) for r, message in enumerate(reports) if message is not None and not message.startswith(_PEER)]
    failed = failed or [(r, message[len(_PEER):]) for r, message in enumerate(reports) if message is not None]
    if failed and len(failed) == len(reports) and len({m for _, m in failed}) == 1:
        raise DistributedError(failed[0][1]) from error  # the same error on every rank: say it once, as it is
    if failed:
        r, message = failed[0]
        others = f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""
        raise DistributedError(f"rank {r} of {len(reports)} failed during {what}{others}: {message}") from error


def _is_broken_collective(exc: BaseException) -> bool:
    """True for errors raised by a collective whose peer went away (gloo/NCCL connection errors)."""
    backend_error = getattr(torch.distributed, "DistBackendError", ())
    text = str(exc)
    return isinstance(exc, backend_error) or any(s in text for s in ("Connection closed by peer", "Connection reset", "Gloo", "NCCL"))


_PEER = "\x00peer:"


def _describe(exc: BaseException) -> str:
    """A user error's own message; other errors prefixed with their type (a peer's failure is marked as such)."""
    if isinstance(exc, PeerFailedError):
        return _PEER + str(exc)
    return str(exc) if isinstance(exc, NormdinoError) else f"{type(exc).__name__}: {exc}"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def payload_bytes(*tensors: torch.Tensor) -> int:
    """Bytes a sum all-reduce of these tensors carries per rank (the tensors' own size; ring algorithms send ~2x)."""
    return sum(t.numel() * t.element_size() for t in tensors)


__all__ = [
    "DistributedError", "PeerFailedError", "is_distributed", "rank", "world_size", "is_main", "launched_by_torchrun", "backend_for",
    "init_from_env", "shutdown", "local_only", "shard_range", "shard", "all_reduce_sum", "global_sum", "global_mean", "broadcast",
    "broadcast_tensors", "broadcast_object", "all_gather_object", "gather_rows", "gather_token_set", "on_main", "fit_on_main", "fit_method", "gather_list", "local_indices", "gather_scores", "thresholds_at_fprs", "reduce_accumulator", "barrier", "failing_together",
    "payload_bytes",
]
