"""Prediction outputs a person can open: 16-bit PNG and .npy maps, masks, overlays, NIfTI maps, ``scores.csv``,
``summary.json`` and an ``index.html`` to browse them (:mod:`normdino.io.index_page`).

Why this module is longer than ~500 lines: :class:`PredictionWriter` is one object whose batching, reader and
writer threads, per-input rows and clean-up on failure share its state; the folder and naming rules
(:mod:`normdino.io.results_folder`) and the index page (:mod:`normdino.io.index_page`) live apart.

Rules that keep results safe:

* A results folder is never merged into. An existing folder that holds files is refused unless ``overwrite``,
  which first removes the earlier run's outputs (the files its ``scores.csv`` lists, and the report files);
  files normdino did not write are left alone.
* Output names are unique and traceable: a name is the input's stem; inputs whose stems collide get their
  extension (``img_png``, ``img_jpg``) and then as many parent folders as it takes (``a__x__img``); the
  ``input`` column of ``scores.csv`` holds each input's path.
* ``scores.csv`` gets each input's row as soon as its files are complete (appended and flushed), so maps
  never exist without their row. An input that cannot be read gets a ``skipped`` row saying why and a
  warning (``strict`` stops at the first instead); a failed input's partial files are removed.
* Memory is bounded: image sizes are read from the file headers before any work, images above
  ``max_megapixels`` are refused with one sentence, and batches hold at most ``BATCH_PIXELS`` pixels
  (or one image). Peak memory is at most about ``BYTES_PER_PIXEL`` bytes per pixel of the largest batch plus
  ``FIXED_BYTES`` (and the model), so the default limit of 64 megapixels needs about 2.8 GB; the images read
  ahead of the model, at most ``STREAM_PIXELS`` pixels and the next batch, add their own size (4 bytes per pixel
  of float32 gray, 12 of RGB).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import heapq
import html
import io
import json
import logging
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from normdino.errors import InputError, OutputError
from normdino.files import atomic_file, atomic_write_text, check_writable_folder, describe_write_error
from normdino.io import rendering
from normdino.io.index_page import write_index
from normdino.io.reading import check_megapixels
from normdino.io.results_folder import (BYTES_PER_PIXEL, DEFAULT_MAX_MEGAPIXELS, FILE_COLUMNS, check_image_sizes,
                                       output_names, prepare_results_folder)
from normdino.parallel import default_workers, default_writer_processes, ordered_map, process_pool

log = logging.getLogger(__name__)

CSV_COLUMNS = ("input", "kind", "status", "score", "anomalous", "fpr", "pixel_threshold", "image_threshold",
               "anomalous_fraction", "anomaly_map", "anomaly_npy", "mask", "overlay", "top_slices",
               "random_weights", "message", "dicom_seg", "dicom_pmap", "study_uid", "series_uid")
RANDOM_WARNING = ("The backbone has RANDOM weights: these maps, scores and verdicts say nothing about DINOv2's "
                  "quality (use it only to try the pipeline).")

#: Memory that does not grow with the image: the overlay drawn at OVERLAY_MAX_SIDE, PNG buffers, scratch.
FIXED_BYTES = 200_000_000
#: A batch holds at most this many pixels, or one image.
BATCH_PIXELS = 16_000_000
#: The images of a run of batches at most this many pixels in all go through the detector as one stream (the
#: model runs on the next batches while one is scored); a larger image's stream ends with it, so the images held
#: ahead of the model stay bounded.
STREAM_PIXELS = 16_000_000
#: Overlay panels are drawn at most this many pixels on their long side (they are for looking at, not measuring).
OVERLAY_MAX_SIDE = 1024
#: Volumes: how many top-scoring slices the strip shows, and their side in pixels.
TOP_SLICES = 5
STRIP_SIDE = 192


# ---------------------------------------------------------------------- small writers


def save_npy(path: Path, array: np.ndarray) -> None:
    """Write a .npy file atomically, straight to disk (no in-memory copy)."""
    with atomic_file(path) as f:
        np.save(f, array)


def _shrink(array: np.ndarray, max_side: int, resample: int) -> np.ndarray:
    """A float32 (H, W) or (H, W, 3) array resized so its long side is at most ``max_side``."""
    h, w = array.shape[:2]
    if max(h, w) <= max_side:
        return array
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if array.ndim == 3:
        return np.stack([_shrink(array[..., c], max_side, resample) for c in range(array.shape[2])], axis=2)
    plane = Image.fromarray(np.ascontiguousarray(array, dtype=np.float32), mode="F")
    return np.asarray(plane.resize(size, resample), dtype=np.float32)


def _thumbnail(image: np.ndarray, pixel_map: np.ndarray, mask: np.ndarray, max_side: int):
    """Image, map and mask shrunk together for drawing (the mask by majority of its pixels)."""
    small_mask = _shrink(mask.astype(np.float32), max_side, Image.Resampling.BOX) >= 0.5
    return (_shrink(image, max_side, Image.Resampling.BILINEAR), _shrink(pixel_map, max_side, Image.Resampling.BILINEAR),
            small_mask)


def _slice_strip(slices: list[tuple[float, int, np.ndarray, np.ndarray, np.ndarray]], vmin: float,
                 vmax: float) -> np.ndarray:
    """One RGB strip of slices side by side: heat map over the slice, mask contour, "slice k  score s" above."""
    panels = []
    for score, index, image, pixel_map, mask in slices:
        gray = np.clip(np.nan_to_num(image if image.ndim == 2 else image.mean(axis=2)), 0, 1)
        base = np.repeat(gray[..., None], 3, axis=2)
        heat = rendering.colorize(pixel_map, vmin, vmax) / 255.0
        panel = 0.5 * base + 0.5 * heat
        panel[rendering.mask_contour(mask)] = np.array(rendering.PREDICTED_COLOR) / 255.0
        panels.append((f"slice {index}  score {score:.4f}", np.rint(panel * 255).astype(np.uint8)))
    header, gap = 20, 6
    height = header + max(p.shape[0] for _, p in panels)
    width = sum(p.shape[1] for _, p in panels) + gap * (len(panels) - 1)
    canvas = Image.new("RGB", (width, height), (24, 26, 32))
    draw = ImageDraw.Draw(canvas)
    left = 0
    for caption, panel in panels:
        canvas.paste(Image.fromarray(panel), (left, header))
        draw.text((left + 3, 4), caption, fill=(226, 228, 233))
        left += panel.shape[1] + gap
    return np.asarray(canvas)


def _batches_by_pixels(items: Sequence[tuple[Path, tuple[int, int] | str]], max_count: int,
                       max_pixels: int) -> Iterator[list[tuple[Path, tuple[int, int] | str]]]:
    """Consecutive batches of at most ``max_count`` images and ``max_pixels`` pixels (a larger image goes alone).

    Items whose size is a string (an image that will be skipped) weigh nothing.
    """
    batch: list = []
    pixels = 0
    for item in items:
        size = 0 if isinstance(item[1], str) else item[1][0] * item[1][1]
        if batch and (len(batch) >= max_count or pixels + size > max_pixels):
            yield batch
            batch, pixels = [], 0
        batch.append(item)
        pixels += size
    if batch:
        yield batch


def _segments(batches: Sequence[list[tuple[Path, tuple[int, int] | str]]], max_pixels: int) -> Iterator[list[list]]:
    """Consecutive runs of batches of at most ``max_pixels`` pixels in all (a larger batch goes alone)."""
    weighed = [(batch, (1, sum(size[0] * size[1] for _, size in batch if not isinstance(size, str))))
               for batch in batches]
    for run in _batches_by_pixels(weighed, max(1, len(weighed)), max_pixels):
        yield [batch for batch, _ in run]


def _is_output_error(err: OSError, out_dir: Path) -> bool:
    """Whether an OSError is about writing into the results folder (fatal) rather than reading an input."""
    if err.filename is None:
        return True
    try:
        return Path(os.path.abspath(err.filename)).is_relative_to(Path(os.path.abspath(out_dir)))
    except (TypeError, ValueError):
        return True


# ---------------------------------------------------------------------- one image's files


@dataclasses.dataclass(frozen=True)
class ImageJob:
    """Everything one image's files are made of: plain arrays and numbers, so a thread or a process can write them."""

    out_dir: Path
    name: str
    image: np.ndarray | None  # None: no overlay
    pixel_map: np.ndarray
    mask: np.ndarray
    map_range: tuple[float, float]
    color_range: tuple[float, float]


