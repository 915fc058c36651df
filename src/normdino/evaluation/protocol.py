"""The paper's evaluation protocol for any data set in BMAD or folder layout, for normdino and its baselines.

Every method scores the same cached tokens. Thresholds come from the healthy validation images at
1/5/10 % FPR; pixel metrics stream over all evaluation pixels; runtime and peak memory are measured
per sample at batch size 1 over the detection stage (backbone + scoring), as in the paper.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from normdino.methods import scoring
from normdino.evaluation.datasets import Dataset, Sample
from normdino.evaluation.metrics import PixelScoreAccumulator, image_aupr, image_auroc
from normdino.io.reading import read_image

log = logging.getLogger(__name__)

EVAL_FPRS = (0.10, 0.05, 0.01)
METHODS = ("dpmm", "dpmm-euclidean", "dpmm-likelihood", "anomalydino", "anomalydino-1shot",
           "patchcore-10%", "patchcore-1024", "patchcore-150")
RANDOM_WARNING = ("The backbone has RANDOM weights: detection quality in this report says nothing about "
                  "DINOv2/DINOv3. Runtime and memory figures are still honest.")


@dataclass
class TokenSet:
    """Cached (N, h, w, D) float16 tokens of some images, with their sizes and (for evaluation) their samples."""

    tokens: np.ndarray
    shapes: list[tuple[int, int]]
    samples: list[Sample] = field(default_factory=list)


@dataclass
class Scorer:
    """A fitted method: (B, h, w, D) tokens -> (B, h, w) patch anomaly scores."""

    name: str
    patch_maps: Callable[[torch.Tensor], torch.Tensor]
    n_prototypes: int
    fit_seconds: float = 0.0
    state_mb: float = 0.0  # memory of what the method keeps to score with: prototypes, bank


@dataclass
class MethodResult:
    """One row of the comparison table, plus what the report draws."""

    row: dict
    accumulator: PixelScoreAccumulator
    cases: list[tuple[float, Sample]]  # (per-image Dice at 5 % FPR, sample) of the anomalous images


# ---------------------------------------------------------------------- tokens


def token_set(backbone, images: Sequence[Path], cache_dir: Path | None, batch_size: int, progress: bool,
              samples: Sequence[Sample] = ()) -> TokenSet:
    """Tokens of image files through the token cache, with each image's (H, W)."""
    from normdino.features.cache import extract_tokens
    from normdino.detector import image_shape

    tokens = extract_tokens(backbone, list(images), cache_dir=cache_dir, batch_size=batch_size, progress=progress)
    return TokenSet(tokens, [image_shape(p) for p in images], list(samples))


# ---------------------------------------------------------------------- methods


def detector_scorer(detector, name: str = "dpmm") -> Scorer:
    """A fitted :class:`AnomalyDetector` as a scorer."""
    prototypes = detector.prototypes_
    return Scorer(name, detector.patch_maps, int(prototypes.shape[0]), detector.training_summary_.get("em_seconds", 0.0),
                  prototypes.numel() * prototypes.element_size() / 2**20)


def _bank_scorer(name: str, bank, train: np.ndarray) -> Scorer:
    started = time.perf_counter()
    bank.fit(torch.from_numpy(np.asarray(train, dtype=np.float32)))
    elapsed = time.perf_counter() - started

    def patch_maps(tokens: torch.Tensor) -> torch.Tensor:
        return bank.score(tokens.reshape(-1, tokens.shape[-1])).reshape(tokens.shape[:-1])

    return Scorer(name, patch_maps, int(bank.n_prototypes_), elapsed, bank.bank_.numel() * bank.bank_.element_size() / 2**20)


