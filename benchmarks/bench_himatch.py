"""HiMatch, its ablations, dpmm, dpmm-multistage and anomalydino on the same tokens: fit time, ms/image, state memory.

Tokens come from ``Backbone.random("dinov3_vits16")`` (stages 3 6 9 12, CLS) on seeded subsets of lgg-flair,
extracted once and cached under ``--cache``. RANDOM WEIGHTS: time and memory are honest; the pixel AUROC/AUPR
columns are NOT DINOv3's quality and only compare the methods' mechanics on the same (random-feature) tokens.
A synthetic section (known planted anomalies, stage-dependent noise) measures the design choices with ground truth.

    python benchmarks/bench_himatch.py /work/shared/data/lgg-flair --max-train 64 --max-good 16 --max-ungood 32
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from normdino.evaluation.metrics import pixel_aupr, pixel_auroc  # noqa: E402
from normdino.features.tokens import TokenSet, pick_layers  # noqa: E402
from normdino.methods import create  # noqa: E402

STAGES = (3, 6, 9, 12)
FAST_DPMM = dict(epochs=5)
ROWS = [  # (label, method, params); all himatch rows keep the defaults except what the label says
    ("himatch (default: dual, mean descriptor, 32 clusters/image, uncertainty)", "himatch", {}),
    ("himatch CLS-only retrieval", "himatch", dict(retrieval="cls")),
    ("himatch patch-only retrieval", "himatch", dict(retrieval="patch")),
    ("himatch single stage (block 12)", "himatch", dict(layers=[12])),
    ("himatch mean fusion", "himatch", dict(fusion="mean")),
    ("himatch pixel fusion", "himatch", dict(fusion="pixel")),
    ("himatch centroid descriptor (8/image)", "himatch", dict(descriptor="centroids")),
    ("himatch clusters per retrieved set", "himatch", dict(cluster_scope="retrieved")),
    ("himatch 8 clusters/image", "himatch", dict(clusters=8)),
    ("himatch 64 clusters/image", "himatch", dict(clusters=64)),
    ("himatch no clustering (every token)", "himatch", dict(clusters=0)),
    ("dpmm (block 12, 5 epochs)", "dpmm", dict(FAST_DPMM, layer=12)),
    ("dpmm-multistage (5 epochs/stage, uncertainty)", "dpmm-multistage", dict(FAST_DPMM)),
    ("dpmm-multistage mean fusion", "dpmm-multistage", dict(FAST_DPMM, fusion="mean")),
    ("anomalydino (block 12, full bank)", "anomalydino", dict(layer=12)),
    # per-image vs per-retrieved-set clusters at a size the retrieved scope can afford (k = 3, 16 reliability images)
    ("himatch k=3, clusters per image", "himatch", dict(retrieve_k=3, reliability_images=16)),
    ("himatch k=3, clusters per retrieved set", "himatch", dict(retrieve_k=3, reliability_images=16, cluster_scope="retrieved")),
]


# ---------------------------------------------------------------------------------------------- lgg-flair tokens
def _patient(path: Path) -> str:
    return re.sub(r"_\d+$", "", path.stem)


def _pick(paths: list[Path], count: int, rng: np.random.Generator) -> list[Path]:
    return sorted(paths) if count >= len(paths) else sorted(rng.choice(sorted(paths), count, replace=False).tolist())


def extract(root: Path, args) -> dict:
    """Cached float16 tokens (N, 4, h, w, 384) and CLS (N, 4, 384) of the seeded subsets, plus masks."""
    key = f"s{args.image_size}-t{args.max_train}-g{args.max_good}-u{args.max_ungood}-seed{args.seed}"
    cache = Path(args.cache) / f"lgg-{key}.npz"
    if cache.exists():
        data = dict(np.load(cache, allow_pickle=False))
        data["extract_seconds_per_image"] = float(data["extract_seconds_per_image"])
        return data
    from normdino.features.backbone import Backbone

    rng = np.random.default_rng(args.seed)
    train = _pick(list((root / "train/good").glob("*.png")), args.max_train, rng)
    good = _pick(list((root / "valid/good/img").glob("*.png")), args.max_good, rng)
    ungood = _pick(list((root / "valid/Ungood/img").glob("*.png")), args.max_ungood, rng)
    backbone = Backbone.random("dinov3_vits16", layers=STAGES, image_size=args.image_size)
    paths = train + good + ungood
    patches = np.empty((len(paths), len(STAGES), *backbone.grid_shape(), backbone.embed_dim), np.float16)
    cls = np.empty((len(paths), len(STAGES), backbone.embed_dim), np.float16)
    started = time.perf_counter()
    with torch.inference_mode():
        for start, out in backbone.iter_encoded(paths, batch_size=4, progress=False):
            patches[start:start + len(out.patch_tokens)] = out.patch_tokens.numpy()
            cls[start:start + len(out.cls_tokens)] = out.cls_tokens.numpy()
    seconds = (time.perf_counter() - started) / len(paths)
    masks = np.zeros((len(good) + len(ungood), 256, 256), bool)
    for i, p in enumerate(ungood):
        masks[len(good) + i] = np.asarray(Image.open(root / "valid/Ungood/label" / p.name)) > 0
    data = dict(patches=patches, cls=cls, masks=masks, n_train=len(train),
                sources=np.array([_patient(p) for p in paths]), extract_seconds_per_image=seconds)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **data)
    return data


# ---------------------------------------------------------------------------------------------- synthetic tokens
def synthetic(seed: int = 0, n_train: int = 60, n_test: int = 30, grid: int = 16, dim: int = 64) -> dict:
    """Known ground truth: 4 'slice levels' of per-position templates, stage-dependent noise, planted blobs.

    Stage noise (0.9, 0.5, 0.35, 0.7) makes stages unequally reliable; anomaly strength (0.4, 0.8, 1.2, 1.2)
    grows with depth. Half of the test images hold one rectangular anomaly of 2-5 patches a side.
    """
    g = np.random.default_rng(seed)
    n_stage, levels = 4, 4
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    common = g.normal(size=(n_stage, grid, grid, dim))
    per_level = g.normal(size=(levels, n_stage, grid, grid, dim))
    templates = unit(common[None] + 0.8 * per_level)
    noise = np.array([0.9, 0.5, 0.35, 0.7])[:, None, None, None]
    strength = np.array([0.4, 0.8, 1.2, 1.2])[:, None]

    def images(n):
        level = g.integers(levels, size=n)
        patches = unit(templates[level] + noise[None] * g.normal(size=(n, n_stage, grid, grid, dim)) / np.sqrt(dim))
        cls = unit(per_level[level].mean((2, 3)) + 0.05 * g.normal(size=(n, n_stage, dim)))
        return patches, cls

    train_p, train_c = images(n_train)
    test_p, test_c = images(n_test)
    labels = np.zeros((n_test, grid, grid), bool)
    for i in range(n_test // 2):
        hh, ww = g.integers(2, 6, size=2)
        y, x = g.integers(0, grid - hh), g.integers(0, grid - ww)
        labels[i, y:y + hh, x:x + ww] = True
        direction = unit(g.normal(size=(n_stage, dim)))
        test_p[i, :, y:y + hh, x:x + ww] = unit(test_p[i, :, y:y + hh, x:x + ww] + (strength * direction)[:, None, None])
    return dict(patches=np.concatenate([train_p, test_p]).astype(np.float16),
                cls=np.concatenate([train_c, test_c]).astype(np.float16), n_train=n_train, labels=labels,
                sources=np.array([str(i) for i in range(n_train + n_test)]))


# ---------------------------------------------------------------------------------------------- running a row
def _positions(method) -> list[int]:
    """Positions in STAGES of the layers the method requests (-1 = block 12)."""
    return [STAGES.index(layer % (STAGES[-1] + 1)) for layer in method.feature_request().layers]


def run_row(name: str, params: dict, data: dict, pixel_shape: tuple[int, int] | None, time_images: int) -> dict:
    n_train = int(data["n_train"])
    if "layers" not in params and name in ("himatch", "dpmm-multistage") and data["patches"].shape[1] != 4:
        raise ValueError("tokens must hold four stages")
    method = create(name, seed=0, **params)
    positions = _positions(method)
    patches, cls = data["patches"][:, positions], data["cls"][:, positions]
    shapes = [(256, 256)] * len(patches)
    train = TokenSet(patches[:n_train], shapes[:n_train], cls[:n_train], [str(s) for s in data["sources"][:n_train]])
    test = TokenSet(patches[n_train:], shapes[n_train:], cls[n_train:])
    started = time.perf_counter()
    method.fit(train)
    fit_seconds = time.perf_counter() - started
    with torch.no_grad():
        maps = torch.cat([method.patch_scores(b) for b in test.batches(16)])
        method.patch_scores(test.batch(0, 1))  # warm-up, not timed
        timings = []
        for i in range(min(time_images, len(test))):
            one = test.batch(i, i + 1)
            t0 = time.perf_counter()
            method.patch_scores(one)
            timings.append(time.perf_counter() - t0)
    if pixel_shape is None:  # synthetic: patch-level ground truth
        scores, masks = maps.numpy(), data["labels"]
    else:
        scores = F.interpolate(maps[:, None], size=pixel_shape, mode="bilinear", align_corners=False)[:, 0].numpy()
        masks = data["masks"]
    return {"method": name, "params": params, "pixel_auroc": round(pixel_auroc(list(scores), list(masks)), 4),
            "pixel_aupr": round(pixel_aupr(list(scores), list(masks)), 4), "fit_s": round(fit_seconds, 2),
            "ms_per_image": round(1000 * float(np.median(timings)), 1), "state_mb": round(method.state_bytes() / 2**20, 2),
            "stage_weights": method.fit_info().get("stage_weights")}


def header(title: str) -> str:
    return (f"\n### {title}\n\n| row | pixel AUROC | pixel AUPR | fit s | ms/image | × first row | state MB | load avg |"
            "\n|---|---|---|---|---|---|---|---|")


def line(label: str, r: dict, baseline_ms: float) -> str:
    return (f"| {label} | {r['pixel_auroc']:.3f} | {r['pixel_aupr']:.3f} | {r['fit_s']:.1f} | "
            f"{r['ms_per_image']:.1f} | {r['ms_per_image'] / baseline_ms:.2f} | {r['state_mb']:.2f} | "
            f"{r['load_average']:.1f} |")


def run_rows(rows: list, data: dict, pixel_shape, time_images: int) -> list[dict]:
    """Run and print row by row (a slow row never hides the finished ones).

    The cores are shared, so each row also prints its ms/image as a ratio to the first row of the same run
    and the 1-minute load average when it finished.
    """
    results = []
    for label, name, params in rows:
        results.append(run_row(name, params, data, pixel_shape, time_images))
        results[-1]["load_average"] = round(os.getloadavg()[0], 1)
        print(line(label, results[-1], max(results[0]["ms_per_image"], 1e-3)), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--max-train", type=int, default=64)
    parser.add_argument("--max-good", type=int, default=16)
    parser.add_argument("--max-ungood", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-images", type=int, default=8, help="images timed one by one (batch 1) per row")
    parser.add_argument("--rows", default="", help="comma-separated row numbers (0-based) to run; default all")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--skip-lgg", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the methods (extraction uses the default); "
                        "1 keeps small-tensor timings stable on a shared machine")
    parser.add_argument("--cache", default="/tmp/normdino-bench-himatch")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    chosen = [ROWS[int(i)] for i in args.rows.split(",")] if args.rows else ROWS
    data = None if args.skip_lgg else extract(args.data, args)
    torch.set_num_threads(args.threads)
    report: dict = {"threads": torch.get_num_threads()}
    if data is not None:
        report["extract_seconds_per_image"] = data["extract_seconds_per_image"]
        print(header(f"lgg-flair, RANDOM-weight dinov3_vits16 at {args.image_size} px ({int(data['n_train'])} train, "
                     f"{len(data['masks'])} eval images): quality NOT DINOv3's"), flush=True)
        report["lgg"] = run_rows(chosen, data, (256, 256), args.time_images)
    if not args.skip_synthetic:
        print(header("synthetic tokens (16x16 grid, D=64, 4 stages; ground truth known)"), flush=True)
        report["synthetic"] = run_rows(chosen, synthetic(), None, args.time_images)
    report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if data is not None:
        print(f"\nbackbone extraction {1000 * data['extract_seconds_per_image']:.0f} ms/image (batch 4, 4 stages)")
    print(f"peak RSS {report['peak_rss_mb']:.0f} MB; torch threads {report['threads']}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
