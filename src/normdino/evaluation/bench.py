"""Fit and evaluate several methods on the same tokens of one data set (``normdino bench``): one comparison
table and report, with bootstrap intervals, paired tests and, for few-shot methods, one fit per seed summarised
as max/mean/min.

The backbone runs once: the tokens of every layer any method asks for are extracted together, cached, and
shared. Calibration (healthy) images never come from a training patient.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from normdino.errors import InputError
from normdino.evaluation.model_evaluation import EvaluationRun
from normdino.evaluation.report_options import ReportOptions


def seed_summaries(results: Sequence, names: Sequence[str], seeds: Sequence[int]) -> list[dict]:
    """One max/mean/min row per few-shot method run over several seeds (none for one seed)."""
    from normdino.evaluation.assess import seed_summary

    if len(seeds) < 2:
        return []
    return [seed_summary(name, [r.row for r in results if r.row["method"].startswith(f"{name}@")])
            for name in names if "shot" in name]


def bench_settings(method: str, **given: Any) -> dict:
    """Resolved settings for :func:`run_bench` (the defaults of the detector and of ``method``, then ``given``),
    as ``normdino bench`` builds them from its options and ``--config``."""
    import argparse

    from normdino.config import resolve_settings

    return resolve_settings(argparse.Namespace(method=method, **given),
                            {"method": method, "backbone": None, "device": "cpu", "cache_dir": None})


def run_bench(data: str | os.PathLike, methods: Sequence[str], report: ReportOptions, settings: Mapping[str, Any], *,
              layout: str = "auto", max_train: int | None = None, seeds: Sequence[int] = (0,),
              runtime: str = "torch", precision: str | None = None,
              method_params: Mapping[str, Mapping[str, Any]] | None = None) -> EvaluationRun:
    """Fit every method in ``methods`` on the training images of ``data`` and evaluate it on the test images.

    ``settings``: the detector's and the methods' settings (:func:`bench_settings`; backbone, device, seed,
    cache_dir, sigma, batch_size, top_fraction and each method's hyper-parameters); ``max_train``: a seeded
    subset of the training images; ``seeds``: one fit per seed of each few-shot method (``*-Nshot``);
    ``method_params``: each method's own hyper-parameters (default: those of ``settings`` it accepts, except
    the ones its preset name fixes: ``patchcore-150`` keeps 150, ``dpmm-euclidean`` its score).
    """
    from normdino.config import split_settings
    from normdino.detector import AnomalyDetector
    from normdino.evaluation.datasets import load_dataset
    from normdino.evaluation.protocol import (create_methods, evaluate_methods, evaluation_token_sets, feature_union,
                                              fit_methods, subset, token_set, write_outputs)
    from normdino.evaluation.splits import without_training_patients
    from normdino.features.tokens import FeatureRequest
    from normdino.methods import registry

    names = [m.strip() for m in methods if m.strip()]
    if not names:
        raise InputError("--methods is empty")
    report.check_outputs()
    detector_kwargs, _ = split_settings(dict(settings), names[0])
    seed = settings["seed"]
    fitted = []
    for name in names:
        if method_params is not None:
            params = method_params[name]
        else:  # the settings each method takes, except those its preset name fixes (a preset's settings are its own)
            fixed = registry.variant_params(name)
            params = {k: v for k, v in split_settings(dict(settings), name)[1].items() if k not in fixed}
        for run_seed in seeds if "shot" in name else (seed,):  # few-shot methods: one fit per seed
            created = create_methods([name], **{**params, "seed": run_seed})
            if "shot" in name and len(seeds) > 1:
                created[0].name = f"{name}@{run_seed}"
            fitted.extend(created)
    dataset = load_dataset(data, layout)
    if not dataset.train:
        raise InputError(f"{data} has no training images (train/good)")
    train_images = subset(dataset.train, max_train, seed)
    dataset = without_training_patients(dataset, train_images)  # calibration never on a training patient's slices
    cache_dir = None if settings.get("cache_dir") is None else Path(settings["cache_dir"])
    if cache_dir is not None:
        from normdino.features.cache_folder import check_cache_dir

        check_cache_dir(cache_dir)
    sigma = settings["sigma"]
    layers, cls = feature_union(fitted)
    maker = AnomalyDetector(backbone=settings["backbone"], device=settings["device"], runtime=runtime,
                            precision=precision, **detector_kwargs)
    backbone = maker.build_backbone(FeatureRequest(layers=layers, cls=cls))
    depth = backbone.num_layers
    layers, _ = feature_union(fitted, depth)  # -1 and the last block's number are one layer, extracted once
    if tuple(layers) != tuple(backbone.layers):
        maker.backbone = backbone
        backbone = maker.build_backbone(FeatureRequest(layers=layers, cls=cls))
    progress = report.progress
    batch = settings["batch_size"]
    if batch is None or str(batch).lower() == "auto":  # the measured best of this device and runtime
        from normdino.features.runtimes import auto_batch_size

        batch = auto_batch_size(backbone.device, backbone.runtime)
    train = token_set(backbone, train_images, cache_dir, batch, progress, cls=cls)
    healthy, test = evaluation_token_sets(backbone, dataset, cache_dir, batch, progress, report.max_eval, seed, cls=cls)
    scorers = fit_methods(fitted, layers, train, healthy.tokens, device=backbone.device, progress=progress,
                          depth=depth)
    results = evaluate_methods(scorers, backbone, healthy, test, sigma, settings["top_fraction"], report.timing_images,
                               **report.statistics(seed))
    context = {"data": str(data), "layout": dataset.layout, **dataset.summary(), "train_used": len(train_images),
               "healthy_used": len(healthy.shapes), "evaluated": len(test.shapes),
               "backbone": backbone.name, "random_weights": backbone.is_random, "image_size": backbone.image_size,
               "normalized_tokens": backbone.normalize, "layers": list(backbone.layers), "sigma": sigma,
               "device": str(backbone.device), "methods": {m.name: m.get_params() for m in fitted}}
    summaries = seed_summaries(results, names, seeds)
    paths = write_outputs(results, scorers, backbone, Path(report.output), f"normdino bench: {dataset.name}", context,
                          report.json_path, sigma, comparisons=report.comparisons(results, seed),
                          summary_rows=summaries)
    return EvaluationRun(paths, [r.row for r in results] + summaries, backbone.is_random)
