"""Backbone runtimes on this machine: runtime x precision -> ms/image, speed-up over torch fp32 measured in the
same run, token fidelity on real lgg-flair slices, DPMM patch-map correlation, peak RSS, GFLOP/s against the
CPU's fp32 peak; plus raw Hugging Face forward vs normdino's Backbone vs AnomalyDetector.predict.

    python benchmarks/bench_runtimes.py                         # ViT-S/14 at 448, 20 fidelity slices, 10 timed, 3 rounds
    python benchmarks/bench_runtimes.py --n-time 4 --rounds 2   # shorter

Weights are RANDOM (no weights can be downloaded here): timings and memory are honest, but the cosine and
map-correlation figures are a proxy for DINOv2's (random tokens are not DINOv2 tokens).
Timing is round-robin over the configurations in one process (each round times every configuration once) and
the best round is reported, so that load from other processes on a shared machine hits all of them alike.
Peak RSS comes from one child process per configuration (graphs already exported by then).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lgg-flair"
CONFIGS = [("torch", "fp32"), ("torch", "int8"), ("onnx", "fp32"), ("onnx", "int8"), ("openvino", "fp32")]

FMA_PEAK_C = r"""
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
int main(void) {  /* 12 independent FMA chains: enough to fill 2 FMA pipes of 4-cycle latency */
  long iters = 100000000; __m256 a[12]; __m256 b = _mm256_set1_ps(1.0000001f), c = _mm256_set1_ps(1e-7f);
  for (int i = 0; i < 12; i++) a[i] = _mm256_set1_ps((float)i);
  struct timespec t0, t1; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0);
  for (long k = 0; k < iters; k++) {
    #pragma GCC unroll 12
    for (int i = 0; i < 12; i++) a[i] = _mm256_fmadd_ps(a[i], b, c);
  }
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t1);
  float sink = 0; for (int i = 0; i < 12; i++) { float o[8]; _mm256_storeu_ps(o, a[i]); sink += o[0]; }
  double s = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
  printf("%f %g\n", iters * 12.0 * 8 * 2 / s / 1e9, sink);
  return 0;
}
"""


def _peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM (ru_maxrss would carry the parent's peak across fork + exec on Linux)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fma_peak_per_core() -> float | None:
    """fp32 GFLOP/s of one core running AVX2 FMAs back to back, per second of its own CPU time (None without gcc)."""
    if shutil.which("gcc") is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        source, binary = Path(tmp) / "peak.c", Path(tmp) / "peak"
        source.write_text(FMA_PEAK_C)
        built = subprocess.run(["gcc", "-O2", "-mavx2", "-mfma", str(source), "-o", str(binary)], capture_output=True)
        if built.returncode != 0:
            return None
        runs = [float(subprocess.run([str(binary)], capture_output=True, text=True).stdout.split()[0]) for _ in range(3)]
    return max(runs)


def vit_flops(config, image_size: int) -> float:
    """Multiply-adds x 2 of one ViT forward at image_size: patch embedding, Linear layers and attention matmuls."""
    d, layers, patch = int(config.hidden_size), int(config.num_hidden_layers), int(config.patch_size)
    hidden = int(getattr(config, "intermediate_size", 0) or d * float(getattr(config, "mlp_ratio", 4)))
    gated = bool(getattr(config, "use_gated_mlp", False) or getattr(config, "use_swiglu_ffn", False))
    grid = (image_size // patch) ** 2
    tokens = grid + 1 + int(getattr(config, "num_register_tokens", 0) or 0)
    linear = 2 * tokens * (4 * d * d + (3 if gated else 2) * d * hidden)
    attention = 4 * tokens * tokens * d
    return 2 * grid * 3 * patch * patch * d + layers * (linear + attention)


def slice_paths(folder: Path, n: int) -> list[Path]:
    from normdino.io.reading import find_images

    paths = find_images([folder])
    step = max(1, len(paths) // max(1, n))
    return paths[::step][:n]


WEIGHTS: str | None = None  # --weights: real weights (a folder, .safetensors or cached hub name) instead of random


def _build(arch: str, size: int, runtime: str, precision: str):
    from normdino.features.backbone import Backbone

    if WEIGHTS:
        return Backbone.from_pretrained(WEIGHTS, image_size=size, runtime=runtime, precision=precision)
    return Backbone.random(arch, image_size=size, runtime=runtime, precision=precision)


def child(arch: str, size: int, runtime: str, precision: str, n: int, batch: int) -> dict:
    """Peak RSS of one configuration: build it (from the export cache) and encode n slices."""
    import torch

    from normdino.io.reading import read_image

    backbone = _build(arch, size, runtime, precision)
    pixels = torch.stack([backbone.preprocess(read_image(p)) for p in slice_paths(DATA / "valid" / "Ungood" / "img", n)])
    for start in range(0, n, batch):
        backbone.encode(pixels[start : start + batch])
    return {"peak_rss_mb": _peak_rss_mb()}


CLOCK = time.perf_counter


def _round_robin(jobs: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds of each job in each round, jobs interleaved so that outside load hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for job in jobs.values():
        job()  # warm-up (first-call allocations, lazy kernels)
    for _ in range(rounds):
        for name, job in jobs.items():
            start = CLOCK()
            job()
            times[name].append(CLOCK() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="dinov2_vits14")
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--weights", default=None,
                        help="real backbone weights (folder, .safetensors, cached hub name): real fidelity figures")
    parser.add_argument("--n-fid", type=int, default=20, help="valid/Ungood slices for token fidelity")
    parser.add_argument("--n-train", type=int, default=24, help="train/good slices for the DPMM of the map correlation")
    parser.add_argument("--n-time", type=int, default=10, help="slices timed per configuration and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1, help="images per forward pass in the timing")
    parser.add_argument("--threads", type=int, default=0, help="torch/ONNX/OpenVINO threads (0: torch's default)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time, robust to other load (use with --threads 1)")
    parser.add_argument("--no-rss", action="store_true", help="skip the per-configuration child processes")
    parser.add_argument("--no-predict", action="store_true", help="skip AnomalyDetector.predict timing")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    global WEIGHTS
    WEIGHTS = args.weights
    if args.clock == "cpu":
        global CLOCK
        CLOCK = time.process_time
    if args.child:
        print(json.dumps(child(args.arch, args.size, *args.child, args.n_time, args.batch)))
        return
    if not (DATA / "valid" / "Ungood" / "img").is_dir():
        sys.exit(f"{DATA} is absent: the fidelity figures need lgg-flair slices")
    cache = os.environ.setdefault("NORMDINO_RUNTIME_CACHE", tempfile.mkdtemp(prefix="normdino-runtimes-"))
    run(args, Path(cache))


def run(args, cache: Path) -> None:
    import numpy as np
    import torch

    from normdino.features.runtimes import cpu_has_bf16, token_cosines
    from normdino.features.tokens import TokenSet, Tokens
    from normdino.io.reading import read_image
    from normdino.methods.dpmm import DPMM

    threads = torch.get_num_threads()
    weights = f"weights {args.weights}" if args.weights else f"{args.arch} RANDOM weights (timing honest; cosines a proxy)"
    print(f"torch {torch.__version__}, {threads} threads, {args.clock} clock, {args.size} px, batch {args.batch}, "
          f"{weights}; export cache {cache}")

    # ---- build every configuration (the first build of a graph runtime exports and quantises it)
    backbones, build_s = {}, {}
    for runtime, precision in CONFIGS:
        start = time.perf_counter()
        backbones[(runtime, precision)] = _build(args.arch, args.size, runtime, precision)
        build_s[(runtime, precision)] = time.perf_counter() - start
    reference = backbones[("torch", "fp32")]
    flops = vit_flops(reference.config, reference.image_size)

    # ---- fidelity on real slices, and the DPMM patch maps those tokens give
    fid_paths = slice_paths(DATA / "valid" / "Ungood" / "img", args.n_fid)
    pixels = torch.stack([reference.preprocess(read_image(p)) for p in fid_paths])
    tokens = {key: b.encode(pixels).patch_tokens[:, -1] if len(pixels) <= 8 else
              torch.cat([b.encode(pixels[i : i + 8]).patch_tokens[:, -1] for i in range(0, len(pixels), 8)])
              for key, b in backbones.items()}
    train_paths = slice_paths(DATA / "train" / "good", args.n_train)
    train = torch.cat([reference.encode(torch.stack([reference.preprocess(read_image(p)) for p in train_paths[i : i + 8]]))
                       .patch_tokens for i in range(0, len(train_paths), 8)])
    train_set = TokenSet(train.numpy().astype(np.float16), [(256, 256)] * len(train))
    components = max(2, min(100, len(train) * train.shape[2] * train.shape[3] // 2))
    dpmm = DPMM(n_components=components, epochs=5, batch_images=12, seed=0).fit(train_set)
    maps = {key: dpmm.patch_scores(Tokens(t)).reshape(len(t), -1).double() for key, t in tokens.items()}

    # ---- timing, round-robin: HF forward, Backbone.encode of every configuration
    time_pixels = pixels[: args.n_time] if args.n_time <= len(pixels) else torch.stack(
        [reference.preprocess(read_image(p)) for p in slice_paths(DATA / "valid" / "Ungood" / "img", args.n_time)])
    chunks = [time_pixels[i : i + args.batch] for i in range(0, len(time_pixels), args.batch)]

    def hf_forward() -> None:
        with torch.inference_mode():
            for chunk in chunks:
                reference.model(pixel_values=chunk)

    jobs = {"hf": hf_forward}
    for key, backbone in backbones.items():
        jobs[key] = (lambda b: lambda: [b.encode(chunk) for chunk in chunks])(backbone)
    times = _round_robin(jobs, args.rounds)
    best = {key: min(v) / len(time_pixels) for key, v in times.items()}

    # bf16 on this CPU: timed once with plain autocast to show why it is not offered without bf16 instructions
    bf16_ms = None
    if not cpu_has_bf16():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            reference.model(pixel_values=time_pixels[:1])
            start = CLOCK()
            reference.model(pixel_values=time_pixels[:1])
            bf16_ms = 1000 * (CLOCK() - start)

    rss = {}
    if not args.no_rss:
        for runtime, precision in CONFIGS:
            command = [sys.executable, __file__, "--arch", args.arch, *(["--weights", args.weights] if args.weights else []),
                       "--size", str(args.size), "--n-time",
                       str(args.n_time), "--batch", str(args.batch), "--threads", str(threads),
                       "--child", runtime, precision]
            out = subprocess.run(command, check=True, capture_output=True, text=True, env=os.environ.copy())
            rss[(runtime, precision)] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]

    # ---- the table
    ref_ms = 1000 * best[("torch", "fp32")]
    peak = fma_peak_per_core()
    print(f"\nforward: {flops / 1e9:.1f} GFLOP per image (patch embedding, Linear layers, attention matmuls)")
    print(f"{'runtime':<10}{'precision':<10}{'ms/image':>9}{'speed-up':>9}{'GFLOP/s':>9}{'cos mean':>10}"
          f"{'cos p1':>9}{'map r':>8}{'RSS MB':>8}{'build s':>9}")
    print(f"{'HF raw':<10}{'fp32':<10}{1000 * best['hf']:>9.0f}{ref_ms / (1000 * best['hf']):>9.2f}"
          f"{flops / best['hf'] / 1e9:>9.1f}{'':>10}{'':>9}{'':>8}{'':>8}{'':>9}")
    for key in backbones:
        cos = token_cosines(tokens[("torch", "fp32")], tokens[key])
        r = float(np.corrcoef(maps[("torch", "fp32")].flatten(), maps[key].flatten())[0, 1])
        ms = 1000 * best[key]
        print(f"{key[0]:<10}{key[1]:<10}{ms:>9.0f}{ref_ms / ms:>9.2f}{flops / best[key] / 1e9:>9.1f}"
              f"{float(cos.mean()):>10.5f}{float(torch.quantile(cos.float(), 0.01)):>9.5f}{r:>8.4f}"
              f"{rss.get(key, float('nan')):>8.0f}{build_s[key]:>9.1f}")
    if bf16_ms is not None:
        print(f"{'torch':<10}{'bf16':<10}{bf16_ms:>9.0f}{ref_ms / bf16_ms:>9.2f}   (autocast, 1 image; not offered: "
              "this CPU has no bf16 instructions)")
    gap = 100 * (best[("torch", "fp32")] / best["hf"] - 1)
    print(f"\nBackbone.encode (torch fp32) vs raw HF forward: {gap:+.1f} % (best of {args.rounds} rounds x "
          f"{len(time_pixels)} images)")
    if peak is not None:
        cores = threads
        print(f"fp32 peak: {peak:.1f} GFLOP/s per core (AVX2 FMA loop, per second of CPU time) x {cores} threads = "
              f"{peak * cores:.0f} GFLOP/s; torch fp32 reaches {100 * flops / best[('torch', 'fp32')] / 1e9 / (peak * cores):.0f} %")
    if not args.no_predict:
        predict_table(args, backbones, train_paths)


def predict_table(args, backbones: dict, train_paths: list) -> None:
    """AnomalyDetector.predict (read, preprocess, forward, score, upsample; no files written) per configuration."""
    from normdino.detector import AnomalyDetector

    reference = backbones[("torch", "fp32")]
    side = reference.grid_shape()[0]
    components = max(2, min(100, len(train_paths) * side * side // 4))
    detector = AnomalyDetector(backbone=reference, method="dpmm", n_components=components, epochs=3, progress=False)
    detector.fit(train_paths)
    paths = slice_paths(DATA / "valid" / "Ungood" / "img", args.n_time)

    def job(backbone):
        def run() -> None:
            detector.backbone_ = backbone
            detector.predict(paths)
        return run

    times = _round_robin({key: job(b) for key, b in backbones.items()}, args.rounds)
    ref = min(times[("torch", "fp32")])
    print(f"\nAnomalyDetector.predict, {len(paths)} slices, batch {detector.batch_size}, best of {args.rounds} rounds")
    for key, values in times.items():
        print(f"  {key[0]:<9}{key[1]:<6}{len(paths) / min(values):6.2f} images/s   speed-up {ref / min(values):.2f}")


if __name__ == "__main__":
    main()
