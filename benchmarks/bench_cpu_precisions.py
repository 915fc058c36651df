"""CPU backbone precisions on any machine: torch fp32 / bf16 (when the CPU has bf16 instructions) / int8 and
ONNX Runtime int8 -> ms/image, speed-up over torch fp32 in the same run, token cosine to fp32, the CPU's flags.

    python benchmarks/bench_cpu_precisions.py                     # torch's default threads, batch 1 and 8
    taskset -c 0,1 python benchmarks/bench_cpu_precisions.py --threads 2

Needs no data (phantom slices); bench_runtimes.py gives the fidelity on real lgg-flair slices. Random weights:
honest for time, a proxy for the cosine. Timing is round-robin over the configurations, best round reported.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def cpu_flags() -> str:
    """Model name and the instruction sets that decide INT8/bf16 speed (Linux /proc/cpuinfo)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return f"{name}; " + " ".join(f for f in wanted if f in flags)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="dinov2_vits14")
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    from bench_gpu import phantom_pixels

    from normdino.features.backbone import Backbone
    from normdino.features.loading import build_random_model
    from normdino.features.runtimes import cpu_has_bf16

    configs = [("torch", "fp32"), ("torch", "int8"), ("onnx", "int8")]
    if cpu_has_bf16():
        configs.insert(1, ("torch", "bf16"))
    model = build_random_model(args.arch)
    backbones = {}
    for runtime, precision in configs:
        try:
            backbones[runtime, precision] = Backbone(model, args.arch, image_size=args.size, runtime=runtime,
                                                     precision=precision, is_random=True)
        except Exception as err:  # e.g. onnxruntime missing: a row saying so
            print(f"{runtime} {precision}: {err}")
    print(f"{cpu_flags()}\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {args.arch} at {args.size} px")
    pixels = phantom_pixels(max(args.batches), args.size)
    reference = backbones["torch", "fp32"](pixels)
    print(f"{'runtime':<8}{'precision':<10}{'batch':>6}{'ms/img':>9}{'speed-up':>10}{'mean cos':>10}{'p1 cos':>9}")
    for batch in args.batches:
        best = {key: float("inf") for key in backbones}
        for _ in range(args.rounds):
            for key, backbone in backbones.items():
                backbone(pixels[:batch])  # warm-up (and the export, the first time)
                t0 = time.perf_counter()
                backbone(pixels[:batch])
                best[key] = min(best[key], (time.perf_counter() - t0) / batch * 1000)
        for key, backbone in backbones.items():
            cos = torch.nn.functional.cosine_similarity(backbone(pixels[:batch]), reference[:batch], dim=-1).flatten()
            print(f"{key[0]:<8}{key[1]:<10}{batch:>6}{best[key]:>9.1f}{best['torch', 'fp32'] / best[key]:>10.2f}"
                  f"{float(cos.mean()):>10.5f}{float(torch.quantile(cos, 0.01)):>9.5f}", flush=True)


if __name__ == "__main__":
    main()
