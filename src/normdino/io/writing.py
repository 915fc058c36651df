"""Prediction outputs a person can open: 16-bit PNG and .npy maps, masks, overlays, NIfTI maps and scores.csv."""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from normdino.io import rendering
from normdino.files import atomic_path, atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

CSV_COLUMNS = ("input", "kind", "score", "anomalous", "fpr", "pixel_threshold", "image_threshold",
               "anomalous_fraction", "anomaly_map", "mask", "overlay")


def unique_stems(paths: Sequence[Path]) -> list[str]:
    """Output stems of image files, prefixed with parent folder names where two inputs would otherwise collide."""
    stems = [p.stem for p in paths]
    seen: dict[str, int] = {}
    for stem in stems:
        seen[stem] = seen.get(stem, 0) + 1
    return [f"{p.parent.name}__{s}" if seen[s] > 1 else s for p, s in zip(paths, stems)]


def save_npy(path: Path, array: np.ndarray) -> None:
    """Write a .npy file atomically."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue())


class PredictionWriter:
    """Runs a fitted detector over inputs and writes every output, then ``scores.csv`` and ``summary.json``."""

    def __init__(self, detector, out_dir: Path, fpr: float | None = None, overlays: bool = True, progress: bool = True):
        self.detector = detector
        self.out_dir = Path(out_dir)
        self.fpr = detector.default_fpr if fpr is None else fpr
        self.overlays = overlays
        self.progress = progress
        self.rows: list[dict] = []
        self.pixel_threshold = detector.pixel_threshold(self.fpr)
        self.image_threshold = detector.image_threshold(self.fpr)
        # Colour scale of the overlays: from the healthy median to far beyond the healthiest 0.01 % tail.
        self.vmin = detector.pixel_threshold(0.5)
        self.vmax = max(detector.pixel_threshold(1e-4), self.vmin + 1e-6)
        # The 16-bit PNG maps store score / map_scale, clipped to [0, 1]; cosine distances live in [0, 1] in practice.
        self.map_scale = 1.0 if detector.score == "cosine" else float(2 * self.vmax)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    @property
    def n_written(self) -> int:
        return len(self.rows)

    def _row(self, source: Path, kind: str, score: float, anomalous_fraction: float, **files: str) -> dict:
        return {"input": str(source), "kind": kind, "score": f"{score:.6f}",
                "anomalous": int(score > self.image_threshold), "fpr": self.fpr,
                "pixel_threshold": f"{self.pixel_threshold:.6f}", "image_threshold": f"{self.image_threshold:.6f}",
                "anomalous_fraction": f"{anomalous_fraction:.6f}",
                **{key: files.get(key, "") for key in ("anomaly_map", "mask", "overlay")}}

    def write_images(self, paths: Sequence[Path], on_image: Callable | None = None) -> None:
        """Maps (16-bit PNG + .npy), mask PNG and overlay PNG for each 2D image.

        ``on_image(path, image, prediction)``, if given, sees each image and its prediction (e.g. for a viewer).
        """
        from normdino.io.reading import read_image

        stems = unique_stems(paths)
        bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not self.progress)
        batch = self.detector.batch_size
        for start in range(0, len(paths), batch):
            images = [read_image(p) for p in paths[start:start + batch]]
            for path, stem, image, pred in zip(paths[start:start + batch], stems[start:start + batch], images,
                                               self.detector.predict(images, fpr=self.fpr)):
                self.rows.append(self._write_image_outputs(path, stem, image, pred))
                if on_image is not None:
                    on_image(path, image, pred)
                bar.update(1)
        bar.close()

    def _write_image_outputs(self, path: Path, stem: str, image: np.ndarray, pred) -> dict:
        files = {"anomaly_map": f"{stem}_anomaly.png", "mask": f"{stem}_mask.png"}
        rendering.save_map_png16(self.out_dir / files["anomaly_map"], pred.pixel_map, 0.0, self.map_scale)
        save_npy(self.out_dir / f"{stem}_anomaly.npy", pred.pixel_map.astype(np.float32))
        rendering.save_png(self.out_dir / files["mask"], pred.mask.astype(np.uint8) * 255)
        if self.overlays:
            files["overlay"] = f"{stem}_overlay.png"
            overlay = rendering.overlay_image(image, pred.pixel_map, pred.mask, self.vmin, self.vmax)
            rendering.save_png(self.out_dir / files["overlay"], overlay)
        return self._row(path, "image", pred.score, float(pred.mask.mean()), **files)

    def write_volume(self, path: Path, options, on_slice: Callable | None = None) -> None:
        """``<stem>_anomaly.nii.gz`` (float32) and ``<stem>_mask.nii.gz`` (uint8) in the input's exact geometry.

        Slices stream from the scan through the detector into both files; skipped slices stay 0.
        ``on_slice(index, slice_image, prediction)``, if given, sees each kept slice (e.g. for a viewer).
        """
        from normdino.io.volumes import Volume, VolumeWriter, volume_stem

        stem = volume_stem(path)
        files = {"anomaly_map": f"{stem}_anomaly.nii.gz", "mask": f"{stem}_mask.nii.gz"}
        with Volume.open(path, volume_index=options.volume_index) as volume:
            indices = volume.slice_indices(options)
            top = TopFraction(self.detector.top_fraction, len(indices))
            n_voxels = n_anomalous = 0
            bar = tqdm(total=len(indices), desc=stem, unit="slice", disable=not self.progress)
            with VolumeWriter(volume, self.out_dir / files["anomaly_map"], options.axis, np.float32) as maps, \
                    VolumeWriter(volume, self.out_dir / files["mask"], options.axis, np.uint8) as masks:
                slices = volume.iter_slices(options, indices=indices)
                while chunk := list(itertools.islice(slices, self.detector.batch_size)):
                    for (index, image_slice), pred in zip(chunk, self.detector.predict([s for _, s in chunk],
                                                                                       fpr=self.fpr)):
                        maps.write(index, pred.pixel_map)
                        masks.write(index, pred.mask.astype(np.uint8))
                        top.add(pred.pixel_map)
                        n_voxels += pred.mask.size
                        n_anomalous += int(pred.mask.sum())
                        if on_slice is not None:
                            on_slice(index, image_slice, pred)
                        bar.update(1)
            bar.close()
        self.rows.append(self._row(path, "volume", top.mean(), n_anomalous / max(1, n_voxels), **files))

    def finish(self) -> Path:
        """Write ``scores.csv`` and ``summary.json``; returns the CSV's path."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        csv_path = self.out_dir / "scores.csv"
        atomic_write_text(csv_path, buffer.getvalue())
        summary = {
            "fpr": self.fpr, "pixel_threshold": self.pixel_threshold, "image_threshold": self.image_threshold,
            "score": self.detector.score, "png_map_scale": self.map_scale,
            "png_map_meaning": "16-bit anomaly PNG value v means score = v / 65535 * png_map_scale (clipped)",
            "overlay_color_range": [self.vmin, self.vmax], "n_inputs": len(self.rows),
        }
        atomic_write_text(self.out_dir / "summary.json", json.dumps(summary, indent=2))
        return csv_path


class TopFraction:
    """Mean of the top ``fraction`` of ``n_arrays`` equally sized arrays, keeping only that many values."""

    def __init__(self, fraction: float, n_arrays: int):
        self.fraction = fraction
        self.n_arrays = n_arrays
        self.k = 0
        self.kept = np.empty(0, dtype=np.float32)

    def add(self, values: np.ndarray) -> None:
        if not self.k:
            self.k = max(1, int(round(self.fraction * self.n_arrays * values.size)))
        merged = np.concatenate([self.kept, values.ravel().astype(np.float32)])
        self.kept = merged if merged.size <= self.k else np.partition(merged, merged.size - self.k)[merged.size - self.k:]

    def mean(self) -> float:
        return float(self.kept.mean()) if self.kept.size else float("nan")
