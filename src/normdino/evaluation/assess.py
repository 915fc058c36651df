"""One method's metrics with everything a table needs: out-of-sample thresholds, foreground numbers, bootstrap
intervals, per-image statistics for paired tests (timing and memory: ``timing.time_methods``).

Thresholds: fold k of the evaluated images is scored with thresholds set on the healthy images that
calibrate fold k (:class:`~normdino.evaluation.splits.CalibrationFolds`; one fold when the two sets share
no patient). Pooled Dice sums each image's TP/FP/FN at its own fold's thresholds. With a foreground, the
same is done again on foreground pixels only (thresholds from healthy foreground pixels): keys ``fg_*``.

Under torchrun (token sets that are this rank's share, ``all_samples`` set) each rank scores its share; the
calibration accumulators are merged before thresholds are taken, the evaluation accumulators merged, and the
per-image statistics, image scores, labels and cases gathered in input order, so every number (bootstrap
intervals on rank 0 included) equals a one-process run's; AUPRO's region weights are float sums, equal to
rounding. Without a process group every collective is an identity.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from normdino import distributed as dist
from normdino.evaluation.foreground import Foreground
from normdino.evaluation.accumulator import PixelScoreAccumulator
from normdino.evaluation.metrics import image_aupr, image_auroc
from normdino.evaluation.scorers import scorer_pixel_maps
from normdino.evaluation.splits import CalibrationFolds
from normdino.evaluation.statistics import ImageStatistics, few_shot_summary, paired_permutation_test
from normdino.methods import scoring

log = logging.getLogger(__name__)

EVAL_FPRS = (0.10, 0.05, 0.01)
CI_KEYS = ("pixel_auroc", "pixel_aupr", "dice_fpr10", "dice_fpr5", "dice_fpr1", "image_auroc")

__all__ = ["AssessedResult", "assess_scorer", "compare_methods", "seed_summary", "CI_KEYS"]


@dataclass
class AssessedResult:
    """One table row plus what reports, intervals and paired tests need."""

    row: dict
    accumulator: PixelScoreAccumulator
    cases: list  # (per-image Dice at 5 % FPR, sample) of the anomalous images
    images: ImageStatistics
    foreground_images: ImageStatistics | None = None
    thresholds: list[list[float]] = field(default_factory=list)  # per fold, per FPR


def _dice(confusion: np.ndarray) -> float:
    tp, fp, fn = (float(v) for v in confusion)
    return 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn > 0 else math.nan


def _fpr_key(fpr: float) -> str:
    return f"fpr{round(fpr * 100)}"


def assess_scorer(scorer, healthy, test, *, sigma: float = 0.0, top_fraction: float = 0.01,
                  fprs: Sequence[float] = EVAL_FPRS, device: torch.device | str = "cpu",
                  folds: CalibrationFolds | None = None, foreground: Foreground | None = None,
                  n_bootstrap: int = 0, seed: int = 0, progress: bool = False) -> AssessedResult:
    """Metrics of one scorer: ``healthy``/``test`` are labelled token sets (``.tokens``, ``.samples``)."""
    from normdino.io.reading import read_image

    every = [getattr(s, "every_sample", s.samples) for s in (healthy, test)]
    if folds is None:
        folds = CalibrationFolds((0,) * len(every[0]), (0,) * len(every[1]), 1, "given")
    sharded = dist.is_distributed() and getattr(test, "all_samples", None) is not None
    first_healthy, first_test = getattr(healthy, "start", 0), getattr(test, "start", 0)  # shares' global positions
    n_folds = folds.n_folds
    calibration = [PixelScoreAccumulator() for _ in range(n_folds)]
    calibration_fg = [PixelScoreAccumulator() for _ in range(n_folds)] if foreground else []
    maps_iter = scorer_pixel_maps(scorer, healthy.tokens, sigma, device)
    with dist.failing_together(f"{scorer.name}: calibration"):
        for i, maps in enumerate(tqdm(maps_iter, total=len(healthy.samples), desc=f"{scorer.name}: calibration",
                                      disable=not progress, leave=False)):
            fg = foreground.mask_for(healthy.samples[i].image) if foreground else None
            for k in range(n_folds):
                if folds.calibrates(first_healthy + i, k):
                    calibration[k].add(maps)
                    if fg is not None:
                        calibration_fg[k].add(maps[fg])
    if sharded:  # every rank's healthy pixels before any threshold is taken
        calibration = [dist.reduce_accumulator(acc) for acc in calibration]
        calibration_fg = [dist.reduce_accumulator(acc) for acc in calibration_fg]
    thresholds = [[acc.threshold_at_fpr(f) for f in fprs] for acc in calibration]
    thresholds_fg = [[acc.threshold_at_fpr(f) for f in fprs] for acc in calibration_fg]

    accumulator = PixelScoreAccumulator(track_regions=True)
    accumulator_fg = PixelScoreAccumulator() if foreground else None
    stats = ImageStatistics(len(fprs))
    stats_fg = ImageStatistics(len(fprs)) if foreground else None
    image_scores, labels, cases = [], [], []
    case_index = list(fprs).index(0.05) if 0.05 in fprs else 0
    fg_pixels = all_pixels = 0
    maps_iter = scorer_pixel_maps(scorer, test.tokens, sigma, device)
    with dist.failing_together(f"{scorer.name}: evaluation"):
        for j, (maps, sample) in enumerate(tqdm(zip(maps_iter, test.samples), total=len(test.samples),
                                                desc=f"{scorer.name}: evaluation", disable=not progress, leave=False)):
            fold = folds.evaluation[first_test + j]
            mask = read_image(sample.mask) > 0 if sample.mask is not None else None
            if mask is not None and mask.ndim == 3:
                mask = mask.any(axis=-1)
            score = scoring.image_score(maps, top_fraction)
            accumulator.add(maps, mask)
            stats.add(maps, mask, thresholds[fold], score, sample.label)
            image_scores.append(score)
            labels.append(sample.label)
            if mask is not None and mask.any():
                cases.append((_dice(stats.confusion[-1][case_index]), sample))
            if foreground:
                fg = foreground.mask_for(sample.image)
                fg_mask = mask[fg] if mask is not None else None
                accumulator_fg.add(maps[fg], fg_mask)
                stats_fg.add(maps[fg], fg_mask, thresholds_fg[fold], score, sample.label)
                fg_pixels += int(fg.sum())
                all_pixels += fg.size

    if sharded:  # every rank's images, in input order (contiguous shares gathered in rank order)
        accumulator = dist.reduce_accumulator(accumulator)
        accumulator_fg = dist.reduce_accumulator(accumulator_fg) if accumulator_fg is not None else None
        parts = dist.all_gather_object((stats, stats_fg, image_scores, labels, cases, fg_pixels, all_pixels))
        stats, stats_fg = parts[0][0], parts[0][1]
        for part in parts[1:]:
            stats.extend(part[0])
            if stats_fg is not None:
                stats_fg.extend(part[1])
        image_scores, labels, cases = ([x for part in parts for x in part[k]] for k in (2, 3, 4))
        fg_pixels, all_pixels = sum(part[5] for part in parts), sum(part[6] for part in parts)
    pooled = np.sum(stats.confusion, axis=0)
    row = {
        "method": scorer.name,
        "pixel_auroc": accumulator.auroc(),
        "pixel_aupr": accumulator.aupr(),
        **{f"dice_{_fpr_key(f)}": _dice(pooled[t]) for t, f in enumerate(fprs)},
        "aupro": accumulator.aupro(0.3),
        "image_auroc": image_auroc(image_scores, labels) if len(set(labels)) == 2 else math.nan,
        "image_aupr": image_aupr(image_scores, labels) if 1 in labels else math.nan,
        "n_prototypes": scorer.n_prototypes,
        "fit_seconds": round(scorer.fit_seconds, 3),
        "scoring_state_mb": round(scorer.scoring_state_mb, 4),
        "saved_state_mb": round(scorer.saved_state_mb, 4),
        **{f"threshold_{_fpr_key(f)}": float(np.mean([th[t] for th in thresholds])) for t, f in enumerate(fprs)},
        "calibration_folds": n_folds,
    }
    if foreground:
        pooled_fg = np.sum(stats_fg.confusion, axis=0)
        row.update({
            "fg_pixel_auroc": accumulator_fg.auroc(),
            "fg_pixel_aupr": accumulator_fg.aupr(),
            **{f"fg_dice_{_fpr_key(f)}": _dice(pooled_fg[t]) for t, f in enumerate(fprs)},
            **{f"fg_threshold_{_fpr_key(f)}": float(np.mean([th[t] for th in thresholds_fg]))
               for t, f in enumerate(fprs)},
            "fg_fraction": fg_pixels / max(1, all_pixels),
        })
    if n_bootstrap > 0 and dist.is_main():  # under torchrun rank 0 alone reports (the other ranks' rows go nowhere)
        for prefix, source in (("", stats), ("fg_", stats_fg)):
            if source is None:
                continue
            intervals = source.bootstrap(n_bootstrap, seed)
            names = {"pixel_auroc": "pixel_auroc", "pixel_aupr": "pixel_aupr", "image_auroc": "image_auroc",
                     **{f"dice_{t}": f"dice_{_fpr_key(f)}" for t, f in enumerate(fprs)}}
            for key, name in names.items():
                if prefix and name == "image_auroc":
                    continue  # the image score is the same with or without a foreground
                row[f"{prefix}{name}_ci"] = list(intervals[key])
    return AssessedResult(row, accumulator, cases, stats, stats_fg, thresholds)


# ---------------------------------------------------------------------- comparisons


def compare_methods(results: Sequence[AssessedResult], pairs: Sequence[tuple[str, str]], n_permutations: int = 10_000,
                    seed: int = 0) -> list[dict]:
    """Paired permutation tests on image-wise pixel AUROC and AUPR (per anomalous image) between named methods.

    As in the paper: each anomalous image gets each method's pixel AUROC/AUPR over its own pixels; the test
    flips the sign of the per-image differences (swapping the methods on that image).
    """
    from normdino.errors import InputError

    by_name = {r.row["method"]: r for r in results}
    rows = []
    for a, b in pairs:
        missing = [m for m in (a, b) if m not in by_name]
        if missing:
            raise InputError(f"--compare names {', '.join(missing)}, which was not evaluated; "
                             f"evaluated: {', '.join(by_name)}")
        ia, ib = by_name[a].images, by_name[b].images
        if ia.labels != ib.labels:
            raise InputError(f"{a} and {b} were not evaluated on the same images; a paired test needs the same images")
        metrics_a, metrics_b = ia.per_image_pixel_metrics(), ib.per_image_pixel_metrics()
        for name, va, vb in (("image-wise AUROC", metrics_a[0], metrics_b[0]), ("image-wise AUPR", metrics_a[1], metrics_b[1])):
            test = paired_permutation_test(va, vb, n_permutations, seed)
            rows.append({"a": a, "b": b, "metric": name, "mean_a": float(np.nanmean(va)) if np.isfinite(va).any() else math.nan,
                         "mean_b": float(np.nanmean(vb)) if np.isfinite(vb).any() else math.nan,
                         "mean_difference": test.statistic, "p_value": test.p_value, "n_images": test.n_pairs,
                         "permutations": test.n_permutations})
    return rows


SEED_KEYS = ("pixel_auroc", "pixel_aupr", "dice_fpr10", "dice_fpr5", "dice_fpr1", "image_auroc",
             "fg_pixel_auroc", "fg_pixel_aupr", "fg_dice_fpr10", "fg_dice_fpr5", "fg_dice_fpr1",
             "backbone_ms", "scoring_ms", "ms_per_sample", "peak_memory_mb", "peak_memory_gb")


def seed_summary(name: str, rows: Sequence[dict]) -> dict:
    """One row for a few-shot method run over several seeds: each metric as its mean, with max/mean/min beside it."""
    summary: dict = {"method": name, "seeds": [r.get("seed") for r in rows]}
    for key in SEED_KEYS:
        values = [r[key] for r in rows if key in r and r[key] is not None]
        if not values:
            continue
        spread = few_shot_summary(values)
        summary[key] = spread["mean"]
        summary[f"{key}_seeds"] = spread
    for key in ("n_prototypes", "scoring_state_mb", "saved_state_mb", "fit_seconds"):
        if rows and key in rows[0]:
            summary[key] = rows[0][key]
    return summary