def write_image_files(job: ImageJob, written: list[Path]) -> dict[str, str]:
    """16-bit PNG map, .npy map, mask PNG and (with an image) overlay PNG of one image; returns the file names.

    Each path goes into ``written`` before its file is started, so a failure can remove what it left.
    A pure function of the job: the same bytes whichever thread or process runs it.
    """
    name = job.name
    files = {"anomaly_map": f"{name}_anomaly.png", "anomaly_npy": f"{name}_anomaly.npy", "mask": f"{name}_mask.png"}
    written.append(job.out_dir / files["anomaly_map"])
    rendering.save_map_png16(written[-1], job.pixel_map, *job.map_range)
    written.append(job.out_dir / files["anomaly_npy"])
    save_npy(written[-1], job.pixel_map.astype(np.float32, copy=False))
    written.append(job.out_dir / files["mask"])
    rendering.save_png(written[-1], job.mask.astype(np.uint8) * np.uint8(255))
    if job.image is not None:
        files["overlay"] = f"{name}_overlay.png"
        small_image, small_map, small_mask = _thumbnail(job.image, job.pixel_map, job.mask, OVERLAY_MAX_SIDE)
        overlay = rendering.overlay_image(small_image, small_map, small_mask, *job.color_range)
        written.append(job.out_dir / files["overlay"])
        rendering.save_png(written[-1], overlay)
    return files


