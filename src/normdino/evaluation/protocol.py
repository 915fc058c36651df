"""The paper's evaluation protocol for any data set in BMAD or folder layout, for normdino and its baselines.

Every method scores the same cached tokens. Thresholds come from the healthy validation images at
1/5/10 % FPR; pixel metrics stream over all evaluation pixels; runtime is measured per sample at batch
size 1 as the paper defines it, backbone and scoring apart, every method interleaved image by image; peak
memory in a pass of its own (:mod:`normdino.evaluation.timing` says what each column includes).
"""

from __future__ import annotations

import html
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from normdino import distributed as dist
from normdino.evaluation.datasets import Dataset, Sample
from normdino.features.tokens import Tokens, TokenSet, pick_layers
from normdino.methods import scoring
from normdino.evaluation.accumulator import PixelScoreAccumulator
from normdino.evaluation.scorers import Scorer
from normdino.evaluation.timing import TIMING_NOTE, UNTIMED, encode_image, time_methods
from normdino.io.reading import read_image

log = logging.getLogger(__name__)

EVAL_FPRS = (0.10, 0.05, 0.01)
RANDOM_WARNING = ("The backbone has RANDOM weights: detection quality in this report says nothing about "
                  "DINOv2/DINOv3. Runtime and memory figures are still honest.")


@dataclass
class LabelledTokens:
    """Tokens of evaluation images (all layers any method asked for) with their samples (label, mask).

    Under torchrun ``samples`` (and ``tokens``) are this rank's contiguous share of ``all_samples``, the share
    beginning at position ``start``; in a plain run ``all_samples`` is None and the share is everything.
    """

    tokens: TokenSet
    samples: list[Sample] = field(default_factory=list)
    all_samples: list[Sample] | None = None
    start: int = 0

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return self.tokens.shapes

    @property
    def every_sample(self) -> list[Sample]:
        """Every sample of the set (all ranks' shares together; ``samples`` in a plain run)."""
        return self.samples if self.all_samples is None else self.all_samples


@dataclass
class MethodResult:
    """One row of the comparison table, plus what the report draws."""

    row: dict
    accumulator: PixelScoreAccumulator
    cases: list[tuple[float, Sample]]  # (per-image Dice at 5 % FPR, sample) of the anomalous images


# ---------------------------------------------------------------------- tokens


def token_set(backbone, images: Sequence[Path], cache_dir: Path | None, batch_size: int, progress: bool,
              cls: bool = False) -> TokenSet:
    """Tokens of image files through the token cache (every layer the backbone was built with)."""
    from normdino.features.cache import extract_tokens

    return extract_tokens(backbone, list(images), cache_dir=cache_dir, batch_size=batch_size, progress=progress, cls=cls)


# ---------------------------------------------------------------------- methods


def _resolved(layer: int, depth: int | None) -> int:
    """A layer number as the backbone counts it (0..depth; -1 = depth), when the depth is known."""
    return layer % (depth + 1) if depth is not None else layer


def feature_union(methods: Sequence, depth: int | None = None) -> tuple[tuple[int, ...], bool]:
    """The layers (in first-asked order) and CLS flag one shared forward pass must give for all ``methods``.

    With the backbone's ``depth``, -1 and the last block's number are one layer, extracted once.
    """
    layers: list[int] = []
    for method in methods:
        for layer in method.feature_request().layers:
            if _resolved(layer, depth) not in layers:
                layers.append(_resolved(layer, depth))
    return tuple(layers), any(m.feature_request().cls for m in methods)


def layer_positions(method, layers: Sequence[int], depth: int | None = None) -> list[int]:
    """Positions in the shared ``layers`` of the layers ``method`` asked for."""
    return [list(layers).index(_resolved(layer, depth)) for layer in method.feature_request().layers]


