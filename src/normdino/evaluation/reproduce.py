"""``normdino reproduce``: the DPMM paper's Tables 1-3 on the BMAD sets, each cell beside the published figure.

For each BMAD set found under the root (:func:`normdino.evaluation.datasets.find_bmad`) one backbone pass
fills one token cache of *unnormalised* tokens; the normalised methods get an L2-normalised copy of the
training tokens and normalise evaluation tokens on the fly, so the ablation's "normalised or not" costs no
second cache. Methods: DPMM with the cosine, Euclidean and likelihood scores, each on normalised and raw
tokens; AnomalyDINO full-shot and 1-shot over ``--seeds`` (max/mean/min); PatchCore 10 %, 1024 and 150.
Thresholds are out of sample (:mod:`normdino.evaluation.splits`); metrics come with 95 % bootstrap intervals
over images, whole-image and foreground-only; DPMM is compared with each baseline by a paired permutation
test on image-wise pixel AUROC/AUPR.

Outputs in ``-o``: ``tables.md``, ``tables.json`` (strict JSON: undefined metrics are null), ``report.html``
(one self-contained file) and ``results.json`` (every row, interval and test).

Published figures: Schulthess & Konukoglu, MICCAI 2025, arXiv 2509.19997, Tables 1-3, from the package's data
file ``paper_tables.json`` (source and reading notes inside). Every row with a published counterpart gets the
paper's figure and ours − paper: DPMM with its three scores x normalised or not, AnomalyDINO full and one-shot
(max / mean / min over seeds), PatchCore 10 %, 1024 and 150. A data set missing under the root has no rows.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from normdino.errors import InputError
from normdino.evaluation.paper_tables import write_tables

log = logging.getLogger(__name__)

DPMM_SCORES = ("dpmm", "dpmm-euclidean", "dpmm-likelihood")
BANKS = ("anomalydino", "patchcore-10%", "patchcore-1024", "patchcore-150")
FEW_SHOT = "anomalydino-1shot"


@dataclass
class Settings:
    """Everything ``reproduce`` needs besides the root; the CLI's options, one to one."""

    datasets: tuple[str, ...] = ("brats", "liver", "resc")
    backbone: str = "dinov2_vits14"
    image_size: int = 448
    epochs: int = 40
    components: int = 500
    covariance: str = "diag"
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    seed: int = 0
    n_bootstrap: int = 1000
    n_permutations: int = 10_000
    compare: tuple[tuple[str, str], ...] = ()
    foreground: str = "auto"
    max_train: int | None = None
    max_eval: int | None = None
    timing_images: int = 10
    batch_size: int = 8
    cache_dir: Path | None = None
    device: str = "cpu"
    sigma: float = 0.0
    top_fraction: float = 0.01
    progress: bool = True


# ---------------------------------------------------------------------- tokens and methods


def build_backbone(name: str, image_size: int, layers: Sequence[int], device: str, seed: int = 0):
    """The backbone of every method, returning UNnormalised tokens (``random`` / ``random:ARCH`` for random weights)."""
    from normdino.features.backbone import Backbone

    if name == "random" or name.startswith("random:"):
        return Backbone.random(name.partition(":")[2] or "dinov2_vits14", seed=seed, image_size=image_size,
                               layers=tuple(layers), normalize=False, device=device)
    return Backbone.from_pretrained(name, image_size=image_size, layers=tuple(layers), normalize=False, device=device)


def normalized_copy(tokens, chunk: int = 64):
    """An L2-normalised float16 copy of a token set (patches and CLS), computed ``chunk`` images at a time."""
    from normdino.features.tokens import TokenSet

    def normalize(array: np.ndarray | None) -> np.ndarray | None:
        if array is None:
            return None
        out = np.empty(array.shape, np.float16)
        for start in range(0, len(array), chunk):
            x = np.asarray(array[start:start + chunk], np.float32)
            out[start:start + chunk] = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        return out

    return TokenSet(normalize(tokens.patches), tokens.shapes, normalize(tokens.cls), tokens.sources)


def normalizing(scorer):
    """The scorer fed L2-normalised tokens: a method fitted on normalised tokens scoring the raw token cache."""
    from normdino.evaluation.scorers import Scorer
    from normdino.features.tokens import Tokens

    class NormalizingScorer(Scorer):
        def patch_maps(self, tokens: Tokens) -> torch.Tensor:
            cls = None if tokens.cls is None else torch.nn.functional.normalize(tokens.cls.float(), dim=-1)
            return super().patch_maps(Tokens(torch.nn.functional.normalize(tokens.patches.float(), dim=-1), cls))

    return NormalizingScorer(scorer.name, scorer.method, scorer.positions, scorer.fit_seconds)


def _fit(names: Sequence[str], layers, train, healthy, settings: Settings, seed: int, rename: dict[str, str],
         normalize: bool) -> list:
    from normdino.evaluation.protocol import create_methods, fit_methods

    methods = create_methods(names, seed=seed, epochs=settings.epochs, n_components=settings.components,
                             covariance_type=settings.covariance)
    scorers = fit_methods(methods, layers, train, healthy, device=settings.device, progress=settings.progress)
    for scorer in scorers:
        scorer.name = rename.get(scorer.name, scorer.name)
    return [normalizing(s) for s in scorers] if normalize else scorers


# ---------------------------------------------------------------------- one data set


def _labelled(backbone, healthy_samples, evaluation_samples, settings: Settings):
    from normdino.evaluation.protocol import LabelledTokens, token_set

    images = list(dict.fromkeys([s.image for s in healthy_samples] + [s.image for s in evaluation_samples]))
    tokens = token_set(backbone, images, settings.cache_dir, settings.batch_size, settings.progress)
    row = {path: i for i, path in enumerate(images)}

    def pick(samples):
        return LabelledTokens(tokens.subset([row[s.image] for s in samples]), list(samples))

    return pick(healthy_samples), pick(evaluation_samples)


