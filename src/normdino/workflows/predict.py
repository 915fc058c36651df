"""Predict a list of images and volumes into a results folder: maps, masks, overlays, ``scores.csv``,
``summary.json`` and ``index.html`` (:class:`normdino.io.writing.PredictionWriter` writes each file).

Under torchrun every rank writes the maps of its contiguous share of the inputs and rank 0 writes the one
``scores.csv`` (in input order), ``summary.json`` and ``index.html`` from every rank's rows.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from normdino.errors import NormdinoError
from normdino.io.dicom_tree import split_series_path
from normdino.io.inputs import Inputs, resolve_inputs
from normdino.io.volume_flags import VolumeFlags
from normdino.io.results_folder import DEFAULT_MAX_MEGAPIXELS, check_image_sizes, prepare_results_folder
from normdino.io.writing import PredictionWriter
from normdino.torchrun import in_process_group, is_main_rank, my_share

if TYPE_CHECKING:
    from normdino.detector import AnomalyDetector

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictionRun:
    """What :func:`predict_to_folder` wrote: ``scores_csv`` (None on ranks other than 0 of a torchrun job) and
    how many inputs got maps (``n_written``) or a ``skipped`` row (``n_skipped``)."""

    scores_csv: Path | None
    n_written: int
    n_skipped: int


def check_predict_inputs(inputs: Inputs, output: str | os.PathLike, overwrite: bool = False, strict: bool = False,
                         max_megapixels: float | None = None) -> None:
    """Before the model loads: the results folder can be used and no image is too large (one sentence if not)."""
    if is_main_rank():  # under torchrun rank 0 may already be writing there when another rank gets here
        prepare_results_folder(Path(output), overwrite, check_only=True)
    unreadable = [(path, why) for path, why in inputs.unusable if split_series_path(path) is None]
    if strict and unreadable:  # a DICOM export's reports and localizers are expected there, not unreadable
        path, why = unreadable[0]
        raise NormdinoError(f"{path} {why} (stopped by --strict before any work; without it such inputs are skipped)")
    check_image_sizes(inputs.images, max_megapixels or DEFAULT_MAX_MEGAPIXELS, strict=strict)


def warn_if_trained_on_volumes(settings: dict | None, images: list) -> None:
    """2D files are read by the fixed dtype rule; a model whose volumes were scaled per volume saw other values."""
    rule = (settings or {}).get("normalization")
    if images and rule not in (None, "dtype", "none"):
        log.warning("WARNING: this model was fitted on volumes scaled by the %r rule, but %d input(s) are 2D image "
                    "files, read by their data type's range: their intensities may not match the training volumes; "
                    "predict on the volumes themselves, or refit on 2D images", rule, len(images))


def predict_to_folder(model: AnomalyDetector | str | os.PathLike, inputs: Inputs | Sequence[str | os.PathLike],
                      output: str | os.PathLike, *, volume_flags: VolumeFlags | None = None, fpr: float | None = None,
                      overlays: bool = True, overwrite: bool = False, strict: bool = False,
                      max_megapixels: float | None = None, progress: bool = True, context: dict | None = None,
                      dicom_out: Sequence[str] | None = None, anonymize: bool = False, **load: object) -> PredictionRun:
    """Predict every input with a fitted model and write the results folder ``output``.

    ``model``: a fitted :class:`~normdino.detector.AnomalyDetector`, or a model file, loaded after the inputs and
    the folder are checked, with ``load`` passed to :meth:`AnomalyDetector.load` (backbone, device, runtime,
    precision, batch_size: None for the measured best of the device and runtime).
    ``inputs``: folders, globs and files (or already resolved :class:`~normdino.io.inputs.Inputs`);
    ``volume_flags``: slicing and scaling given for this run over the model's (default: the model's);
    ``fpr``: the masks' false-positive rate (default the model's). An input that cannot be read gets a
    ``skipped`` row and a warning (``strict``: stop at the first). Raises NormdinoError when no input could be used.
    DICOM series inputs also get a DICOM Segmentation and Parametric Map (``dicom_out``: "seg", "pmap", () for
    none; default both), with empty patient data if ``anonymize`` (see :mod:`normdino.io.dicom_results`).
    """
    if not isinstance(inputs, Inputs):
        inputs = resolve_inputs(inputs, (volume_flags or VolumeFlags()).series_filter())
    check_predict_inputs(inputs, output, overwrite, strict, max_megapixels)  # before the model and backbone load
    if isinstance(model, (str, os.PathLike)):
        from normdino.detector import AnomalyDetector

        context = {"model": str(model), **(context or {})}
        detector = AnomalyDetector.load(model, progress=progress, **load)
    else:
        detector = model
    max_megapixels = max_megapixels or DEFAULT_MAX_MEGAPIXELS
    options = (volume_flags or VolumeFlags()).slice_options(detector.volume_settings or {}) if inputs.volumes else None
    warn_if_trained_on_volumes(detector.volume_settings, inputs.images)
    settings = dict(fpr=fpr, overlays=overlays, progress=progress, overwrite=overwrite, strict=strict,
                    max_megapixels=max_megapixels, context=context or {}, dicom_out=dicom_out, anonymize=anonymize)
    if in_process_group():
        return _predict_shares(detector, inputs, Path(output), options, settings)
    writer = PredictionWriter(detector, Path(output), **settings)
    writer.assign_names([*inputs.images, *inputs.volumes])
    try:
        writer.skip_unusable(inputs.unusable)
        writer.write_images(inputs.images)
        for volume in inputs.volumes:
            writer.write_volume(volume, options)
    except BaseException as err:  # a stopped run still gets a report of what it finished, marked as partial
        try:
            writer.finish(stopped=stop_reason(err))
        except Exception:  # noqa: BLE001 - the original error is the one to report (a full disk may refuse this too)
            pass
        raise
    csv_path = writer.finish()
    if writer.n_written == 0:
        first = next(row["message"] for row in writer.rows if row["status"] != "ok")
        if writer.n_skipped == 1:
            raise NormdinoError(first)
        raise NormdinoError(f"none of the {writer.n_skipped} inputs could be used (the first: {first}); "
                            f"{csv_path} says why for each")
    if writer.n_skipped:
        log.warning("%d of %d inputs were skipped; %s says why", writer.n_skipped, len(writer.rows), csv_path)
    log.info("wrote maps for %d inputs, %s and %s", writer.n_written, csv_path, csv_path.parent / "index.html")
    return PredictionRun(csv_path, writer.n_written, writer.n_skipped)


def stop_reason(err: BaseException) -> str:
    """Why a run stopped early, for ``summary.json``: the signal, or the error's sentence."""
    from normdino.errors import StopRequested

    if isinstance(err, StopRequested):
        return f"stopped by {err.signal_name}"
    if isinstance(err, KeyboardInterrupt):
        return "interrupted (SIGINT, Ctrl-C)"
    if isinstance(err, (NormdinoError, MemoryError)):
        return str(err) or type(err).__name__
    if isinstance(err, OSError):
        from normdino.files import describe_write_error

        return f"cannot write {err.filename or 'a file'}: {describe_write_error(err, err.filename or '.')}"
    return f"an unexpected {type(err).__name__}"