def detector_scorer(detector, name: str | None = None) -> Scorer:
    """A fitted :class:`AnomalyDetector`'s method as a scorer on tokens of its own backbone."""
    method = detector.method_
    return Scorer(name or detector.method_name, method, list(range(len(method.feature_request().layers))),
                  detector.training_summary_.get("fit_seconds", 0.0))


def create_methods(names: Sequence[str], seed: int = 0, **params) -> list:
    """Unfitted methods by registry name; ``params`` are hyper-parameters (each method takes those it has)."""
    from normdino.methods import registry

    return [registry.create(name, **{"seed": seed, **params}) for name in names]


def fit_methods(methods: Sequence, layers: Sequence[int], train: TokenSet, healthy: TokenSet,
                device: torch.device | str = "cpu", progress: bool = False, depth: int | None = None) -> list[Scorer]:
    """Fit every method on the same shared tokens; DPMM score variants share one fitted mixture."""
    scorers: list[Scorer] = []
    fitted_dpmm: dict[str, object] = {}
    for method in methods:
        positions = layer_positions(method, layers, depth)
        log.info("fitting %s", method.name)
        method.to(device)
        method.progress = progress
        key = _dpmm_key(method)
        started = time.perf_counter()
        if key is not None and key in fitted_dpmm:
            method.load_state_dict(fitted_dpmm[key].state_dict(), fitted_dpmm[key].fit_info())
            elapsed = fitted_dpmm[key].fit_info().get("em_seconds", 0.0)
        else:
            method.fit(pick_layers(train, positions), pick_layers(healthy, positions))
            elapsed = time.perf_counter() - started
            if key is not None:
                fitted_dpmm[key] = method
        scorers.append(Scorer(method.name, method, positions, elapsed))
    return scorers


def _dpmm_key(method) -> str | None:
    """Methods equal but for the score share one fitted mixture (the paper's ablation scores one model)."""
    if type(method).__name__ != "DPMM":
        return None
    params = {k: v for k, v in method.get_params().items() if k != "score"}
    return repr(sorted(params.items()))


# ---------------------------------------------------------------------- protocol


def subset(items: Sequence, n: int | None, seed: int = 0) -> list:
    """A seeded subset of at most ``n`` items, in their original order (all of them when ``n`` is None)."""
    if n is None or len(items) <= n:
        return list(items)
    keep = np.sort(np.random.default_rng(seed).choice(len(items), n, replace=False))
    return [items[i] for i in keep]


def evaluation_token_sets(backbone, dataset: Dataset, cache_dir: Path | None, batch_size: int = 8,
                          progress: bool = True, max_eval: int | None = None,
                          seed: int = 0, cls: bool = False) -> tuple[LabelledTokens, LabelledTokens]:
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
    if dist.is_distributed():  # under torchrun each rank extracts its contiguous share of each list
        for what, items in (("healthy calibration", healthy), ("evaluation", evaluation)):
            if len(items) < dist.world_size():
                raise InputError(f"{len(items)} {what} images cannot be shared by {dist.world_size()} processes; "
                                 "start at most that many")
    shares = list(dist.shard(healthy)), list(dist.shard(evaluation))
    images = list(dict.fromkeys([s.image for s in shares[0]] + [s.image for s in shares[1]]))
    with dist.failing_together("token extraction"):
        everything = token_set(backbone, images, cache_dir, batch_size, progress, cls=cls)
    row = {path: i for i, path in enumerate(images)}

    def pick(samples: list[Sample], share: list[Sample]) -> LabelledTokens:
        tokens = everything.subset([row[s.image] for s in share])
        if not dist.is_distributed():
            return LabelledTokens(tokens, samples)
        return LabelledTokens(tokens, share, samples, dist.shard_range(len(samples))[0])

    return pick(healthy, shares[0]), pick(evaluation, shares[1])


