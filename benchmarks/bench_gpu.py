"""GPU benchmark: backbone images/s by architecture x precision x batch, token fidelity, the Backbone path
against the raw transformers forward, predict end to end with its stages, and the DPMM EM step.

    python benchmarks/bench_gpu.py                        # everything, ~4 min on one H100/H200
    python benchmarks/bench_gpu.py --archs dinov2_vits14 --batches 1 32
    python benchmarks/bench_gpu.py --smoke --device cpu   # tiny models on the CPU: checks the script runs

GPU times come from CUDA events around each forward (median of --reps after warm-up); inputs are phantom
brain slices preprocessed at 448 px. Random weights of the real architectures: honest for time and memory,
never for detection quality (the token cosines between precisions are a proxy).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))


# ---------------------------------------------------------------------- timing helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 3) -> float:
    """Median milliseconds of fn() over reps calls after warm-up (CUDA events on a GPU, perf_counter on a CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def vit_gflop(config, image_size: int) -> float:
    """Multiply-adds x 2 of one forward: patch embedding, 12 x (qkv, projection, MLP, attention matmuls)."""
    d, layers, patch = config.hidden_size, config.num_hidden_layers, config.patch_size
    tokens = (image_size // patch) ** 2 + 1 + int(getattr(config, "num_register_tokens", 0) or 0)
    hidden = getattr(config, "intermediate_size", None) or int(config.mlp_ratio * d)
    per_layer = 2 * tokens * (4 * d * d + 2 * d * hidden) + 4 * tokens * tokens * d
    return (layers * per_layer + 2 * (image_size // patch) ** 2 * 3 * patch * patch * d) / 1e9


def cosine_stats(tokens: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Mean and 1st-percentile cosine between matching tokens (any leading shape, features last)."""
    cos = F.cosine_similarity(tokens.float().flatten(0, -2), reference.float().flatten(0, -2), dim=-1)
    return float(cos.mean()), float(torch.quantile(cos.cpu(), 0.01))


# ---------------------------------------------------------------------- inputs
def phantom_pixels(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) preprocessed phantom brain slices (lesions in every fourth)."""
    from normdino.features.backbone import preprocess_image
    from normdino.io.phantoms import make_phantom

    rng = np.random.default_rng(seed)
    images = [make_phantom(rng, size=256, lesions=int(i % 4 == 3))[0] for i in range(n)]
    return torch.stack([preprocess_image(im, size) for im in images])


# ---------------------------------------------------------------------- 1. forward table
def forward_modes(model: torch.nn.Module, device: torch.device) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """name -> function(pixels) returning last-layer tokens (B, T, D) after the final LayerNorm."""

    def plain(pixels):
        return model(pixel_values=pixels).last_hidden_state

    def autocast(dtype):
        def run(pixels):
            with torch.autocast(device.type, dtype=dtype):
                return model(pixel_values=pixels).last_hidden_state
        return run

    modes = {"fp32": plain}
    if device.type == "cuda":
        modes["tf32"] = plain  # the same call with TF32 matmuls switched on (see tf32_context)
        modes["bf16 autocast"] = autocast(torch.bfloat16)
        modes["fp16 autocast"] = autocast(torch.float16)
        half = _bf16_copy(model)
        modes["bf16 weights"] = lambda pixels: half(pixel_values=pixels.to(torch.bfloat16)).last_hidden_state
    return modes


def _bf16_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).to(torch.bfloat16)


@contextlib.contextmanager
def tf32_context(enabled: bool):
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def cuda_graph(fn: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Capture fn on a static input once; each call copies the input in and replays the graph."""
    static_in = example.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(static_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(static_in)

    def replay(pixels):
        static_in.copy_(pixels)
        graph.replay()
        return static_out
    return replay


def forward_table(args, device: torch.device, pixels_cpu: torch.Tensor) -> list[dict]:
    from normdino.features.loading import build_random_model

    rows = []
    for arch in args.archs:
        model = build_random_model(arch, tiny=args.smoke).to(device)
        gflop = vit_gflop(model.config, args.image_size)
        logging.info("%s: attention implementation %s", arch, model.config._attn_implementation)
        modes = forward_modes(model, device)
        for batch in args.batches:
            pixels = pixels_cpu[:batch].to(device)
            if len(pixels) < batch:
                pixels = pixels.repeat((batch + len(pixels) - 1) // len(pixels), 1, 1, 1)[:batch]
            with torch.inference_mode(), tf32_context(False):
                reference = modes["fp32"](pixels).float()
            for name, fn in modes.items():
                variants = [(name, lambda fn=fn: fn)]
                if device.type == "cuda" and name in ("bf16 autocast", "bf16 weights"):
                    variants.append((name + " + CUDA graph", lambda fn=fn: cuda_graph(fn, pixels)))
                for label, make in variants:
                    try:
                        with torch.inference_mode(), tf32_context(name == "tf32"):
                            run = make()
                            ms = time_ms(lambda: run(pixels), device, args.reps)
                            mean_cos, p1_cos = cosine_stats(run(pixels), reference)
                    except Exception as err:  # out of memory, a failed capture: a result, not a crash
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                        rows.append({"arch": arch, "mode": label, "batch": batch, "error": repr(err)[:200]})
                        logging.exception("%s %s batch %d failed", arch, label, batch)
                        continue
                    row = {"arch": arch, "mode": label, "batch": batch, "ms_per_image": ms / batch,
                           "images_per_s": 1000 * batch / ms, "tflops": gflop * batch / ms,
                           "mean_cos": mean_cos, "p1_cos": p1_cos}
                    rows.append(row)
                    logging.info("%s", row)
        if device.type == "cuda":
            rows.append({"arch": arch, "mode": "peak GPU memory (GiB)", "batch": max(args.batches),
                         "gib": torch.cuda.max_memory_allocated(device) / 2**30})
            torch.cuda.reset_peak_memory_stats(device)
        del model, modes
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def compile_rows(args, device: torch.device, pixels_cpu: torch.Tensor, deadline: float) -> list[dict]:
    """torch.compile (default mode) on bf16 weights at the largest batch, time permitting."""
    from normdino.features.loading import build_random_model

    rows = []
    batch = max(args.batches)
    pixels = pixels_cpu[:batch].to(device)
    pixels = pixels.repeat((batch + len(pixels) - 1) // len(pixels), 1, 1, 1)[:batch].to(torch.bfloat16)
    for arch in args.archs:
        for mode in ("default",):
            if time.monotonic() > deadline:
                rows.append({"arch": arch, "mode": f"compile {mode}", "batch": batch, "error": "skipped: time budget"})
                continue
            model = build_random_model(arch, tiny=args.smoke).to(device).to(torch.bfloat16)
            compiled = torch.compile(model, mode=mode)
            t0 = time.perf_counter()
            try:
                with torch.inference_mode():
                    compiled(pixel_values=pixels)
                    sync(device)
                    compile_s = time.perf_counter() - t0
                    ms = time_ms(lambda: compiled(pixel_values=pixels), device, args.reps)
                    eager = time_ms(lambda: model(pixel_values=pixels), device, args.reps)
                    mean_cos, p1_cos = cosine_stats(compiled(pixel_values=pixels).last_hidden_state,
                                                    model(pixel_values=pixels).last_hidden_state)
            except Exception as err:  # a compiler failure is a result here, not a crash of the benchmark
                rows.append({"arch": arch, "mode": f"compile {mode}", "batch": batch, "error": repr(err)[:200]})
                continue
            rows.append({"arch": arch, "mode": f"bf16 weights + compile {mode}", "batch": batch,
                         "ms_per_image": ms / batch, "images_per_s": 1000 * batch / ms,
                         "tflops": vit_gflop(model.config, args.image_size) * batch / ms,
                         "speedup_vs_eager": eager / ms, "compile_s": compile_s,
                         "mean_cos": mean_cos, "p1_cos": p1_cos})
            logging.info("%s", rows[-1])
            torch._dynamo.reset()
    return rows


# ---------------------------------------------------------------------- 2. Backbone path vs raw forward
def backbone_gap(args, device: torch.device, pixels_cpu: torch.Tensor) -> dict:
    """Raw transformers forward vs Backbone.encode (tokens on the device) vs encode + copy to the host."""
    from normdino.features.backbone import Backbone
    from normdino.features.loading import build_random_model

    arch = args.archs[0]
    batch = min(32, max(args.batches))
    model = build_random_model(arch, tiny=args.smoke)
    precision = "bf16" if device.type == "cuda" else "fp32"
    backbone = Backbone(model, arch, image_size=args.image_size, device=device, precision=precision, is_random=True)
    pixels = pixels_cpu[:batch].repeat((batch + len(pixels_cpu) - 1) // len(pixels_cpu), 1, 1, 1)[:batch].to(device)
    cast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def raw():
        with torch.inference_mode(), cast:
            return backbone.model(pixel_values=pixels).last_hidden_state

    raw_ms = time_ms(raw, device, args.reps)
    encode_ms = time_ms(lambda: backbone.encode(pixels), device, args.reps)
    host_ms = time_ms(lambda: backbone.encode(pixels).patch_tokens.cpu(), device, args.reps)
    return {"arch": arch, "batch": batch, "precision": precision, "raw_ms_per_image": raw_ms / batch,
            "encode_ms_per_image": encode_ms / batch, "encode_to_host_ms_per_image": host_ms / batch,
            "gap_encode": encode_ms / raw_ms - 1, "gap_encode_to_host": host_ms / raw_ms - 1}


# ---------------------------------------------------------------------- 3. predict end to end
def pipeline(args, device: torch.device) -> dict:
    """Fit a DPMM detector on phantom PNGs and predict, timing the stages the CPU does around the GPU."""
    from normdino import AnomalyDetector
    from normdino.features.loading import save_random_backbone
    from normdino.features.cache import extract_tokens
    from normdino.io.phantoms import write_phantom_dataset
    from normdino.io.reading import read_image
    from normdino.parallel import default_workers

    out: dict = {"cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        n = args.pipeline_images
        root = write_phantom_dataset(Path(tmp) / "data", n_train=n, n_valid=max(8, n // 8), n_test_normal=n // 2,
                                     n_test_anomalous=n // 2, size=256, seed=0)
        weights = save_random_backbone(Path(tmp) / "vits14", arch=args.archs[0], tiny=args.smoke)
        train = sorted((root / "train" / "good").glob("*.png"))
        val = sorted((root / "valid" / "good" / "img").glob("*.png"))
        test = sorted((root / "test").glob("*/img/*.png"))
        batch = args.pipeline_batch
        detector = AnomalyDetector(method="dpmm", backbone=str(weights), image_size=args.image_size, device=str(device),
                                   batch_size=batch, cache_dir=None, progress=False, epochs=args.epochs,
                                   n_components=8 if args.smoke else 500)
        t0 = time.perf_counter()
        detector.fit(train, val)
        sync(device)
        out["fit_s"] = time.perf_counter() - t0
        out["fit_images"] = len(train) + len(val)
        detector.predict(test[:batch])  # warm-up
        sync(device)
        t0 = time.perf_counter()
        predictions = detector.predict(test)
        sync(device)
        out["predict_s"] = time.perf_counter() - t0
        out["predict_images"] = len(predictions)
        out["predict_images_per_s"] = len(predictions) / out["predict_s"]

        backbone = detector.backbone_
        t0 = time.perf_counter()
        arrays = [read_image(p) for p in test]
        out["read_ms_per_image"] = 1000 * (time.perf_counter() - t0) / len(test)
        t0 = time.perf_counter()
        pixels = torch.stack([backbone.preprocess(a) for a in arrays])
        out["preprocess_ms_per_image"] = 1000 * (time.perf_counter() - t0) / len(test)
        on_device = pixels[:batch].to(device)
        out["forward_ms_per_image"] = time_ms(lambda: backbone.encode(on_device), device, args.reps) / batch
        tokens = backbone.encode(on_device)
        from normdino.features.tokens import Tokens

        maps = detector.patch_maps(Tokens(tokens.patch_tokens, None))
        out["patch_scores_ms_per_image"] = time_ms(lambda: detector.patch_maps(Tokens(tokens.patch_tokens, None)),
                                                   device, args.reps) / batch
        from normdino.methods import scoring

        cpu_maps = maps.float().cpu()
        t0 = time.perf_counter()
        for patch_map, array in zip(cpu_maps, arrays):
            scoring.pixel_map(patch_map, array.shape[:2], detector.sigma)
        out["pixel_map_ms_per_image"] = 1000 * (time.perf_counter() - t0) / len(cpu_maps)

        for workers in (1, default_workers(device)):
            t0 = time.perf_counter()
            extract_tokens(backbone, test, cache_dir=None, batch_size=batch, progress=False, workers=workers)
            sync(device)
            out[f"extract_images_per_s_workers{workers}"] = len(test) / (time.perf_counter() - t0)

        # the command a user runs: normdino predict, every output written (maps, masks, overlays, CSV, report)
        from normdino.cli import main

        model = detector.save(Path(tmp) / "model.normdino")
        folder = Path(tmp) / "predict-in"
        folder.mkdir()
        for i, path in enumerate(test):
            (folder / f"{i:04d}.png").write_bytes(path.read_bytes())
        warm_up = Path(tmp) / "warm-up"
        warm_up.mkdir()
        for path in test[:2]:
            (warm_up / path.name).write_bytes(path.read_bytes())
        runs = (("warm-up", warm_up, 1, []), ("serial", folder, 1, []), ("threads", folder, None, []),
                ("threads_no_overlays", folder, None, ["--no-overlays"]))
        for label, source, workers, extra in runs:
            with fixed_workers(workers):
                command = ["predict", str(model), str(source), "-o", str(Path(tmp) / f"out-{label}"), "-q",
                           "--batch-size", str(batch), "--device", str(device), *extra]
                t0 = time.perf_counter()
                assert main(command) == 0
                if label != "warm-up":
                    out[f"cli_predict_images_per_s_{label}"] = len(test) / (time.perf_counter() - t0)
    return out


@contextlib.contextmanager
def fixed_workers(workers: int | None):
    """Every loader/writer pool at ``workers`` threads (None: normdino's default) for one measurement."""
    import normdino.detector
    import normdino.features.backbone
    import normdino.features.cache
    import normdino.io.writing

    modules = (normdino.detector, normdino.features.backbone, normdino.features.cache, normdino.io.writing)
    saved = [module.default_workers for module in modules]
    if workers is not None:
        for module in modules:
            module.default_workers = lambda device="cpu": workers
    try:
        yield
    finally:
        for module, original in zip(modules, saved):
            module.default_workers = original


# ---------------------------------------------------------------------- 4. EM step
def em_steps(args, device: torch.device) -> list[dict]:
    """DPMM EM step (diag, K=500, D=384) at the paper's batch and 8x it, on the device and on this host's CPU."""
    from bench_mixture import PAPER_BATCH, synthetic_tokens

    from normdino.methods.mixture import DirichletProcessMixture

    rows = []
    sizes = [PAPER_BATCH, 8 * PAPER_BATCH] if not args.smoke else [2048]
    targets = [device] + ([torch.device("cpu")] if device.type == "cuda" else [])
    for n in sizes:
        x_cpu = torch.from_numpy(synthetic_tokens(n).astype(np.float32))
        for target in targets:
            if target.type == "cpu" and n > PAPER_BATCH:
                continue
            x = x_cpu.to(target)
            model = DirichletProcessMixture(n_components=500 if not args.smoke else 50, device=target)
            t0 = time.perf_counter()
            model.partial_fit(x)
            sync(target)
            first = time.perf_counter() - t0
            ms = time_ms(lambda: model.partial_fit(x), target, max(3, args.reps // 2), warmup=1)
            rows.append({"where": str(target), "tokens": n, "step_ms": ms, "first_step_incl_init_s": first,
                         "active": int(model.active_.sum())})
            logging.info("%s", rows[-1])
    # a whole fit at the paper's size: 200 images x 1024 tokens, 40 epochs, on the device
    tokens = synthetic_tokens((200 if not args.smoke else 4) * 1024)
    model = DirichletProcessMixture(n_components=500 if not args.smoke else 50, device=device)
    t0 = time.perf_counter()
    model.fit(tokens, epochs=args.epochs_fit, batch_size=PAPER_BATCH)
    sync(device)
    rows.append({"where": f"{device} whole fit", "tokens": len(tokens), "epochs": args.epochs_fit,
                 "fit_s": time.perf_counter() - t0, "steps": int(model.n_iter_), "active": int(model.active_.sum())})
    return rows


# ---------------------------------------------------------------------- ceilings and report
def ceilings(device: torch.device) -> dict:
    """Measured matrix-product rates (8192^3 bf16, 4096^3 fp32 and tf32) to set the forward figures against."""
    if device.type != "cuda":
        return {}
    out = {"name": torch.cuda.get_device_name(device),
           "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
           "multiprocessors": torch.cuda.get_device_properties(device).multi_processor_count,
           "memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30}
    g = torch.Generator(device=device).manual_seed(0)
    for label, n, dtype, tf32 in (("bf16", 8192, torch.bfloat16, False), ("tf32", 4096, torch.float32, True),
                                  ("fp32", 4096, torch.float32, False)):
        a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
        b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
        with tf32_context(tf32):
            ms = time_ms(lambda: a @ b, device, 10)
        out[f"{label}_matmul_tflops"] = 2 * n**3 / ms / 1e9
    return out


def print_report(result: dict) -> None:
    info = result["environment"]
    print(f"\n{info}")
    if result.get("ceilings"):
        print(f"ceilings: {result['ceilings']}")
    print(f"\n{'model':<15}{'mode':<34}{'batch':>6}{'ms/img':>9}{'img/s':>9}{'TFLOP/s':>9}{'mean cos':>10}{'p1 cos':>9}")
    for r in result.get("forward", []):
        if "ms_per_image" in r:
            extra = f"  compile {r['compile_s']:.0f} s, x{r['speedup_vs_eager']:.2f} vs eager" if "compile_s" in r else ""
            print(f"{r['arch']:<15}{r['mode']:<34}{r['batch']:>6}{r['ms_per_image']:>9.3f}{r['images_per_s']:>9.0f}"
                  f"{r['tflops']:>9.1f}{r['mean_cos']:>10.5f}{r['p1_cos']:>9.5f}{extra}")
        elif "gib" in r:
            print(f"{r['arch']:<15}{r['mode']:<34}{r['batch']:>6}{r['gib']:>9.2f}")
        else:
            print(f"{r['arch']:<15}{r['mode']:<34}{r['batch']:>6}  {r['error']}")
    gap = result.get("backbone_gap")
    if gap:
        print(f"\nBackbone path, {gap['arch']} batch {gap['batch']} {gap['precision']}: raw forward "
              f"{gap['raw_ms_per_image']:.3f} ms/img, Backbone.encode {gap['encode_ms_per_image']:.3f} "
              f"({100 * gap['gap_encode']:+.1f} %), encode + copy to host {gap['encode_to_host_ms_per_image']:.3f} "
              f"({100 * gap['gap_encode_to_host']:+.1f} %)")
    p = result.get("pipeline")
    if p:
        print(f"\npredict end to end (DPMM, {p['predict_images']} phantom PNGs 256x256): {p['predict_images_per_s']:.1f} img/s; "
              f"fit {p['fit_images']} images in {p['fit_s']:.1f} s")
        print(f"  per image: read {p['read_ms_per_image']:.2f} ms, preprocess {p['preprocess_ms_per_image']:.2f} ms, "
              f"forward {p['forward_ms_per_image']:.3f} ms, patch scores {p['patch_scores_ms_per_image']:.3f} ms, "
              f"pixel map {p['pixel_map_ms_per_image']:.2f} ms (CPU threads {p['cpu_threads']} of {p['cpu_count']})")
        rates = {k: round(v, 1) for k, v in p.items() if "images_per_s_" in k}
        print(f"  img/s by loader/writer threads: {rates}")
    for r in result.get("em", []):
        print(f"EM {r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["dinov2_vits14", "dinov2_vitb14"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--pipeline-images", type=int, default=256, help="phantom test images predicted (0 skips)")
    parser.add_argument("--pipeline-batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=5, help="DPMM epochs in the pipeline fit")
    parser.add_argument("--epochs-fit", type=int, default=40, help="epochs of the whole EM fit at the paper's size")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (minutes of compilation)")
    parser.add_argument("--budget-s", type=float, default=420, help="skip torch.compile past this many seconds")
    parser.add_argument("--only", nargs="+", choices=("forward", "backbone_gap", "em", "pipeline"),
                        help="run these sections only")
    parser.add_argument("--smoke", action="store_true", help="tiny models, 56 px, few reps: checks the script")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("normdino").setLevel(logging.ERROR)
    if args.smoke:
        args.image_size, args.reps, args.batches = 56, 2, [1, 4]
        args.pipeline_images, args.pipeline_batch, args.epochs, args.epochs_fit = 16, 4, 1, 2
    started = time.monotonic()
    device = torch.device(args.device)
    import transformers

    result: dict = {"environment": f"torch {torch.__version__}, transformers {transformers.__version__}, device {device}"
                                   f", input {args.image_size} px, random weights"}
    result["ceilings"] = ceilings(device)
    logging.info("%s %s", result["environment"], result["ceilings"])
    pixels = phantom_pixels(max(args.batches), args.image_size)
    steps = [("forward", lambda: forward_table(args, device, pixels)),
             ("backbone_gap", lambda: backbone_gap(args, device, pixels)),
             ("em", lambda: em_steps(args, device))]
    if args.pipeline_images:
        steps.append(("pipeline", lambda: pipeline(args, device)))
    for key, step in steps:
        if args.only and key not in args.only:
            continue
        try:
            result[key] = step()
        except Exception as err:  # keep the other sections' figures
            logging.exception("section %s failed", key)
            result[key + "_error"] = repr(err)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1, default=str))
    if args.compile and device.type == "cuda":
        result.setdefault("forward", []).extend(compile_rows(args, device, pixels, started + args.budget_s))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    print_report(result)


if __name__ == "__main__":
    main()