def fit_methods(methods: Sequence[str], backbone, train: TokenSet, healthy: TokenSet, detector_params: dict,
                seed: int = 0) -> list[Scorer]:
    """Fit every named method on the same training tokens (the DP mixture once, whatever its score variants)."""
    from normdino.methods.baselines import Coreset, MemoryBank
    from normdino.detector import AnomalyDetector

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        from normdino.errors import InputError

        raise InputError(f"unknown method {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    d = train.tokens.shape[-1]
    flat = train.tokens.reshape(-1, d)
    scorers, fitted = [], None
    for method in methods:
        log.info("fitting %s", method)
        if method.startswith("dpmm"):
            if fitted is None:
                fitted = AnomalyDetector(backbone=backbone, seed=seed, **detector_params)
                fitted.fit_tokens(train.tokens, train.shapes, healthy.tokens, healthy.shapes)
            variant = copy.copy(fitted)
            variant.score = method.partition("-")[2] or "cosine"
            scorers.append(detector_scorer(variant, method))
        elif method == "anomalydino":
            scorers.append(_bank_scorer(method, MemoryBank(), flat))
        elif method == "anomalydino-1shot":
            shot = int(np.random.default_rng(seed).integers(len(train.shapes)))
            scorers.append(_bank_scorer(method, MemoryBank(), train.tokens[shot].reshape(-1, d)))
        else:
            size = method.partition("-")[2]
            n = float(size[:-1]) / 100 if size.endswith("%") else int(size)
            scorers.append(_bank_scorer(method, Coreset(n, seed=seed), flat))
    return scorers


# ---------------------------------------------------------------------- measuring


class PeakMemory:
    """Peak resident memory (CPU, sampled every millisecond) or peak allocated memory (CUDA) inside a block."""

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.001):
        self.device = torch.device(device)
        self.interval = interval
        self.peak_bytes = 0

    @staticmethod
    def rss_bytes() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: the process's lifetime peak is the best available
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self.rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self.peak_bytes = self.rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            return
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self.rss_bytes())


def time_detection(backbone, scorer: Scorer, images: Sequence[Path], sigma: float, top_fraction: float,
                   warmup: int = 1) -> tuple[float, float]:
    """(ms per sample, peak memory in MB) of read + backbone + scoring + upsampling at batch size 1."""
    def detect(path: Path) -> float:
        image = read_image(path)
        with torch.inference_mode():
            tokens = backbone(backbone.preprocess(image)[None])
            patch = scorer.patch_maps(tokens)[0]
        return scoring.image_score(scoring.pixel_map(patch, image.shape[:2], sigma), top_fraction)

    for path in images[:warmup]:
        detect(path)
    with PeakMemory(getattr(backbone, "device", "cpu")) as memory:
        started = time.perf_counter()
        for path in images:
            detect(path)
        elapsed = time.perf_counter() - started
    return 1000.0 * elapsed / max(1, len(images)), memory.peak_bytes / 2**20


# ---------------------------------------------------------------------- protocol


def evaluate_scorer(scorer: Scorer, healthy: TokenSet, test: TokenSet, sigma: float = 0.0,
                    top_fraction: float = 0.01, fprs: Sequence[float] = EVAL_FPRS) -> MethodResult:
    """The paper's metrics of one method: thresholds on ``healthy``, metrics over all pixels of ``test``."""
    from normdino.io.reading import read_image as read_mask

    calibration = PixelScoreAccumulator()
    for maps in scoring.pixel_maps(scorer.patch_maps, healthy.tokens, healthy.shapes, sigma):
        calibration.add(maps)
    thresholds = [calibration.threshold_at_fpr(f) for f in fprs]
    accumulator = PixelScoreAccumulator(thresholds=thresholds, track_regions=True)
    image_scores, labels, cases = [], [], []
    case_threshold = thresholds[list(fprs).index(0.05)] if 0.05 in fprs else thresholds[0]
    for maps, sample in zip(scoring.pixel_maps(scorer.patch_maps, test.tokens, test.shapes, sigma), test.samples):
        mask = read_mask(sample.mask) > 0 if sample.mask is not None else None
        accumulator.add(maps, mask)
        image_scores.append(scoring.image_score(maps, top_fraction))
        labels.append(sample.label)
        if mask is not None and mask.any():
            predicted = maps > case_threshold
            cases.append((2.0 * (predicted & mask).sum() / (predicted.sum() + mask.sum()), sample))
    row = {
        "method": scorer.name,
        "pixel_auroc": accumulator.auroc(),
        "pixel_aupr": accumulator.aupr(),
        **{f"dice_fpr{round(f * 100)}": accumulator.dice_at(t) for f, t in zip(fprs, thresholds)},
        "aupro": accumulator.aupro(0.3),
        "image_auroc": image_auroc(image_scores, labels),
        "image_aupr": image_aupr(image_scores, labels),
        "n_prototypes": scorer.n_prototypes,
        "fit_seconds": round(scorer.fit_seconds, 3),
        "scorer_memory_mb": round(scorer.state_mb, 3),
        **{f"threshold_fpr{round(f * 100)}": t for f, t in zip(fprs, thresholds)},
    }
    return MethodResult(row, accumulator, cases)