def evaluate_methods(scorers: Sequence[Scorer], backbone, healthy: LabelledTokens, test: LabelledTokens,
                     sigma: float = 0.0, top_fraction: float = 0.01, timing_images: int = 10, *,
                     foreground=None, n_bootstrap: int = 0, seed: int = 0, progress: bool = False) -> list:
    """Every scorer's metrics on the same tokens, plus its batch-1 runtime (all scorers interleaved image by image,
    :func:`time_methods`) and peak memory (a separate pass).

    Thresholds are out of sample (evaluation.splits: patients shared by the healthy and evaluated images are
    cross-fitted in two folds); ``foreground`` adds foreground-only numbers; ``n_bootstrap`` 95 % intervals.
    Returns :class:`normdino.evaluation.assess.AssessedResult` rows (a MethodResult plus per-image statistics).
    """
    from tqdm.auto import tqdm

    from normdino.evaluation.assess import assess_scorer
    from normdino.evaluation.splits import calibration_folds

    timing = [s.image for s in test.every_sample[:timing_images]]  # under torchrun: rank 0 times, the others wait
    folds = calibration_folds([s.image for s in healthy.every_sample], [s.image for s in test.every_sample], seed)
    log.info("thresholds: %s", folds.description)
    results = []
    for scorer in tqdm(scorers, desc="evaluating methods", disable=not progress):
        log.info("evaluating %s", scorer.name)
        result = assess_scorer(scorer, healthy, test, sigma=sigma, top_fraction=top_fraction,
                               device=getattr(backbone, "device", "cpu"), folds=folds, foreground=foreground,
                               n_bootstrap=n_bootstrap, seed=seed, progress=progress)
        result.row["calibration"] = folds.description
        results.append(result)
    timings = [UNTIMED] * len(scorers)
    with dist.failing_together("timing"):
        if timing and dist.is_main():
            log.info("timing %d methods on %d images, interleaved", len(scorers), len(timing))
            timings = time_methods(backbone, scorers, timing, sigma, top_fraction)
    for result, measured in zip(results, timings):
        result.row.update(measured.row())
    return results


# ---------------------------------------------------------------------- outputs

TABLE_COLUMNS = ("method", "pixel_auroc", "pixel_aupr", "dice_fpr10", "dice_fpr5", "dice_fpr1", "aupro",
                 "image_auroc", "backbone_ms", "scoring_ms", "ms_per_sample", "peak_memory_mb", "scoring_state_mb",
                 "saved_state_mb", "n_prototypes")
_HEADERS = {"method": "method", "pixel_auroc": "AUROC", "pixel_aupr": "AUPR", "dice_fpr10": "Dice@10%",
            "dice_fpr5": "Dice@5%", "dice_fpr1": "Dice@1%", "aupro": "AUPRO", "image_auroc": "image AUROC",
            "backbone_ms": "backbone ms", "scoring_ms": "scoring ms", "ms_per_sample": "ms/sample (sum)",
            "peak_memory_mb": "peak memory MB", "scoring_state_mb": "scoring state MB",
            "saved_state_mb": "saved state MB",
            "n_prototypes": "prototypes"}


FOREGROUND_COLUMNS = ("method", "fg_pixel_auroc", "fg_pixel_aupr", "fg_dice_fpr10", "fg_dice_fpr5", "fg_dice_fpr1",
                      "fg_fraction")
_HEADERS.update({f"fg_{k}": v for k, v in _HEADERS.items() if k != "method"}, fg_fraction="foreground share")
UNDEFINED_NOTE = ("'—' marks an undefined metric (AUROC with one class only, AUPR or Dice without anomalous pixels, "
                  "no timing); results.json writes it as null, since bare NaN is not valid JSON.")


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "—"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def _with_interval(row: dict, column: str) -> str:
    text = _cell(row.get(column, ""))
    interval = row.get(f"{column}_ci")
    if interval and text != "—" and all(v is not None and v == v for v in interval):
        text += f" [{interval[0]:.3f}, {interval[1]:.3f}]"
    return text


