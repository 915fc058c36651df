"""Evaluate one fitted model file on a labelled data set (``normdino evaluate``): the paper's metrics with
bootstrap intervals, written as results.json, results.md and report.html.

Image data sets (BMAD layouts or folders normal/ anomalous/ masks/) run under torchrun as well (every rank
scores its share; rank 0 writes the report); a folder of volumes with ``<name>_mask`` volumes runs in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normdino.errors import NormdinoError
from normdino.evaluation.report_options import ReportOptions
from normdino.io.volume_flags import VolumeFlags
from normdino.torchrun import in_process_group, is_main_rank, world_size


@dataclass(frozen=True)
class EvaluationRun:
    """What an evaluation wrote (``paths``: json, markdown, html), its table rows, and whether the backbone had
    random weights (its numbers then say nothing about DINO)."""

    paths: dict
    rows: list[dict]
    random_backbone: bool


def evaluate_model(model: str | os.PathLike, data: str | os.PathLike, report: ReportOptions, *,
                   layout: str = "auto", sigma: float | None = None, batch_size: int = 8,
                   cache_dir: str | os.PathLike | None = None, mask_suffix: str = "_mask",
                   volume_flags: VolumeFlags | None = None, **load: Any) -> EvaluationRun | None:
    """Evaluate the model file ``model`` on ``data`` and write the report ``report.output``.

    ``layout``: auto, bmad-brain, bmad-liver, bmad-resc, folders, or volumes (``mask_suffix`` names the masks,
    ``volume_flags`` the slicing over the model's); ``sigma``: smoothing of the maps (default the model's);
    ``cache_dir``: token cache (None: none); ``load``: :meth:`AnomalyDetector.load` options (backbone, device,
    runtime, precision). Returns None on the ranks other than 0 of a torchrun job.
    """
    from normdino.detector import AnomalyDetector
    from normdino.evaluation.protocol import detector_scorer, evaluate_methods, evaluation_token_sets, write_outputs

    report.check_outputs()
    flags = volume_flags or VolumeFlags()
    if (flags.series is not None or flags.modality is not None) and layout != "volumes":
        raise NormdinoError("--series and --modality pick the series of a DICOM export: use them with --layout volumes")
    if layout == "volumes" and in_process_group():
        raise NormdinoError("normdino evaluate --layout volumes does not run under torchrun yet; run it as one "
                            "process: python -m normdino evaluate ... --layout volumes")
    cache = None if cache_dir is None else Path(cache_dir)
    if cache is not None:
        from normdino.features.cache_folder import check_cache_dir

        check_cache_dir(cache)
    detector = AnomalyDetector.load(model, progress=report.progress, **load)
    detector.batch_size = batch_size
    sigma = detector.sigma if sigma is None else sigma
    if layout == "volumes":
        from normdino.evaluation.volumes import evaluate_volumes

        options = (volume_flags or VolumeFlags()).slice_options(detector.volume_settings or {})
        paths, rows = evaluate_volumes(detector, Path(data), options, Path(report.output), json_path=report.json_path,
                                       mask_suffix=mask_suffix, progress=report.progress,
                                       timing_images=report.timing_images, series_filter=flags.series_filter())
        return EvaluationRun(paths, rows, detector.backbone_.is_random)
    from normdino.evaluation.datasets import load_dataset

    dataset = load_dataset(data, layout)
    healthy, test = evaluation_token_sets(detector.backbone_, dataset, cache, batch_size, report.progress,
                                          report.max_eval, cls=detector.method_.feature_request().cls)
    scorer = detector_scorer(detector)
    results = evaluate_methods([scorer], detector.backbone_, healthy, test, sigma, detector.top_fraction,
                               report.timing_images, **report.statistics(0))
    if not is_main_rank():  # under torchrun every rank holds the gathered metrics; rank 0 alone writes them
        return None
    context = {"model": str(model), "data": str(data), "layout": dataset.layout,
               **dataset.summary(), "healthy_used": len(healthy.every_sample), "evaluated": len(test.every_sample),
               "backbone": detector.backbone_.name, "sigma": sigma,
               "model_file_mb": round(Path(model).stat().st_size / 2**20, 4)}  # beside the rows' scoring state
    if in_process_group():
        context["processes"] = world_size()
    paths = write_outputs(results, [scorer], detector.backbone_, Path(report.output),
                          f"normdino evaluate: {dataset.name}", context, report.json_path, sigma,
                          comparisons=report.comparisons(results, 0))
    return EvaluationRun(paths, [r.row for r in results], detector.backbone_.is_random)
