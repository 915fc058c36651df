"""Models loaded once at start-up, each with its own inference queue, and one prediction run for one upload.

A prediction reuses ``normdino predict``'s writer (:class:`normdino.io.writing.PredictionWriter`), so the
server's files are the command line's: 16-bit map PNG, mask PNG and overlay for images; NIfTI map and mask in
the input's exact geometry for volumes. The viewer's arrays are gathered on the way through.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from normdino.errors import InputError
from normdino.serving.results import Orientation, ViewerArrays, slice_orientation
from normdino.serving.uploads import Upload

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MODEL_SUFFIX = ".normdino"


@dataclass
class ServedModel:
    """A loaded detector, its name, and how many requests run on it or wait for it."""

    name: str
    path: Path
    detector: Any
    concurrency: int = 1
    running: int = 0
    waiting: int = 0
    _slots: asyncio.Semaphore | None = field(default=None, repr=False)

    @property
    def slots(self) -> asyncio.Semaphore:
        """At most ``concurrency`` inferences at once on this model; the rest wait in arrival order."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.concurrency)
        return self._slots

    def describe(self) -> dict:
        """What a client needs to choose a model and an FPR (``GET /models``)."""
        det = self.detector
        fprs = np.asarray(det.calibration_fprs_, dtype=np.float64)
        return {
            "name": self.name,
            "method": det.method_name,
            "backbone": det.backbone_.name,
            "random_weights": bool(det.backbone_.is_random),
            "fpr_range": [float(fprs[0]), float(fprs[-1])],
            "default_fpr": float(det.default_fpr),
            "calibrated_fprs": [float(f) for f in det.fprs],
            "image_size": int(det.image_size),
            "volume_settings": det.volume_settings,
        }

    def calibration(self) -> dict:
        """The calibrated (FPR, pixel threshold, image threshold) table, for re-thresholding in the browser."""
        det = self.detector
        return {"fprs": [float(v) for v in det.calibration_fprs_],
                "pixel_thresholds": [float(v) for v in det.pixel_thresholds_],
                "image_thresholds": [float(v) for v in det.image_thresholds_]}


def model_name(spec: str) -> tuple[str, Path]:
    """``NAME=PATH`` or ``PATH`` (named after its file, e.g. brain.normdino -> brain)."""
    name, sep, path = spec.partition("=")
    if not sep or not _NAME.match(name):
        path = spec
        name = Path(spec).name.removesuffix(MODEL_SUFFIX)
    if not _NAME.match(name):
        raise InputError(f"model name {name!r} (from {spec}) must be letters, digits, '.', '_' or '-': "
                         f"name it explicitly as NAME=PATH")
    return name, Path(path)


def load_models(specs: Sequence[str], device: str = "cpu", concurrency: int = 1) -> dict[str, ServedModel]:
    """Load each model once; names must be unique."""
    from normdino import AnomalyDetector

    if not specs:
        raise InputError("no model was given: pass at least one .normdino file")
    models: dict[str, ServedModel] = {}
    for spec in specs:
        name, path = model_name(spec)
        if name in models:
            raise InputError(f"two models are named {name!r}: name them as NAME=PATH")
        detector = AnomalyDetector.load(path, device=device, progress=False)
        models[name] = ServedModel(name, path, detector, concurrency)
        log.info("loaded model %s (%s)%s", name, detector.backbone_.name,
                 " [random backbone weights]" if detector.backbone_.is_random else "")
    return models


def slice_options(detector: Any):
    """How to slice and scale a volume for this model: the settings saved with it (as ``normdino predict``)."""
    from normdino.io.slicing import SliceOptions

    settings = dict(getattr(detector, "volume_settings", None) or {})
    axis = settings.get("axis", "axial")
    axis = int(axis) if str(axis).lstrip("-").isdigit() else axis
    window = settings.get("window")
    percentiles = tuple(float(v) for v in str(settings.get("percentiles") or "0.5,99.5").split(","))
    return SliceOptions(axis=axis, normalization=settings.get("normalization"), percentiles=percentiles,
                        window=tuple(window) if isinstance(window, (list, tuple)) else window)


def run_prediction(model: ServedModel, upload: Upload, fpr: float, out_dir: Path,
                   name: str = "") -> tuple[dict, set[str]]:
    """Predict one checked upload into ``out_dir``: the JSON answer (without URLs) and the files to publish.

    ``name``: the upload's own file name, written as the input in ``scores.csv`` (never the server's temporary path).
    """
    from normdino.io.writing import PredictionWriter

    detector = model.detector
    writer = PredictionWriter(detector, out_dir, fpr=fpr, overlays=upload.kind == "image", progress=False)
    map_range = map_value_range(writer)
    if upload.kind == "image":
        viewer = ViewerArrays(out_dir, map_range)
        try:
            writer.write_images([upload.path], on_image=lambda _, image, pred: viewer.add(0, image, pred.pixel_map,
                                                                                           pred.score))
        finally:
            viewer.close()
    else:
        options = slice_options(detector)
        viewer = ViewerArrays(out_dir, map_range, _orientation(upload.path, options))
        try:
            writer.write_volume(upload.path, options,
                                on_slice=lambda k, image, pred: viewer.add(k, image, pred.pixel_map, pred.score))
        finally:
            viewer.close()
    writer.adopt_rows([{**r, "input": name} for r in writer.rows])
    writer.finish()
    row = writer.rows[0]
    if row.get("status", "ok") != "ok":  # the writer skips what it cannot read, with a row saying why
        raise InputError(row.get("message") or "The upload could not be read.")
    if not viewer.indices:
        raise InputError("No slice of the uploaded volume was kept for prediction.")
    score = viewer.scores[0] if upload.kind == "image" else float(row["score"])
    answer = {
        "model": model.name,
        "kind": upload.kind,
        "format": upload.format,
        "shape": list(upload.shape),
        "fpr": float(fpr),
        "score": score,
        "is_anomalous": bool(score > writer.image_threshold),
        "verdict": "anomalous" if score > writer.image_threshold else "normal",
        "thresholds": {"pixel": writer.pixel_threshold, "image": writer.image_threshold},
        "anomalous_fraction": float(row["anomalous_fraction"]),
        "random_weights": bool(detector.backbone_.is_random),
        "display_range": [writer.vmin, writer.vmax],
        "viewer": viewer.describe(),
    }
    if upload.kind == "volume":
        answer["slices"] = [{"index": k, "score": s, "is_anomalous": bool(s > writer.image_threshold)}
                            for k, s in zip(viewer.indices, viewer.scores)]
    # Everything the writer made is downloadable, except its HTML index (it links files by relative path).
    names = {p.name for p in out_dir.iterdir() if p.is_file() and p.suffix != ".html"}
    return answer, names


def release_memory() -> None:
    """Hand freed heap pages back to the system (glibc's malloc_trim), so the server's RSS returns to its
    baseline after a large upload instead of keeping each worker thread's arena at its high-water mark."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def map_value_range(writer) -> tuple[float, float]:
    """The score range [low, high] that the writer's 16-bit maps span (value v: low + v / 65535 * (high - low))."""
    if hasattr(writer, "map_range"):
        return tuple(float(v) for v in writer.map_range)
    return 0.0, float(writer.map_scale)


def _orientation(path: Path, options) -> Orientation:
    from normdino.io.volumes import Volume

    with Volume.open(path) as volume:
        return slice_orientation(volume.affine, volume.resolve_axis(options.axis))
