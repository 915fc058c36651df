"""End-to-end timing: fit on lgg-flair/train (extraction and EM separately) and predict overhead vs the backbone alone.

    python benchmarks/bench_pipeline.py                       # ViT-S/14 architecture, random weights, 448 px, 40 epochs
    python benchmarks/bench_pipeline.py --epochs 5 --max-train 200 --n-predict 32   # a quicker look

Random weights give honest time and memory, never honest detection quality: no quality number is printed.
"""

from __future__ import annotations

import argparse
import logging
import resource
import tempfile
import time
from pathlib import Path

import torch

from normdino import AnomalyDetector
from normdino.io.reading import read_image
from normdino.io.writing import PredictionWriter

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "lgg-flair"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def backbone_only_seconds(backbone, paths: list[Path], batch_size: int) -> float:
    """Seconds of the model's forward passes alone on already preprocessed batches (the baseline)."""
    batches = [torch.stack([backbone.preprocess(read_image(p)) for p in paths[i:i + batch_size]])
               for i in range(0, len(paths), batch_size)]
    backbone(batches[0])  # warm-up
    started = time.perf_counter()
    for batch in batches:
        backbone(batch)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--backbone", default="random", help="'random' (ViT-S/14 architecture) or a local model folder")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--components", type=int, default=500)
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--n-predict", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cache-dir", type=Path, default=None, help="token cache (default: a fresh temp folder, so extraction is timed cold)")
    parser.add_argument("--model", type=Path, default=None, help="skip the fit and time predict with this model")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    work = Path(tempfile.mkdtemp(prefix="normdino-bench-pipeline-"))
    train = sorted((args.data / "train" / "good").glob("*.png"))[: args.max_train]
    val = sorted((args.data / "valid" / "good" / "img").glob("*.png"))
    print(f"torch threads: {torch.get_num_threads()}   data: {args.data}")
    if args.model is None:
        detector = AnomalyDetector(backbone=args.backbone, image_size=args.image_size, epochs=args.epochs,
                                   n_components=args.components, cache_dir=args.cache_dir or work / "cache",
                                   batch_size=args.batch_size, progress=False)
        started = time.perf_counter()
        detector.fit(train, val)
        total = time.perf_counter() - started
        summary = detector.training_summary_
        model_path = detector.save(work / "model.normdino")
        print("\nfit")
        print("| images train/val | tokens | extraction s | EM s | EM s/epoch | total s | prototypes | best epoch | peak RSS MB |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        print(f"| {len(train)}/{len(val)} | {summary['n_train_tokens']} | {summary['extraction_seconds']:.1f} | "
              f"{summary['em_seconds']:.1f} | {summary['em_seconds'] / args.epochs:.2f} | {total:.1f} | "
              f"{summary['n_prototypes']} | {summary['best_epoch']} | {peak_rss_mb():.0f} |")
    else:
        model_path = args.model

    detector = AnomalyDetector.load(model_path, progress=False)
    detector.batch_size = args.batch_size
    paths = sorted((args.data / "valid" / "Ungood" / "img").glob("*.png"))[: args.n_predict]
    baseline = backbone_only_seconds(detector.backbone_, paths, args.batch_size)
    writer = PredictionWriter(detector, work / "predict", progress=False, overwrite=True)
    writer.write_images(paths[: args.batch_size])  # warm-up
    writer = PredictionWriter(detector, work / "predict", progress=False, overwrite=True)
    started = time.perf_counter()
    writer.write_images(paths)
    writer.finish()
    pipeline = time.perf_counter() - started
    n = len(paths)
    print("\npredict (read + preprocess + backbone + score + upsample + write 16-bit PNG, .npy, mask, overlay, CSV)")
    print("| images | backbone alone ms/img | normdino predict ms/img | overhead |")
    print("|---:|---:|---:|---:|")
    print(f"| {n} | {1000 * baseline / n:.1f} | {1000 * pipeline / n:.1f} | {100 * (pipeline / baseline - 1):+.1f} % |")
    print(f"\nprototypes: {detector.prototypes_.shape[0]}   outputs: {work}")


if __name__ == "__main__":
    main()
