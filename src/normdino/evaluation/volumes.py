"""Evaluation on volumes: voxel AUROC/AUPR and Dice at FPR over scans with mask volumes, per-volume scores.

Thresholds are the model's own (calibrated on its healthy validation images at fit time). Metrics count the
voxels of the slices the slice options keep; mask voxels in skipped slices are reported, not scored.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from normdino.errors import InputError
from normdino.evaluation.accumulator import PixelScoreAccumulator
from normdino.evaluation.metrics import image_aupr, image_auroc
from normdino.evaluation.protocol import EVAL_FPRS, MethodResult, detector_scorer, write_outputs
from normdino.evaluation.timing import UNTIMED, PeakMemory, time_methods
from normdino.io.writing import TopFraction

log = logging.getLogger(__name__)


def volume_pairs(root: Path, mask_suffix: str = "_mask", series_filter=None) -> list[tuple[Path, Path | None]]:
    """(scan, mask) pairs in a folder: the mask of ``scan.nii.gz`` is ``scan<mask_suffix>.nii.gz``.

    Scans whose name ends in ``_flair``/``_t1``... are matched by their patient stem too
    (``P_flair.nii.gz`` -> ``P_mask.nii.gz``), as in ../shared/data/lgg-flair/volumes. A PACS export (a DICOMDIR,
    or DICOM files in nested folders) pairs each image series with the DICOM Segmentation that references it
    (:func:`dicom_volume_pairs`).
    """
    from normdino.io.volumes import list_volumes, volume_stem

    if _is_dicom_export(root):
        return dicom_volume_pairs(root, series_filter)
    if series_filter:
        raise InputError("--series and --modality pick series of a DICOM export; "
                         f"{root} holds NIfTI volumes or DICOM folders paired by name")
    volumes = list_volumes(root)
    by_stem = {volume_stem(v): v for v in volumes}
    masks = {stem for stem in by_stem if stem.endswith(mask_suffix)}
    pairs = []
    for stem, path in by_stem.items():
        if stem in masks:
            continue
        candidates = [stem + mask_suffix, stem.rsplit("_", 1)[0] + mask_suffix if "_" in stem else None]
        mask = next((by_stem[c] for c in candidates if c in masks), None)
        pairs.append((path, mask))
    if not pairs:
        raise InputError(f"no scans in {root} (only masks named *{mask_suffix})")
    return pairs


def _is_dicom_export(root: Path) -> bool:
    """A DICOMDIR, or no NIfTI file and no DICOM series folder at the top (nested folders of DICOM files)."""
    from normdino.io.volumes import is_volume

    if (root / "DICOMDIR").is_file():
        return True
    if not root.is_dir() or is_volume(root):
        return False
    return not any(is_volume(child) for child in root.iterdir() if not child.name.startswith("."))


def dicom_volume_pairs(root: Path, series_filter=None) -> list[tuple[Path, Path | None]]:
    """(series, Segmentation file) pairs of a PACS export: each image series (as io.dicom_tree names it) with the
    DICOM Segmentation whose ReferencedSeriesSequence points at it (None when it has none)."""
    from normdino.io.dicom_tree import find_series
    from normdino.io.dicom_results import is_segmentation
    from normdino.io.dicom import import_pydicom

    pydicom = import_pydicom()
    every = find_series(root)
    images = [s for s in every if s.not_image is None and (not series_filter or series_filter.matches(s))]
    if not images:
        raise InputError(f"no image series in {root}{' matches the series filter' if series_filter else ''}")
    masks: dict[str, Path] = {}
    for series in every:
        if series.not_image is None:
            continue
        for path in series.files:
            if not is_segmentation(path):
                continue
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            for reference in ds.get("ReferencedSeriesSequence", []):
                uid = str(reference.SeriesInstanceUID)
                if uid in masks:
                    raise InputError(f"Two Segmentations reference series {uid}: {masks[uid]} and {path}; keep one "
                                     "ground truth per series")
                masks[uid] = path
    return [(series.path, masks.get(series.uid)) for series in images]


def _display_name(path: Path) -> str:
    """A scan's name in the report: its file name, or patient/study/series for a series of an export."""
    from normdino.io.dicom_tree import export_name, known_series

    series = known_series(path)
    return export_name(series) if series is not None else path.name