def subset(items: Sequence, n: int | None, seed: int = 0) -> list:
    """A seeded subset of at most ``n`` items, in their original order (all of them when ``n`` is None)."""
    if n is None or len(items) <= n:
        return list(items)
    keep = np.sort(np.random.default_rng(seed).choice(len(items), n, replace=False))
    return [items[i] for i in keep]


def evaluation_token_sets(backbone, dataset: Dataset, cache_dir: Path | None, batch_size: int = 8,
                          progress: bool = True, max_eval: int | None = None,
                          seed: int = 0) -> tuple[TokenSet, TokenSet]:
    """Tokens of the healthy validation images (thresholds) and of the evaluation samples (metrics).

    Images in both sets (lgg-flair evaluates on its validation split) go through the backbone once.
    With ``max_eval``, a seeded subset of each label's evaluation samples and of the healthy images is used.
    """
    from normdino.errors import InputError

    if not dataset.evaluation:
        raise InputError(f"{dataset.name} has no validation or test images to evaluate on")
    if not dataset.healthy_validation:
        raise InputError(f"{dataset.name} has no healthy validation images to set the FPR thresholds on")
    healthy = subset(dataset.healthy_validation, max_eval, seed)
    normal = [s for s in dataset.evaluation if s.label == 0]
    anomalous = [s for s in dataset.evaluation if s.label == 1]
    if max_eval is not None:
        n_anomalous = min(len(anomalous), max(1, round(max_eval * len(anomalous) / len(dataset.evaluation))))
        normal, anomalous = subset(normal, max_eval - n_anomalous, seed), subset(anomalous, n_anomalous, seed)
    evaluation = normal + anomalous
    images = list(dict.fromkeys([s.image for s in healthy] + [s.image for s in evaluation]))
    everything = token_set(backbone, images, cache_dir, batch_size, progress)
    row = {path: i for i, path in enumerate(images)}

    def pick(samples: list[Sample]) -> TokenSet:
        idx = [row[s.image] for s in samples]
        return TokenSet(everything.tokens[idx], [everything.shapes[i] for i in idx], samples)

    return pick(healthy), pick(evaluation)


def evaluate_methods(scorers: Sequence[Scorer], backbone, healthy: TokenSet, test: TokenSet, sigma: float = 0.0,
                     top_fraction: float = 0.01, timing_images: int = 10) -> list[MethodResult]:
    """Every scorer's metrics on the same tokens, plus its batch-1 runtime and peak memory."""
    timing = [s.image for s in test.samples[:timing_images]]
    results = []
    for scorer in scorers:
        log.info("evaluating %s", scorer.name)
        result = evaluate_scorer(scorer, healthy, test, sigma, top_fraction)
        ms, peak_mb = time_detection(backbone, scorer, timing, sigma, top_fraction)
        result.row.update(ms_per_sample=round(ms, 2), peak_memory_mb=round(peak_mb, 1))
        results.append(result)
    return results


# ---------------------------------------------------------------------- outputs

TABLE_COLUMNS = ("method", "pixel_auroc", "pixel_aupr", "dice_fpr10", "dice_fpr5", "dice_fpr1", "aupro",
                 "image_auroc", "ms_per_sample", "peak_memory_mb", "scorer_memory_mb", "n_prototypes")
_HEADERS = {"method": "method", "pixel_auroc": "AUROC", "pixel_aupr": "AUPR", "dice_fpr10": "Dice@10%",
            "dice_fpr5": "Dice@5%", "dice_fpr1": "Dice@1%", "aupro": "AUPRO", "image_auroc": "image AUROC",
            "ms_per_sample": "ms/sample", "peak_memory_mb": "peak RSS MB", "scorer_memory_mb": "scorer MB",
            "n_prototypes": "prototypes"}


