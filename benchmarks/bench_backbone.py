"""Backbone speed and memory: ms/image and peak RSS per architecture and batch size, then cached extraction.

    python benchmarks/bench_backbone.py                      # ViT-S/14 and ViT-B/14, batch 1 and 8, 200 slices
    python benchmarks/bench_backbone.py --n 64 --reps 1      # shorter
    python benchmarks/bench_backbone.py --runtimes [...]     # runtime x precision table (bench_runtimes.py options)

Random weights of the same architecture: honest for time and memory, meaningless for quality.
Each forward configuration runs in its own process so that peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lgg-flair" / "train" / "good"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def forward_child(arch: str, batch: int, reps: int) -> dict:
    """Time the model forward alone (preprocessed input) and report this process's peak RSS."""
    import torch

    from normdino.features.backbone import Backbone

    backbone = Backbone.random(arch, image_size=448)
    pixels = torch.randn(batch, 3, 448, 448)
    backbone(pixels[:1])  # warm-up
    start = time.perf_counter()
    for _ in range(reps):
        backbone(pixels)
    seconds = time.perf_counter() - start
    return {"ms_per_image": 1000 * seconds / (reps * batch), "peak_rss_mb": _peak_rss_mb()}


def pipeline_child(arch: str, n: int, batch: int) -> dict:
    """Cached extraction of n real slices; the model's own forward time is clocked inside the same run by hooks."""
    import numpy as np
    import torch

    from normdino.features.backbone import Backbone
    from normdino.features.cache import extract_tokens
    from normdino.io.reading import find_images

    paths = find_images([DATA])[:n]
    backbone = Backbone.random(arch, image_size=448)
    backbone(torch.zeros(1, 3, 448, 448))  # warm-up
    clock = {"start": 0.0, "model_s": 0.0}
    backbone.model.register_forward_pre_hook(lambda *a: clock.update(start=time.perf_counter()))
    backbone.model.register_forward_hook(
        lambda *a: clock.update(model_s=clock["model_s"] + time.perf_counter() - clock["start"])
    )

    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        extract_tokens(backbone, paths, cache_dir=Path(cache), batch_size=batch, progress=False)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        tokens = extract_tokens(backbone, paths, cache_dir=Path(cache), batch_size=batch, progress=False)
        float(np.asarray(tokens.patches, dtype=np.float32).sum())  # read every token
        warm = time.perf_counter() - start
        start = time.perf_counter()  # the same images in another list: rows copied into a new shard
        reordered = extract_tokens(backbone, paths[::-1], cache_dir=Path(cache), batch_size=batch, progress=False)
        float(np.asarray(reordered.patches, dtype=np.float32).sum())
        reorder = time.perf_counter() - start
        size_mb = sum(f.stat().st_size for f in Path(cache).rglob("*") if f.is_file()) / 2**20
    tokens_per_image = tokens.grid_shape[0] * tokens.grid_shape[1]
    return {
        "n": n, "model_s": clock["model_s"], "cold_s": cold, "warm_s": warm, "reorder_s": reorder,
        "cold_tokens_per_s": n * tokens_per_image / cold, "warm_tokens_per_s": n * tokens_per_image / warm,
        "reorder_tokens_per_s": n * tokens_per_image / reorder, "cache_mb": size_mb, "peak_rss_mb": _peak_rss_mb(),
    }


def _run_child(threads: int, *args: str) -> dict:
    command = [sys.executable, __file__, "--threads", str(threads), *args]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if "--runtimes" in sys.argv[1:]:  # the runtime x precision table lives in bench_runtimes.py
        sys.argv.remove("--runtimes")
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_runtimes

        bench_runtimes.main()
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["dinov2_vits14", "dinov2_vitb14"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--reps", type=int, default=2, help="timed batches per configuration")
    parser.add_argument("--n", type=int, default=200, help="real slices for the cached extraction (0 skips it)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        kind, arch, *rest = args.child
        result = forward_child(arch, int(rest[0]), int(rest[1])) if kind == "forward" else pipeline_child(
            arch, int(rest[0]), int(rest[1])
        )
        print(json.dumps(result))
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, input 448x448, fp32, random weights")
    print(f"{'model':<16}{'batch':>6}{'ms/image':>11}{'peak RSS MB':>13}")
    for arch in args.archs:
        for batch in args.batches:
            r = _run_child(args.threads, "--child", "forward", arch, str(batch), str(args.reps))
            print(f"{arch:<16}{batch:>6}{r['ms_per_image']:>11.0f}{r['peak_rss_mb']:>13.0f}", flush=True)

    if args.n > 0:
        if not DATA.is_dir():
            print(f"\n{DATA} is absent: cached extraction skipped")
            return
        r = _run_child(args.threads, "--child", "pipeline", args.archs[0], str(args.n), "8")
        overhead = (r["cold_s"] - r["model_s"]) / r["model_s"]
        print(f"\ncached extraction, {args.archs[0]}, {r['n']} slices of {DATA.parent.parent.name}/train/good, batch 8")
        print(f"  extract_tokens, cold     {r['cold_s']:8.1f} s  {r['cold_tokens_per_s']:10.0f} tokens/s")
        print(f"    of which model forward {r['model_s']:8.1f} s")
        print(f"  extract_tokens, cached   {r['warm_s']:8.3f} s  {r['warm_tokens_per_s']:10.0f} tokens/s")
        print(f"  same images, other order {r['reorder_s']:8.3f} s  {r['reorder_tokens_per_s']:10.0f} tokens/s (rows copied)")
        print(f"  pipeline overhead (hash, decode, resize, loader, fp16, memmap) / forward: {100 * overhead:+.1f} %")
        print(f"  cache {r['cache_mb']:.0f} MB (two shards), peak RSS {r['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