def markdown_table(rows: Sequence[dict], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """The comparison table in Markdown, with the paper's columns (and 95 % intervals where computed)."""
    lines = ["| " + " | ".join(_HEADERS[c] for c in columns) + " |",
             "|" + "|".join("---" if c == "method" else "---:" for c in columns) + "|"]
    lines += ["| " + " | ".join(_with_interval(row, c) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def comparisons_markdown(comparisons: Sequence[dict]) -> str:
    """Paired permutation tests as a Markdown table."""
    lines = ["| A | B | metric | mean A | mean B | A − B | p | images | permutations |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {c['a']} | {c['b']} | {c['metric']} | {_cell(c['mean_a'])} | {_cell(c['mean_b'])} | "
              f"{_cell(c['mean_difference'])} | {_cell(c['p_value'])} | {c['n_images']} | {c['permutations']} |"
              for c in comparisons]
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
            patch = scorer.patch_maps(encode_image(backbone, image))[0].float().cpu()
        maps = scoring.pixel_map(patch, image.shape[:2], sigma)
        true_mask = read_image(sample.mask) > 0
        vmin, vmax = rendering.score_color_range(low, low + 1.25 * (threshold - low))  # any sign of score
        overlay = rendering.overlay_image(image, maps, maps > threshold, vmin, vmax, true_mask=true_mask)
        items.append((f"{kind}: {sample.image.name} (Dice {dice_value:.2f})", overlay))
    return items


def write_outputs(results: Sequence[MethodResult], scorers: Sequence[Scorer], backbone, out_dir: Path,
                  title: str, context: dict, json_path: Path | None = None, sigma: float = 0.0,
                  n_cases: int = 3, per_item: list[dict] | None = None,
                  comparisons: list[dict] | None = None, summary_rows: list[dict] | None = None) -> dict[str, Path]:
    """results.json (rows + context, strict JSON), results.md, report.html with curves, histograms and case overlays."""
    import json

    from normdino.io import report
    from normdino.files import atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [r.row for r in results] + list(summary_rows or [])  # summary rows: few-shot max/mean/min over seeds
    paths = {"json": json_path or out_dir / "results.json", "markdown": out_dir / "results.md",
             "html": out_dir / "report.html"}
    random_weights = bool(getattr(backbone, "is_random", False))
    warning = RANDOM_WARNING if random_weights else None
    payload = {"title": title, "context": context, "random_backbone": random_weights, "rows": rows}
    if per_item is not None:
        payload["per_item"] = per_item
    if comparisons:
        payload["comparisons"] = comparisons
    atomic_write_text(paths["json"], json.dumps(report.json_safe(payload), indent=2, allow_nan=False) + "\n")
    foreground = any("fg_pixel_auroc" in row for row in rows)
    markdown = (f"# {title}\n\n" + (f"> **Warning:** {warning}\n\n" if warning else "") + markdown_table(rows) + "\n"
                + (f"\n## Foreground pixels only\n\n{markdown_table(rows, FOREGROUND_COLUMNS)}\n" if foreground else "")
                + (f"\n## Paired permutation tests\n\n{comparisons_markdown(comparisons)}\n" if comparisons else "")
                + f"\n{UNDEFINED_NOTE}\n\n{TIMING_NOTE}\n")
    atomic_write_text(paths["markdown"], markdown)

    roc = [(r.row["method"], *r.accumulator.roc_curve(400)[:2]) for r in results]
    pr = [(r.row["method"], *r.accumulator.pr_curve(400)[1::-1]) for r in results]
    sections = [("Results", report.html_table(rows, list(TABLE_COLUMNS), headers=_HEADERS)
                 + f"<p>{UNDEFINED_NOTE}</p><p>{html.escape(TIMING_NOTE)}</p>")]
    if foreground:
        sections.append(("Foreground pixels only", report.html_table(rows, list(FOREGROUND_COLUMNS), headers=_HEADERS)))
    if comparisons:
        sections.append(("Paired permutation tests", report.html_table(report.json_safe(comparisons), list(comparisons[0]))))
    sections += [
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
