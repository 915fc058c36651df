"""EM step of the mixture across torchrun-style ranks (gloo on CPU): time per step, all-reduce time, bytes sent.

    python benchmarks/bench_distributed.py                  # paper size: 12 288 x 384 tokens, K=500, diag; 1 and 2 ranks
    python benchmarks/bench_distributed.py --ranks 1 2 4 --steps 5 --threads 1

World size 1 is the ordinary single-process step (no process group): the baseline. For W > 1 the
global batch is split in W contiguous shares; W processes are forked, join a gloo group through a file
store and run ``partial_fit(share, distributed=True)``, the code path of ``torchrun -m normdino fit``.
Every rank starts from the same explicit state, so initialisation is not timed. Figures are medians.
On a shared machine wall time depends on the load; the CPU seconds of rank 0 per step show the work
each rank does (ideal: 1/W of the single process's, plus the all-reduce).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mixture import PAPER_BATCH, synthetic_tokens  # noqa: E402

from normdino import distributed as dist  # noqa: E402
from normdino.methods.mixture import DirichletProcessMixture  # noqa: E402


def _model(k: int, x: np.ndarray, covariance: str) -> DirichletProcessMixture:
    """A mixture in a fixed explicit state (means = seeded random rows), the same in every process."""
    rng = np.random.default_rng(0)
    d = x.shape[1]
    means = x[rng.choice(len(x), k, replace=False)].astype(np.float32)
    var = float(np.var(x.astype(np.float32))) + 1e-6
    cov = np.full((k, d), var, np.float32) if covariance == "diag" else np.full(k, var, np.float32)
    sticks = np.full(k, 1.0 / 50, np.float32)
    return DirichletProcessMixture(n_components=k, covariance_type=covariance).set_state(means, cov, sticks, 2.0)


def _step_times(model: DirichletProcessMixture, x: np.ndarray, steps: int, distributed: bool) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds (this process, all its threads) of each step after a warm-up step."""
    model.partial_fit(x, distributed=distributed)  # warm-up
    wall, cpu = [], []
    for _ in range(steps):
        dist.barrier()
        start, start_cpu = time.perf_counter(), time.process_time()
        model.partial_fit(x, distributed=distributed)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def _worker(rank: int, world: int, store: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(args.threads)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        x = synthetic_tokens(args.tokens, seed=1).astype(np.float32)
        share = x[slice(*dist.shard_range(len(x)))]
        model = _model(args.components, x, args.covariance)
        times, cpu = _step_times(model, share, args.steps, distributed=True)
        buffer = torch.zeros(4 + model.stat_count_.numel() + model.stat_sum_.numel() + model.stat_square_.numel())
        reduce_times = []
        for _ in range(args.steps + 1):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce_sum(buffer)
            reduce_times.append(time.perf_counter() - start)
        if rank == 0:
            Path(out).write_text(json.dumps({"step_s": times, "step_cpu_s": cpu, "allreduce_s": reduce_times[1:],
                                             "bytes": dist.payload_bytes(buffer), "alpha": model.alpha_}))
    finally:
        torch.distributed.destroy_process_group()


def run(world: int, args: argparse.Namespace) -> dict:
    """Median step time (and all-reduce time, bytes per step) with ``world`` ranks."""
    if world == 1:
        torch.set_num_threads(args.threads)
        x = synthetic_tokens(args.tokens, seed=1).astype(np.float32)
        model = _model(args.components, x, args.covariance)
        times, cpu = _step_times(model, x, args.steps, distributed=False)
        result = {"step_s": times, "step_cpu_s": cpu, "allreduce_s": [0.0], "bytes": 0, "alpha": model.alpha_}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            out = f"{tmp}/result.json"
            mp.start_processes(_worker, args=(world, f"{tmp}/store", args, out), nprocs=world, start_method="fork")
            result = json.loads(Path(out).read_text())
    return {"ranks": world, "step_s": round(statistics.median(result["step_s"]), 4),
            "step_cpu_s_rank0": round(statistics.median(result["step_cpu_s"]), 4),
            "allreduce_s": round(statistics.median(result["allreduce_s"]), 5), "bytes_per_step": result["bytes"],
            "alpha": result["alpha"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokens", type=int, default=PAPER_BATCH, help="global batch rows (default 12 288 = 12 images)")
    parser.add_argument("--components", type=int, default=500)
    parser.add_argument("--covariance", choices=("diag", "spherical"), default="diag")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    args = parser.parse_args()
    rows = [run(w, args) for w in args.ranks]
    base, base_cpu = rows[0]["step_s"], rows[0]["step_cpu_s_rank0"]
    for row in rows:
        row["wall_speedup_vs_first"] = round(base / row["step_s"], 2)
        row["cpu_per_rank_ratio_vs_first"] = round(row["step_cpu_s_rank0"] / base_cpu, 2)
        print(json.dumps(row))
    alphas = {round(r["alpha"], 4) for r in rows}
    print(json.dumps({"same_alpha_after_steps": len(alphas) == 1, "tokens": args.tokens, "K": args.components,
                      "D": 384, "covariance": args.covariance, "threads_per_rank": args.threads}))


if __name__ == "__main__":
    main()