def _predict_shares(detector: AnomalyDetector, inputs: Inputs, output: Path, options, settings: dict) -> PredictionRun:
    """predict under torchrun: each rank writes the maps of its share; rank 0 writes the one scores.csv (input order),
    summary.json and index.html from every rank's rows."""
    from normdino import distributed as dist

    def writer(main: bool) -> PredictionWriter:
        return PredictionWriter(detector, output, prepare=main, **settings,
                                csv_name="scores.csv" if main else f".scores.rank{dist.rank()}.csv")

    with dist.failing_together("preparing the results folder"):  # rank 0 cleans it before anyone writes
        mine = writer(True) if dist.is_main() else None
    mine = mine or writer(False)
    everything = [*inputs.images, *inputs.volumes]
    mine.assign_names(everything)  # the same unique names on every rank
    share = my_share(inputs, allow_empty=True)
    try:
        with dist.failing_together("predict"):
            if dist.is_main():
                mine.skip_unusable(inputs.unusable)
            mine.write_images(share.images)
            for volume in share.volumes:
                mine.write_volume(volume, options)
    except BaseException as err:  # rank 0 marks the folder partial (its own rows: the others' are not gathered)
        if dist.is_main():
            try:
                mine.finish(stopped=stop_reason(err))
            except Exception:  # noqa: BLE001 - the original error is the one to report
                pass
        raise
    position = {str(p): i for i, p in enumerate(everything)}
    rows = sorted(dist.gather_list(mine.rows), key=lambda row: position.get(row["input"], len(position)))
    mine.adopt_rows(rows, write=dist.is_main())
    if dist.is_main():
        csv_path = mine.finish()
    else:
        mine.csv_path.unlink(missing_ok=True)
        return PredictionRun(None, mine.n_written, mine.n_skipped)
    if mine.n_written == 0:
        raise NormdinoError(f"none of the {mine.n_skipped} inputs could be read; {csv_path} says why for each")
    if mine.n_skipped:
        log.warning("%d of %d inputs were skipped; %s says why", mine.n_skipped, len(mine.rows), csv_path)
    log.info("wrote maps for %d inputs on %d processes, %s and %s", mine.n_written, dist.world_size(), csv_path,
             csv_path.parent / "index.html")
    return PredictionRun(csv_path, mine.n_written, mine.n_skipped)