def _cell(value) -> str:
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def markdown_table(rows: Sequence[dict]) -> str:
    """The comparison table in Markdown, with the paper's columns."""
    lines = ["| " + " | ".join(_HEADERS[c] for c in TABLE_COLUMNS) + " |",
             "|" + "|".join("---" if c == "method" else "---:" for c in TABLE_COLUMNS) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in TABLE_COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def _case_overlays(result: MethodResult, scorer: Scorer, backbone, sigma: float, n: int) -> list[tuple[str, np.ndarray]]:
    """Overlays of the ``n`` best and ``n`` worst anomalous images by per-image Dice at 5 % FPR."""
    from normdino.io import rendering

    ranked = sorted(result.cases, key=lambda c: c[0])
    picks = [("worst", c) for c in ranked[:n]] + [("best", c) for c in ranked[::-1][:n]]
    threshold = result.row.get("threshold_fpr5", result.row.get("threshold_fpr10"))
    low = result.accumulator.threshold_at_fpr(0.5) if result.accumulator.n_normal_ else 0.0
    items = []
    for kind, (dice_value, sample) in picks:
        image = read_image(sample.image)
        with torch.inference_mode():
            patch = scorer.patch_maps(backbone(backbone.preprocess(image)[None]))[0]
        maps = scoring.pixel_map(patch, image.shape[:2], sigma)
        true_mask = read_image(sample.mask) > 0
        vmin, vmax = rendering.score_color_range(low, low + 1.25 * (threshold - low))  # any sign of score
        overlay = rendering.overlay_image(image, maps, maps > threshold, vmin, vmax, true_mask=true_mask)
        items.append((f"{kind}: {sample.image.name} (Dice {dice_value:.2f})", overlay))
    return items


def write_outputs(results: Sequence[MethodResult], scorers: Sequence[Scorer], backbone, out_dir: Path,
                  title: str, context: dict, json_path: Path | None = None, sigma: float = 0.0,
                  n_cases: int = 3, per_item: list[dict] | None = None) -> dict[str, Path]:
    """results.json (rows + context), results.md, report.html with curves, histograms and case overlays."""
    import json

    from normdino.evaluation import report
    from normdino.files import atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [r.row for r in results]
    paths = {"json": json_path or out_dir / "results.json", "markdown": out_dir / "results.md",
             "html": out_dir / "report.html"}
    random_weights = bool(getattr(backbone, "is_random", False))
    warning = RANDOM_WARNING if random_weights else None
    payload = {"title": title, "context": context, "random_backbone": random_weights, "rows": rows}
    if per_item is not None:
        payload["per_item"] = per_item
    atomic_write_text(paths["json"], json.dumps(payload, indent=2, default=float) + "\n")
    markdown = f"# {title}\n\n" + (f"> **Warning:** {warning}\n\n" if warning else "") + markdown_table(rows) + "\n"
    atomic_write_text(paths["markdown"], markdown)

    roc = [(r.row["method"], *r.accumulator.roc_curve(400)[:2]) for r in results]
    pr = [(r.row["method"], *r.accumulator.pr_curve(400)[1::-1]) for r in results]
    sections = [("Results", report.html_table(rows, list(TABLE_COLUMNS))),
                ("Setting", report.html_table([{"key": k, "value": str(v)} for k, v in context.items()], ["key", "value"])),
                ("Curves", report.charts_row(
                    report.svg_curve([], [], "Pixel ROC", "false-positive rate", "true-positive rate", diagonal=True,
                                     series=roc, xlim=(0, 1), ylim=(0, 1)),
                    report.svg_curve([], [], "Pixel precision-recall", "recall", "precision", series=pr,
                                     xlim=(0, 1), ylim=(0, 1))))]
    histograms = []
    for r in results:
        edges, normal, anomalous = r.accumulator.histograms(60)
        histograms.append(report.svg_histograms(normal, anomalous, edges, f"{r.row['method']}: pixel scores"))
    sections.append(("Score distributions", report.charts_row(*histograms)))
    if per_item:
        sections.append(("Per item", report.html_table(per_item, list(per_item[0]))))
    for result, scorer in zip(results, scorers):
        if result.cases:
            sections.append((f"Best and worst cases: {scorer.name}",
                             report.image_grid_html(_case_overlays(result, scorer, backbone, sigma, n_cases))))
    report.html_report(paths["html"], title, sections, warning=warning)
    return paths
