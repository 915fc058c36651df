"""The demo: generated head phantoms -> fit -> predict -> pixel AUROC, on a machine with nothing but normdino."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from normdino.detector import AnomalyDetector
from normdino.io.phantoms import write_phantom_dataset
from normdino.io.reading import read_image
from normdino.io.writing import PredictionWriter

log = logging.getLogger(__name__)


@dataclass
class DemoResult:
    model: Path
    predictions: Path
    pixel_auroc: float
    dice_at_fpr: float
    fpr: float
    random_backbone: bool


def _sorted_pngs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png"))


def run_demo(out: Path, backbone: str = "dinov2_vits14", image_size: int = 448, epochs: int = 10,
             n_components: int = 200, seed: int = 0, progress: bool = True) -> DemoResult:
    """Generate phantoms under ``out/data``, fit ``out/model.normdino``, predict into ``out/predictions``."""
    from normdino.evaluation.metrics import dice, pixel_auroc

    data = write_phantom_dataset(out / "data", seed=seed)
    log.info("phantoms written to %s", data)
    detector = AnomalyDetector(backbone=backbone, image_size=image_size, epochs=epochs, n_components=n_components,
                               seed=seed, progress=progress)
    detector.fit(_sorted_pngs(data / "train" / "good"), _sorted_pngs(data / "valid" / "good" / "img"))
    model_path = detector.save(out / "model.normdino")

    normal = _sorted_pngs(data / "test" / "good" / "img")
    anomalous = _sorted_pngs(data / "test" / "Ungood" / "img")
    writer = PredictionWriter(detector, out / "predictions", progress=progress, overwrite=True)  # the demo's own folder
    writer.write_images(normal + anomalous)
    writer.finish()

    predictions = detector.predict(normal + anomalous)
    masks = [np.zeros(p.pixel_map.shape, dtype=bool) for p in predictions[: len(normal)]]
    masks += [read_image(data / "test" / "Ungood" / "label" / p.name) > 0.5 for p in anomalous]
    scores = np.concatenate([p.pixel_map.ravel() for p in predictions])
    truth = np.concatenate([m.ravel() for m in masks])
    predicted = np.concatenate([p.mask.ravel() for p in predictions])
    return DemoResult(model=model_path, predictions=out / "predictions", pixel_auroc=pixel_auroc(scores, truth),
                      dice_at_fpr=dice(predicted, truth), fpr=detector.default_fpr,
                      random_backbone=bool(detector.backbone_.is_random))