def _evaluation_samples(dataset, settings: Settings) -> list:
    from normdino.evaluation.protocol import subset

    evaluation = dataset.evaluation
    normal = [s for s in evaluation if s.label == 0]
    anomalous = [s for s in evaluation if s.label == 1]
    if settings.max_eval is not None and len(evaluation) > settings.max_eval:
        n_anomalous = min(len(anomalous), max(1, round(settings.max_eval * len(anomalous) / len(evaluation))))
        normal = subset(normal, settings.max_eval - n_anomalous, settings.seed)
        anomalous = subset(anomalous, n_anomalous, settings.seed)
    return normal + anomalous


def reproduce_dataset(name: str, folder: Path, layout: str, settings: Settings) -> dict:
    """Every method of the paper on one BMAD set: rows, few-shot summaries and paired tests (JSON-able)."""
    from normdino.evaluation.assess import assess_scorer, compare_methods, seed_summary
    from normdino.evaluation.datasets import load_dataset
    from normdino.evaluation.foreground import foreground_from_option
    from normdino.evaluation.protocol import create_methods, feature_union, subset, token_set
    from normdino.evaluation.timing import UNTIMED, time_methods
    from normdino.evaluation.splits import calibration_folds, drop_training_groups

    started = time.perf_counter()
    dataset = load_dataset(folder, layout)
    if not dataset.train:
        raise InputError(f"{folder} has no training images")
    train_paths = subset(dataset.train, settings.max_train, settings.seed)
    healthy_samples = drop_training_groups(dataset.healthy_validation, train_paths)
    if settings.max_eval is not None:
        healthy_samples = subset(healthy_samples, settings.max_eval, settings.seed)
    evaluation_samples = _evaluation_samples(dataset, settings)
    if not healthy_samples or not evaluation_samples:
        raise InputError(f"{folder} needs healthy validation images and evaluation images")
    layers, _ = feature_union(create_methods(list(DPMM_SCORES) + list(BANKS) + [FEW_SHOT], seed=settings.seed))
    backbone = build_backbone(settings.backbone, settings.image_size, layers, settings.device, settings.seed)
    log.info("%s: %d training, %d healthy calibration, %d evaluated images", name, len(train_paths),
             len(healthy_samples), len(evaluation_samples))
    train_raw = token_set(backbone, train_paths, settings.cache_dir, settings.batch_size, settings.progress)
    healthy, test = _labelled(backbone, healthy_samples, evaluation_samples, settings)
    folds = calibration_folds([s.image for s in healthy_samples], [s.image for s in evaluation_samples], settings.seed)
    foreground = foreground_from_option(settings.foreground)
    train_n, healthy_n = normalized_copy(train_raw), normalized_copy(healthy.tokens)
    timing = [s.image for s in evaluation_samples[:settings.timing_images]]

    scorers, results, shots = [], [], []

    def run(fitted, extra: dict | None = None) -> list:
        done = []
        for scorer in fitted:
            result = assess_scorer(scorer, healthy, test, sigma=settings.sigma, top_fraction=settings.top_fraction,
                                   device=backbone.device, folds=folds, foreground=foreground,
                                   n_bootstrap=settings.n_bootstrap, seed=settings.seed, progress=settings.progress)
            result.row.update(extra or {})
            scorers.append(scorer)
            done.append(result)
        return done

    results += run(_fit(DPMM_SCORES, layers, train_n, healthy_n, settings, settings.seed, {}, normalize=True))
    results += run(_fit(DPMM_SCORES, layers, train_raw, healthy.tokens, settings, settings.seed,
                        {m: f"{m}-raw" for m in DPMM_SCORES}, normalize=False))
    results += run(_fit(BANKS, layers, train_n, healthy_n, settings, settings.seed, {}, normalize=True))
    for seed in settings.seeds:
        shots += run(_fit([FEW_SHOT], layers, train_n, healthy_n, settings, seed, {FEW_SHOT: f"{FEW_SHOT}@{seed}"},
                          normalize=True), {"seed": seed})
    # every method timed in one loop, image by image (--timing-images 0: no timing)
    timings = time_methods(backbone, scorers, timing, settings.sigma, settings.top_fraction) if timing else \
        [UNTIMED] * len(scorers)
    for result, measured in zip(results + shots, timings):
        result.row.update(measured.row())
    rows = [r.row for r in results + shots]
    summaries = [seed_summary(FEW_SHOT, [r.row for r in shots])] if shots else []
    pairs = [("dpmm", b) for b in BANKS] + [p for p in settings.compare if p not in [("dpmm", b) for b in BANKS]]
    comparisons = compare_methods(results + shots, pairs, settings.n_permutations, settings.seed)
    return {
        "dataset": name, "folder": str(folder), "layout": layout, **dataset.summary(),
        "train_used": len(train_paths), "healthy_used": len(healthy_samples), "evaluated": len(evaluation_samples),
        "calibration": folds.description, "foreground": foreground.description if foreground else "none",
        "backbone": backbone.name, "random_weights": bool(backbone.is_random), "image_size": backbone.image_size,
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows, "few_shot": summaries, "comparisons": comparisons,
    }


def reproduce(root: str | Path, out_dir: str | Path, settings: Settings) -> dict[str, Path]:
    """Find the BMAD sets under ``root``, run every method on each, write the tables to ``out_dir``."""
    from normdino.evaluation.datasets import find_bmad

    found = find_bmad(root, tuple(settings.datasets))
    per_dataset = [reproduce_dataset(name, folder, layout, settings) for name, (folder, layout) in found.items()]
    return write_tables(per_dataset, Path(out_dir))