def _write_image_job(job: ImageJob) -> tuple[dict | BaseException, list[Path]]:
    """(file names, files) of ``job``, or (error, []) with what it wrote removed: what a writer process runs."""
    return _attempt(functools.partial(write_image_files, job))


# ---------------------------------------------------------------------- the writer


class PredictionWriter:
    """Runs a fitted detector over inputs and writes every output; ``finish`` adds summary.json and index.html.

    ``overwrite``: replace an earlier run's results in ``out_dir`` (otherwise a folder holding files is refused).
    ``strict``: stop at the first input that cannot be read instead of skipping it with a row saying why.
    ``dicom_out``: for a DICOM series input, the DICOM objects to write besides the NIfTI maps ("seg": a
    Segmentation of the mask, "pmap": a Parametric Map of the scores; () for none). None (the default) means
    both where the series allows (a series without the UIDs they must reference gets a warning and NIfTI only);
    objects asked for explicitly are required (the input is skipped with a sentence if they cannot be made).
    ``anonymize``: those objects get empty patient and study identifiers instead of the source's.
    ``writer_processes``: processes that encode each image's files (overlay drawing, PNG encoding) away from the
    model's Python lock; None chooses (none beside a CPU model, which threads keep fed; up to 8 beside a GPU).
    The bytes of every file and the order of the rows are the same whichever threads or processes write them.
    """

    def __init__(self, detector, out_dir: Path, fpr: float | None = None, overlays: bool = True, progress: bool = True,
                 overwrite: bool = False, strict: bool = False, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
                 context: dict | None = None, csv_name: str = "scores.csv", prepare: bool = True,
                 dicom_out: Sequence[str] | None = None, anonymize: bool = False,
                 writer_processes: int | None = None):
        self.detector = detector
        # processes that write image files (None: parallel.default_writer_processes, i.e. none beside a CPU model)
        self.writer_processes = writer_processes
        self.out_dir = Path(out_dir)
        self.fpr = detector.default_fpr if fpr is None else fpr
        self.overlays = overlays
        self.progress = progress
        self.strict = strict
        self.max_megapixels = max_megapixels
        self.dicom_out = ("seg", "pmap") if dicom_out is None else tuple(dicom_out)
        self.dicom_out_required = dicom_out is not None
        self._pseudonyms: dict[str, str] = {}  # anonymized patient / study folder names, numbered as met
        self.anonymize = anonymize
        self.context = dict(context or {})
        self.rows: list[dict] = []
        self.names: dict[Path, str] = {}
        self.pixel_threshold = detector.pixel_threshold(self.fpr)
        self.image_threshold = detector.image_threshold(self.fpr)
        self.random_weights = bool(getattr(getattr(detector, "backbone_", None), "is_random", False))
        # Colour scale of the overlays: from the healthy median to the healthiest 0.01 % tail, for scores of any sign.
        self.vmin, self.vmax = rendering.score_color_range(detector.pixel_threshold(0.5), detector.pixel_threshold(1e-4))
        # The 16-bit PNG maps store scores over map_range (clipped): a range holding every calibrated threshold.
        self.map_range = rendering.map_png_range(self.vmin, self.vmax, detector.method_.score_range,
                                                 getattr(detector, "pixel_range_", None))
        if prepare:  # False for the other torchrun ranks, which write into the folder rank 0 prepared
            prepare_results_folder(self.out_dir, overwrite)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.out_dir / csv_name
        atomic_write_text(self.csv_path, ",".join(CSV_COLUMNS) + "\n")

    @property
    def n_written(self) -> int:
        """Inputs whose outputs were written (skipped inputs not counted)."""
        return sum(row["status"] == "ok" for row in self.rows)

    @property
    def n_skipped(self) -> int:
        return sum(row["status"] != "ok" for row in self.rows)

    # ------------------------------------------------------------------ rows

    def assign_names(self, paths: Sequence[Path]) -> None:
        """Give every input of this run its unique output name up front (images and volumes together).

        A series of a PACS export is named ``<patient>/<study>/<series>`` (io.dicom_tree.export_name), so its
        results sit in the folders a viewer's lists suggest; other inputs are named by their file or folder.
        """
        from normdino.io.dicom_tree import export_name, known_series

        new = [Path(p) for p in paths if Path(p) not in self.names]
        series = {p: known_series(p) for p in new}
        plain = [p for p in new if series[p] is None]
        self.names.update(zip(plain, output_names(plain, taken=self.names.values())))
        taken = {name.casefold() for name in self.names.values()}
        for path in new:
            if series[path] is not None:
                name = export_name(series[path], self.anonymize, self._pseudonyms)
                if name.casefold() in taken:
                    name = f"{name}_{series[path].uid[-8:]}"
                taken.add(name.casefold())
                self.names[path] = name


    def _row(self, source: Path, kind: str, score: float, anomalous_fraction: float, **files: str) -> dict:
        return {"input": str(source), "kind": kind, "status": "ok", "score": f"{score:.6f}",
                "anomalous": int(score > self.image_threshold), "fpr": self.fpr,
                "pixel_threshold": f"{self.pixel_threshold:.6f}", "image_threshold": f"{self.image_threshold:.6f}",
                "anomalous_fraction": f"{anomalous_fraction:.6f}", "random_weights": int(self.random_weights),
                "message": "", **{key: files.get(key, "") for key in FILE_COLUMNS}}

    def _skipped_row(self, source: Path, kind: str, message: str) -> dict:
        from normdino.io.dicom_tree import known_series

        row = {key: "" for key in CSV_COLUMNS}
        row.update(input=str(source), kind=kind, status="skipped", fpr=self.fpr, message=message,
                   random_weights=int(self.random_weights))
        series = known_series(source)
        if series is not None:
            row.update(study_uid=series.study_uid, series_uid=series.uid)
        return row

    def _append(self, row: dict) -> None:
        """Record a row: at once (flushed) in scores.csv, then in memory for the report."""
        with self.csv_path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=CSV_COLUMNS, lineterminator="\n").writerow(row)
        self.rows.append(row)

    def _skip(self, source: Path, kind: str, err: BaseException) -> None:
        """A skipped row for an input that cannot be read or scored; under ``strict``, stop instead."""
        message = str(err) if not isinstance(err, MemoryError) else \
            f"not enough memory for {source} (about {BYTES_PER_PIXEL} bytes per pixel are needed)"
        if self.strict:
            raise InputError(f"{message} (stopped by --strict; without it such inputs are skipped)") from None
        log.warning("skipped %s: %s", source, message)
        self._append(self._skipped_row(source, kind, message))

    def skip_unusable(self, entries: Sequence[tuple[Path, str]]) -> None:
        """A ``skipped`` row (and a warning) for each folder entry that is no regular file: (path, why), as
        :class:`normdino.io.inputs.Inputs` lists them; never opened. Under ``strict``, stop at the first.
        The objects of a DICOM export that are no image volume (reports, localizers ...) are expected there:
        their rows never stop a ``strict`` run."""
        from normdino.io.dicom_tree import split_series_path

        for path, why in entries:
            if split_series_path(path) is not None:
                log.warning("skipped %s: it %s", path, why)
                self._append(self._skipped_row(Path(path), "dicom", f"{path} {why}"))
                continue
            kind = "volume" if str(path).lower().endswith((".nii", ".nii.gz")) else "image"
            self._skip(Path(path), kind, InputError(f"{path} {why}"))

    def _guard(self, source: Path, kind: str, work: Callable[[list[Path]], dict]) -> None:
        """Run ``work(written)`` for one input; on failure remove the files it wrote, then skip it or stop."""
        self._settle(source, kind, *_attempt(work))

    def _settle(self, source: Path, kind: str, outcome: dict | BaseException, written: Sequence[Path] = ()) -> None:
        """Record one input's outcome (its row, or the error of an attempt): append, skip it, or stop.

        ``written``: the input's files, removed when its row cannot be recorded (scores.csv unwritable).
        """
        if isinstance(outcome, dict):
            try:
                self._append(outcome)
            except OSError as err:
                _remove(written)
                raise OutputError(f"cannot write {self.csv_path}: {describe_write_error(err, self.out_dir)}") from None
            except BaseException:  # stopped (a signal) before its row was recorded: no map without its row
                _remove(written)
                raise
        elif isinstance(outcome, (InputError, MemoryError)):
            self._skip(source, kind, outcome)
        elif isinstance(outcome, OSError) and not _is_output_error(outcome, self.out_dir):
            self._skip(source, kind, InputError(f"cannot read {source}: {outcome.strerror or outcome}"))
        elif isinstance(outcome, OSError):
            raise OutputError(f"cannot write {outcome.filename or self.out_dir}: "
                              f"{describe_write_error(outcome, self.out_dir)}; the "
                              f"{self.n_written} inputs finished before are listed in {self.csv_path}") from None
        else:
            raise outcome

    # ------------------------------------------------------------------ images

    def write_images(self, paths: Sequence[Path], on_image: Callable | None = None) -> None:
        """Maps (16-bit PNG + .npy), mask PNG and overlay PNG for each 2D image.

        ``on_image(path, image, prediction)``, if given, sees each image and its prediction (e.g. for a viewer).
        Threads read the next batches' images and encode the PNGs of earlier images while the model runs on
        this batch; rows are recorded in input order all the same.
        """
        paths = [Path(p) for p in paths]
        self.assign_names(paths)
        sizes = check_image_sizes(paths, self.max_megapixels, self.strict)
        device = getattr(getattr(self.detector, "backbone_", None), "device", "cpu")
        workers = default_workers(device)
        processes = default_writer_processes(device) if self.writer_processes is None else int(self.writer_processes)
        # (path, the future of its write or None, the error or (image, prediction)), in input order
        pending: deque[tuple[Path, Future | None, object]] = deque()
        pool = process_pool(processes) if processes > 0 else \
            ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="normdino-write")
        in_flight = 2 * max(workers, processes)
        with tqdm(total=len(paths), desc="predict", unit="img", disable=not self.progress) as bar:
            def settle_oldest() -> None:
                # the input leaves ``pending`` only once its row is recorded: a signal while waiting for its
                # write leaves it there, and the cleanup below removes its files
                path, future, payload = pending[0]
                if future is None:  # unreadable, too large, or failed to score
                    self._skip(path, "image", payload)
                    pending.popleft()
                else:
                    files, written = future.result()
                    outcome = self._image_row(path, payload[1], files) if isinstance(files, dict) else files
                    self._settle(path, "image", outcome, written)
                    pending.popleft()
                    if on_image is not None:
                        on_image(path, *payload)
                bar.update(1)

            batches = list(_batches_by_pixels(list(sizes.items()), self.detector.effective_batch_size, BATCH_PIXELS))

            def read_batch(batch: list) -> tuple[list[Path], list]:
                paths = [p for p, size in batch if not isinstance(size, str)]
                # already off the model's thread: one reader reads inline, more read side by side
                return paths, list(ordered_map(_read_or_error, paths, workers if workers > 1 else 0))

            reads = ordered_map(read_batch, batches, 1, ahead=2)  # the next batch is read while this one runs
            # (batch, its images as read or their errors), in the order the detector's stream takes them
            taken: deque[tuple[list, dict]] = deque()

            def readable(segment: list) -> Iterator[list[np.ndarray]]:
                for batch in segment:
                    paths, images = next(reads)
                    read = dict(zip(paths, images))
                    taken.append((batch, read))
                    yield [image for image in read.values() if not isinstance(image, BaseException)]

            stream = None
            try:
                # a stream through the detector per segment: the model runs on the next batches while this one
                # is scored, and the images it holds ahead of the model stay within STREAM_PIXELS
                for segment in _segments(batches, STREAM_PIXELS):
                    stream = self.detector.predict_batches(readable(segment), fpr=self.fpr)
                    for outcomes in stream:
                        batch, read = taken.popleft()
                        results = self._batch_results(read, outcomes)
                        for path, size in batch:
                            outcome = InputError(size) if isinstance(size, str) else results[path]
                            if isinstance(outcome, BaseException):
                                pending.append((path, None, outcome))
                            else:
                                job = self._image_job(path, *outcome)
                                pending.append((path, pool.submit(_write_image_job, job), outcome))
                            while len(pending) > in_flight:
                                settle_oldest()
                while pending:
                    settle_oldest()
            finally:  # stopped early: let the writes under way end, and remove the files of unrecorded inputs
                if stream is not None:
                    stream.close()
                reads.close()
                pool.shutdown(wait=True, cancel_futures=True)
                for _, future, _ in pending:
                    if future is not None and not future.cancelled() and future.exception() is None:
                        _remove(future.result()[1])

    @staticmethod
    def _batch_results(read: dict[Path, np.ndarray | BaseException], outcomes: list
                       ) -> dict[Path, tuple[np.ndarray, object] | BaseException]:
        """(image, prediction) of each path of a batch, or the error of its reading or its prediction."""
        predicted = iter(outcomes)
        results: dict[Path, tuple[np.ndarray, object] | BaseException] = {}
        for path, image in read.items():
            if isinstance(image, BaseException):
                results[path] = image
            else:
                outcome = next(predicted)
                results[path] = outcome if isinstance(outcome, BaseException) else (image, outcome)
        return results

    def _image_job(self, path: Path, image: np.ndarray, pred) -> "ImageJob":
        return ImageJob(self.out_dir, self.names[path], image if self.overlays else None, pred.pixel_map, pred.mask,
                        tuple(self.map_range), (self.vmin, self.vmax))

    def _image_row(self, path: Path, pred, files: dict) -> dict:
        return self._row(path, "image", pred.score, float(pred.mask.mean()), **files)

    def _write_image_outputs(self, path: Path, image: np.ndarray, pred, written: list[Path]) -> dict:
        return self._image_row(path, pred, write_image_files(self._image_job(path, image, pred), written))

    # ------------------------------------------------------------------ volumes

    def write_volume(self, path: Path, options, on_slice: Callable | None = None) -> None:
        """``<name>_anomaly.nii.gz`` (float32), ``<name>_mask.nii.gz`` (uint8) in the input's exact geometry, and
        ``<name>_top_slices.png``, a strip of the highest-scoring slices.

        Slices stream from the scan through the detector into both files; skipped slices stay 0.
        ``on_slice(index, slice_image, prediction)``, if given, sees each kept slice (e.g. for a viewer).
        """
        path = Path(path)
        self.assign_names([path])
        self._guard(path, "volume", lambda written: self._write_volume_outputs(path, options, on_slice, written))

    def _write_volume_outputs(self, path: Path, options, on_slice: Callable | None, written: list[Path]) -> dict:
        from normdino.io.nifti import VolumeWriter
        from normdino.io.volumes import Volume

        name = self.names[path]
        files = {"anomaly_map": f"{name}_anomaly.nii.gz", "mask": f"{name}_mask.nii.gz",
                 "top_slices": f"{name}_top_slices.png"}
        top_slices: list = []  # min-heap of (score, index, thumbnails...) of the best TOP_SLICES slices
        with Volume.open(path, volume_index=options.volume_index) as volume:
            check_megapixels(f"the slices of {path}", volume.slice_shape(options.axis), self.max_megapixels,
                             BYTES_PER_PIXEL)
            indices = volume.slice_indices(options)
            top = TopFraction(self.detector.top_fraction, len(indices))
            n_voxels = n_anomalous = 0
            written += [self.out_dir / files["anomaly_map"], self.out_dir / files["mask"]]
            with tqdm(total=len(indices), desc=name, unit="slice", disable=not self.progress) as bar, \
                    VolumeWriter(volume, written[0], options.axis, np.float32) as maps, \
                    VolumeWriter(volume, written[1], options.axis, np.uint8) as masks:
                # One stream of slices through the detector, as image files go: its loader thread prepares the
                # next slices while the model runs; a bounded number of slices is ever in flight (iter_predict's
                # look-ahead), and each slice's map goes to the files as soon as it is scored.
                in_flight: deque[tuple[int, np.ndarray]] = deque()

                def stream() -> Iterator[np.ndarray]:
                    for index, image_slice in volume.iter_slices(options, indices=indices):
                        in_flight.append((index, image_slice))
                        yield image_slice

                for pred in self.detector.iter_predict(stream(), fpr=self.fpr):
                    index, image_slice = in_flight.popleft()
                    maps.write(index, pred.pixel_map)
                    masks.write(index, pred.mask.astype(np.uint8))
                    top.add(pred.pixel_map)
                    n_voxels += pred.mask.size
                    n_anomalous += int(pred.mask.sum())
                    entry = (float(pred.score), int(index),
                             *_thumbnail(image_slice, pred.pixel_map, pred.mask, STRIP_SIDE))
                    (heapq.heappush if len(top_slices) < TOP_SLICES else heapq.heappushpop)(top_slices, entry)
                    if on_slice is not None:
                        on_slice(index, image_slice, pred)
                    bar.update(1)
            if volume.kind == "dicom" and self.dicom_out:
                self._write_dicom_results(volume, name, indices, options, written, files)
            info = volume.info
        if top_slices:
            written.append(self.out_dir / files["top_slices"])
            rendering.save_png(written[-1], _slice_strip(sorted(top_slices, reverse=True), self.vmin, self.vmax))
        else:
            files.pop("top_slices")
        row = self._row(path, "volume", top.mean(), n_anomalous / max(1, n_voxels), **files)
        row.update(study_uid=info.get("study_uid", ""), series_uid=info.get("series_uid", ""))
        return row

    def _write_dicom_results(self, volume, name: str, indices: Sequence[int], options, written: list[Path],
                             files: dict) -> None:
        """``<name>_seg.dcm`` and ``<name>_pmap.dcm`` from the NIfTI mask and map just written (see io.dicom_results)."""
        from normdino import __version__
        from normdino.io import dicom_results
        from normdino.io.nifti import import_nibabel

        nib = import_nibabel()
        try:
            sources = dicom_results.read_sources(volume.files, anonymize=self.anonymize)
        except InputError as err:
            if self.dicom_out_required:
                raise
            log.warning("%s: no DICOM Segmentation or Parametric Map: %s", volume.path, err)
            return
        parameters = {"fpr": f"{self.fpr:g}", "pixel_threshold": f"{self.pixel_threshold:.6g}"}
        if self.random_weights:
            parameters["random_weights"] = "yes: not a result of DINO weights"
        algorithm = dicom_results.Algorithm(method=self.detector.method_name, version=__version__,
                                            parameters=parameters)
        map_path, mask_path = self.out_dir / files["anomaly_map"], self.out_dir / files["mask"]
        if "seg" in self.dicom_out:
            files["dicom_seg"] = f"{name}_seg.dcm"
            written.append(self.out_dir / files["dicom_seg"])
            mask = np.asarray(nib.load(mask_path).dataobj)
            dicom_results.write_segmentation(written[-1], sources, mask, algorithm, anonymize=self.anonymize)
        if "pmap" in self.dicom_out:
            files["dicom_pmap"] = f"{name}_pmap.dcm"
            written.append(self.out_dir / files["dicom_pmap"])
            scores = np.asarray(nib.load(map_path).dataobj, dtype=np.float32)
            frames = indices if volume.resolve_axis(options.axis) == 2 else range(volume.shape[2])
            dicom_results.write_parametric_map(written[-1], sources, scores, frames, algorithm,
                                               (self.vmin, self.vmax), anonymize=self.anonymize)

    # ------------------------------------------------------------------ summary and report

    def summary(self) -> dict:
        backbone = getattr(self.detector, "backbone_", None)
        return {
            **self.context,
            "backbone": getattr(backbone, "name", None), "random_weights": self.random_weights,
            "warning": RANDOM_WARNING if self.random_weights else None,
            "fpr": self.fpr, "pixel_threshold": self.pixel_threshold, "image_threshold": self.image_threshold,
            "method": self.detector.method_name, "png_map_range": list(self.map_range),
            "png_map_meaning": "16-bit anomaly PNG value v means score = lo + v / 65535 * (hi - lo), [lo, hi] = "
                               "png_map_range (clipped); the .npy files hold the exact float32 scores",
            "overlay_color_range": [self.vmin, self.vmax],
            "n_inputs": len(self.rows), "n_written": self.n_written, "n_skipped": self.n_skipped,
            "n_anomalous": sum(row["anomalous"] == 1 for row in self.rows),
        }

    def adopt_rows(self, rows: Sequence[dict], write: bool = True) -> None:
        """Take ``rows`` as this run's rows (e.g. every torchrun rank's, in input order) and rewrite the CSV with them."""
        self.rows = list(rows)
        if write:
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.rows)
            atomic_write_text(self.csv_path, buffer.getvalue())

    def finish(self, stopped: str | None = None) -> Path:
        """Write ``summary.json`` and ``index.html`` (scores.csv is already complete); returns the CSV's path.

        ``stopped``: why the run ended early (a signal, a full disk, an error); the summary then says
        ``"complete": false`` and the reason, so a partial folder is never taken for a whole one.
        """
        summary = {**self.summary(), "complete": stopped is None, "stopped": stopped}
        atomic_write_text(self.out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        write_index(self.out_dir / "index.html", self.rows, summary)
        return self.csv_path


def _read_or_error(path: Path) -> np.ndarray | InputError | MemoryError:
    """The image at ``path``, or the error that says why it cannot be read."""
    from normdino.io.reading import read_image

    try:
        return read_image(path)
    except (InputError, MemoryError) as err:
        return err


def _attempt(work: Callable[[list[Path]], dict]) -> tuple[dict | BaseException, list[Path]]:
    """(row, files) of ``work(written)``; on failure (error, files), the files it wrote removed. Any thread."""
    written: list[Path] = []
    try:
        return work(written), written
    except BaseException as err:  # re-raised, or turned into a skipped row, by PredictionWriter._settle
        _remove(written)
        return err, written


def _remove(paths: Iterable[Path]) -> None:
    for path in paths:
        try:
            path.unlink()
        except OSError:
            pass


# ---------------------------------------------------------------------- volumes' image score


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