def binary_mask_plane(plane: np.ndarray, path: Path, seen: set) -> np.ndarray:
    """A mask plane as bits, refusing what is not a binary mask: NaN or infinite voxels, or more than one
    non-zero value over the whole volume (``seen`` collects them plane by plane). 0/1 and 0/255 masks pass;
    a label map (0, 1, 2, 4) or a resampled mask (7.5 next to 1) is one sentence, never binarised silently."""
    if plane.dtype.kind == "f" and not np.isfinite(plane).all():
        raise InputError(f"Mask {path} holds NaN or infinite voxels; a mask must be binary (0 and one positive "
                         "value): fix or re-export it")
    seen.update(np.unique(plane[plane != 0]).tolist())
    if len(seen) > 1 or any(v < 0 for v in seen):
        values = ", ".join(f"{v:g}" for v in sorted(seen)[:5])
        raise InputError(f"Mask {path} is not binary (it holds 0 and {values}); a mask must hold 0 and one "
                         "positive value: merge its labels or threshold it yourself first")
    return plane != 0


def evaluate_volumes(detector, root: Path, options, out_dir: Path, json_path: Path | None = None,
                     mask_suffix: str = "_mask", fprs=EVAL_FPRS, progress: bool = True, timing_images: int = 10,
                     series_filter=None):
    """Voxel metrics of a fitted detector over every scan in ``root``; writes results.json/.md and report.html.

    Runtime and peak memory are those of the image protocol (:func:`normdino.evaluation.timing.time_methods`: batch size 1,
    backbone and scoring apart, memory in its own pass) over the first ``timing_images`` scored slices; the
    whole evaluation's throughput (reading, batched prediction, metrics) is reported apart from them.
    """
    from normdino.io.dicom_results import is_segmentation, read_segmentation_mask
    from normdino.io.slicing import SliceOptions
    from normdino.io.volumes import Volume, read_mask_volume

    pairs = volume_pairs(root, mask_suffix, series_filter)
    without = [_display_name(scan) for scan, mask in pairs if mask is None]
    if without:  # said, never assumed silently
        log.warning("%d of %d scans have no mask (*%s): %s; their voxels count as healthy in the voxel metrics and "
                    "they are left out of the image AUROC", len(without), len(pairs), mask_suffix,
                    ", ".join(without[:10]) + (f" and {len(without) - 10} more" if len(without) > 10 else ""))
    thresholds = [detector.pixel_threshold(f) for f in fprs]
    accumulator = PixelScoreAccumulator(thresholds=thresholds)
    mask_options = SliceOptions(axis=options.axis, normalization="none", volume_index=None)
    dice_threshold = detector.pixel_threshold(0.05)
    volume_rows, scores, labels = [], [], []
    n_slices, seconds = 0, 0.0
    timing: list[np.ndarray] = []  # the first scored slices, timed after the metrics as the image protocol times
    with PeakMemory(getattr(detector.backbone_, "device", "cpu")) as memory:
        for image_path, mask_path in tqdm(pairs, desc="volumes", disable=not progress):
            volume = Volume.open(image_path, volume_index=options.volume_index)
            kept = volume.slice_indices(options)
            axis = volume.resolve_axis(options.axis)
            masks, mask_voxels = {}, 0
            if mask_path is not None and volume.kind == "dicom" and is_segmentation(mask_path):
                seg = read_segmentation_mask(mask_path, volume.files, volume.shape)
                mask_voxels = int(seg.sum())
                for index in kept:
                    masks[index] = np.packbits(seg[(slice(None),) * axis + (index,)])
                del seg
            elif mask_path is not None:  # masks of the kept slices as bits; all mask voxels counted
                with read_mask_volume(mask_path, volume) as mask_volume:
                    kept_set, values = set(kept), set()
                    for index, plane in mask_volume.iter_slices(mask_options, indices=range(volume.shape[axis])):
                        bits = binary_mask_plane(plane, mask_path, values)
                        mask_voxels += int(bits.sum())
                        if index in kept_set:
                            masks[index] = np.packbits(bits)
            top = TopFraction(detector.top_fraction, len(kept))
            tp = fp = fn = 0
            started = time.perf_counter()
            slices = volume.iter_slices(options)
            while chunk := [s for _, s in zip(range(detector.effective_batch_size), slices)]:
                timing += [image.copy() for _, image in chunk][:max(0, timing_images - len(timing))]
                for (index, _), pred in zip(chunk, detector.predict([image for _, image in chunk])):
                    truth = masks.get(index)
                    if truth is not None:
                        truth = np.unpackbits(truth, count=pred.pixel_map.size).reshape(pred.pixel_map.shape).astype(bool)
                    accumulator.add(pred.pixel_map, truth)
                    top.add(pred.pixel_map)
                    if truth is not None:
                        predicted = pred.pixel_map > dice_threshold
                        tp += int((predicted & truth).sum())
                        fp += int((predicted & ~truth).sum())
                        fn += int((~predicted & truth).sum())
            seconds += time.perf_counter() - started
            n_slices += len(kept)
            volume.close()
            scored_mask = sum(int(np.unpackbits(m).sum()) for m in masks.values())
            label = int(mask_voxels > 0) if mask_path is not None else None
            volume_rows.append({"volume": _display_name(image_path), "mask": mask_path.name if mask_path else "",
                                "score": top.mean(), "slices_scored": len(kept), "mask_voxels": mask_voxels,
                                "mask_voxels_skipped": mask_voxels - scored_mask,
                                "dice_fpr5": 2 * tp / (2 * tp + fp + fn) if tp + fn else float("nan")})
            if label is not None:
                scores.append(top.mean())
                labels.append(label)
    row = {
        "method": detector.method_name,
        "pixel_auroc": accumulator.auroc(), "pixel_aupr": accumulator.aupr(),
        **{f"dice_fpr{round(f * 100)}": accumulator.dice_at(t) for f, t in zip(fprs, thresholds)},
        "image_auroc": image_auroc(scores, labels) if len(set(labels)) == 2 else float("nan"),
        "image_aupr": image_aupr(scores, labels) if len(set(labels)) == 2 else float("nan"),
        "n_prototypes": int(detector.method_.n_prototypes),
        "n_volumes": len(pairs), "n_slices": n_slices,
        # the whole evaluation, batched (reading slices, prediction, metrics), under the memory sampler
        "evaluation_ms_per_slice": round(1000 * seconds / max(1, n_slices), 2),
        "evaluation_peak_memory_mb": round(memory.peak_bytes / 2**20, 1),
    }
    scorer = detector_scorer(detector)
    row.update(scoring_state_mb=round(scorer.scoring_state_mb, 4), saved_state_mb=round(scorer.saved_state_mb, 4))
    measured = time_methods(detector.backbone_, [scorer], timing, detector.sigma, detector.top_fraction)[0] \
        if timing else UNTIMED
    row.update(measured.row())
    result = MethodResult(row, accumulator, [])
    context = {"data": str(root), "layout": "volumes", "volumes": len(pairs), "slices_scored": n_slices,
               "scans_without_mask": ", ".join(without) if without else "none",
               "axis": options.axis, "slices": str(options.slices), "normalization": options.normalization,
               "thresholds": "the model's own (calibrated at fit time)"}
    paths = write_outputs([result], [scorer], detector.backbone_, out_dir, f"normdino evaluate: {root.name}",
                          context, json_path, per_item=volume_rows)
    return paths, [row]
