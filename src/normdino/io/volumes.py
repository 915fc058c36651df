"""Medical volumes in, maps out: NIfTI files and DICOM series read as normalised 2D slices,
and per-slice maps written back as NIfTI in exactly the input's voxel grid.

Conventions
-----------
* A volume is a 3D array ``vol[i, j, k]`` with a 4x4 affine mapping voxel (i, j, k) to world
  millimetres in the NIfTI RAS+ convention.  NIfTI: the file's own array axes and affine
  (what ``nibabel.load(path).affine`` gives).  DICOM series: ``i`` = row, ``j`` = column of
  each file's pixel array, ``k`` = slice position along the slice normal, ascending; the
  affine comes from ImagePositionPatient / ImageOrientationPatient / PixelSpacing (LPS),
  flipped to RAS.
* Slice ``k`` along array axis ``a`` is ``vol[(slice(None),) * a + (k,)]``: the two other
  array axes, in increasing order, as rows and columns (no transposition or flip to make it
  display upright).  :class:`normdino.io.nifti.VolumeWriter` puts a map back with the same indexing, so map
  pixel (r, c) of slice k lands on the voxel the input pixel (r, c) came from.
* Named axes are resolved from the affine with ``nibabel.aff2axcodes`` (closest world axis
  of each array axis, oblique affines included): "axial" is the array axis pointing S/I,
  "coronal" A/P, "sagittal" L/R.
* Memory: slices are read a slab (<= 32 MB) at a time along the file's slowest array axis
  (the third), never the whole volume.  Slicing along another axis first copies the volume,
  slice-major, to a temp file (one pass; disk and page cache, not process memory).  Maps are
  written plane by plane as they arrive along the third axis, else gathered in a temp file.

nibabel and pydicom are optional (``pip install "normdino[medical]"``) and imported lazily.

This module holds the :class:`Volume` type and the path rules; the rest lives one idea per module:
``io.nifti`` (NIfTI reading and writing), ``io.dicom`` (series files, geometry, pixels), ``io.slicing``
(:class:`SliceOptions`, settings), ``io.intensity`` (normalisation rules), ``io.slabs`` (bounded memory).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from normdino.errors import InputError
from normdino.io.dicom import DICOM_PROBE_FILES, dicom_files, looks_like_dicom, open_dicom_files, open_dicom_series
from normdino.io.dicom_tree import series_files, split_series_path
from normdino.io.intensity import normalise
from normdino.io.nifti import import_nibabel, is_nifti_name, open_nifti
from normdino.io.reading import warn_if_tiny
from normdino.io.slabs import SliceStore, planes_per_slab
from normdino.io.slicing import SliceOptions

logger = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".dcm")

_AXIS_CODES = {"axial": ("S", "I"), "coronal": ("A", "P"), "sagittal": ("L", "R")}
_MAX_STAT_SAMPLES = 2_000_000


# --------------------------------------------------------------------------- paths


def is_volume(path: str | os.PathLike) -> bool:
    """True for a .nii/.nii.gz file or a folder holding DICOM files (checked cheaply)."""
    path = Path(path)
    if path.is_file():
        return is_nifti_name(path)
    if path.is_dir():
        try:
            return bool(dicom_files(path, limit=DICOM_PROBE_FILES))
        except OSError:
            return False
    return False


def list_volumes(path: str | os.PathLike) -> list[Path]:
    """The volume ``path`` itself, or the volumes directly inside the folder ``path``, sorted."""
    path = Path(path)
    if is_volume(path):
        return [path]
    if not path.is_dir():
        raise InputError(f"{path} is neither a NIfTI file, a DICOM folder nor a folder of volumes.")
    found = [child for child in sorted(path.iterdir()) if not child.name.startswith(".") and is_volume(child)]
    if not found:
        raise InputError(f"No NIfTI (.nii, .nii.gz) or DICOM series found in {path}.")
    return found


def volume_stem(path: str | os.PathLike) -> str:
    """Name of a volume without its suffix, for output names: scan.nii.gz -> scan, a DICOM folder -> its name."""
    path = Path(path)
    name = path.name
    for suffix in (".nii.gz", ".nii", ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


# --------------------------------------------------------------------------- volume


class Volume:
    """A lazily read 3D volume: geometry at hand, voxels read slice by slice on demand.

    Attributes: ``path``, ``kind`` ("nifti" or "dicom"), ``shape`` (3D), ``affine`` (4x4, RAS mm),
    ``dtype`` (stored data type), ``header`` (nibabel header for NIfTI, else None), ``files``
    (DICOM files sorted by slice position), ``volume_index`` (the 4D volume used, NIfTI), ``info`` (DICOM:
    study_uid, series_uid, modality, series_description, series_number; else empty). ``path`` may name one
    series of a PACS export, ``<folder>#<SeriesInstanceUID>`` (see io.dicom_tree).
    """

    def __init__(self, path: Path, kind: str, shape: tuple[int, int, int], affine: np.ndarray, source: Any,
                 *, header: Any = None, files: tuple[Path, ...] = (), volume_index: int | None = None) -> None:
        self.path = path
        self.kind = kind
        self.shape = shape
        self.affine = affine
        self.header = header
        self.files = files
        self.volume_index = volume_index
        self.dtype = source.raw_dtype
        self.info: dict = dict(getattr(source, "info", {}) or {})  # DICOM: study_uid, series_uid, modality, ...
        self._source = source
        self._stores: dict[int, SliceStore] = {}  # axis -> slice-major temp-file copy of the stored values
        self._stats: dict[tuple[float, float], dict[str, float]] = {}
        self._foreground: dict[tuple, dict[int, float]] = {}
        self._warned: set[str] = set()

    # ---- opening

    @classmethod
    def open(cls, path: str | os.PathLike, volume_index: int | None = None) -> "Volume":
        """Open a .nii/.nii.gz file or a DICOM series folder; headers only, no voxel data yet."""
        path = Path(path)
        if not path.exists() and split_series_path(path) is not None:  # one series of a PACS export
            if volume_index not in (None, 0):
                raise InputError(f"--volume-index {volume_index} was given but {path} is a DICOM series with one volume.")
            source, affine = open_dicom_files(series_files(path), path)
            return cls(path, "dicom", source.shape, affine, source, files=tuple(source.files))
        if not path.exists():
            raise InputError(f"{path} does not exist.")
        if path.is_dir():
            if volume_index not in (None, 0):
                raise InputError(f"--volume-index {volume_index} was given but {path} is a DICOM series with one volume.")
            source, affine = open_dicom_series(path)
            return cls(path, "dicom", source.shape, affine, source, files=tuple(source.files))
        if not path.is_file():  # a FIFO or device: opening it could block forever
            raise InputError(f"{path} is not a regular file (a FIFO, socket or device?): pass a volume file or folder.")
        if is_nifti_name(path):
            source, affine, header, index = open_nifti(path, volume_index)
            return cls(path, "nifti", source.shape4[:3], affine, source, header=header, volume_index=index)
        if path.suffix.lower() == ".dcm" or looks_like_dicom(path):
            raise InputError(f"{path} is a single DICOM file: pass the folder that holds its series.")
        raise InputError(f"{path} is not a volume: use a .nii or .nii.gz file or a folder of DICOM files.")

    def close(self) -> None:
        """Delete the temp-file copies made for slicing along non-native axes, if any."""
        stores, self._stores = self._stores, {}
        for store in stores.values():
            store.close()

    def __enter__(self) -> "Volume":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Volume({str(self.path)!r}, kind={self.kind!r}, shape={self.shape}, axcodes={''.join(self.axcodes)})"

    # ---- geometry

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def axcodes(self) -> tuple[str, str, str]:
        """World direction (R/L, A/P, S/I) closest to each array axis."""
        nib = import_nibabel()
        return tuple(str(c) for c in nib.aff2axcodes(self.affine))

    @property
    def planar_axis(self) -> int | None:
        """The one array axis of length 1 of a single-slice volume (a 2-D NIfTI is (H, W, 1)), else None."""
        ones = [a for a, n in enumerate(self.shape) if n == 1]
        return ones[0] if len(ones) == 1 else None

    def resolve_axis(self, axis: str | int) -> int:
        """Array axis for "axial" / "coronal" / "sagittal" (from the affine) or an integer axis.

        A single-slice volume (e.g. a 2-D NIfTI) is one 2D image whatever the axis asked for: its
        slicing axis is the one of length 1.
        """
        if self.planar_axis is not None:
            return self.planar_axis
        if isinstance(axis, str) and axis.strip().lstrip("-").isdigit():
            axis = int(axis)
        if isinstance(axis, (int, np.integer)):
            if not -3 <= axis < 3:
                raise InputError(f"Slicing axis {axis} is out of range for a 3D volume: use 0, 1 or 2.")
            return int(axis) % 3
        name = str(axis).strip().lower()
        if name not in _AXIS_CODES:
            raise InputError(f"Unknown slicing axis {axis!r}: use axial, coronal, sagittal or 0, 1, 2.")
        codes = self.axcodes
        for index, code in enumerate(codes):
            if code in _AXIS_CODES[name]:
                return index
        raise InputError(f"The affine of {self.path} does not say which array axis is {name} "
                         f"(orientation {codes}): give the axis as 0, 1 or 2.")

    def slice_shape(self, axis: str | int) -> tuple[int, int]:
        """Shape of one 2D slice along ``axis``."""
        a = self.resolve_axis(axis)
        return tuple(s for i, s in enumerate(self.shape) if i != a)

    # ---- voxels

    def _slice_store(self, axis: int) -> SliceStore:
        """A slice-major temp-file copy of the stored values for slicing along axis 0 or 1 (one pass to make)."""
        if axis in self._stores:
            return self._stores[axis]
        store = SliceStore(self.shape[axis], self.shape[1 - axis], self.shape[2], self._source.plane_dtype,
                           planes_per_slab(self.shape[:2], self._source.plane_dtype))
        try:
            planes: list[np.ndarray] = []
            first = 0
            for k, plane in self._source.iter_raw_planes(range(self.shape[2])):
                planes.append(plane)
                if len(planes) == store.block or k == self.shape[2] - 1:
                    store.write_block(first, np.moveaxis(np.stack(planes, axis=-1), axis, 0))
                    planes, first = [], k + 1
        except BaseException:
            store.close()
            raise
        self._stores[axis] = store
        return store

    def _raw_slices(self, axis: int, indices: Iterable[int]) -> Iterator[tuple[int, np.ndarray]]:
        """(k, real-valued float32 slice k along ``axis``) for sorted ``indices``."""
        if axis == 2:
            for k, plane in self._source.iter_raw_planes(indices):
                out = np.ascontiguousarray(self._source.scale(plane))
                del plane  # a view into the source's slab: let the slab go before the next one is read
                yield k, out
            return
        store = self._slice_store(axis)
        for k in indices:
            yield k, self._source.scale(store.read_slice(k))

    def statistics(self, percentiles: tuple[float, float] = (0.5, 99.5)) -> dict[str, float]:
        """min, max and the two percentiles of the volume's finite values (one pass, cached).

        Percentiles are exact up to 2 million voxels; above that they are estimated on a seeded
        uniform random sample of about 2 million voxels, so memory stays bounded.
        """
        key = (float(percentiles[0]), float(percentiles[1]))
        if key in self._stats:
            return self._stats[key]
        total = int(np.prod(self.shape))
        rate = min(1.0, _MAX_STAT_SAMPLES / max(1, total))
        rng = np.random.default_rng(0)
        samples, low, high = [], math.inf, -math.inf
        axis = next(iter(self._stores), 2)  # any axis will do: reuse a temp-file copy if there is one
        for _, plane in self._raw_slices(axis, range(self.shape[axis])):
            values = plane.ravel()
            if values.dtype.kind == "f" and not np.isfinite(values).all():
                values = values[np.isfinite(values)]
            if values.size == 0:
                continue
            low, high = min(low, float(values.min())), max(high, float(values.max()))
            if rate < 1.0:
                values = values[rng.integers(0, values.size, int(math.ceil(values.size * rate)))]
            samples.append(values.copy())
        if not samples:
            raise InputError(f"{self.path} holds no finite voxel value (all NaN or infinite): there is nothing to score.")
        sample = np.concatenate(samples)
        p_low, p_high = np.percentile(sample, key)
        stats = {"min": low, "max": high, "p_low": float(p_low), "p_high": float(p_high)}
        self._stats[key] = stats
        return stats

    def intensity_range(self, options: SliceOptions) -> tuple[float, float] | None:
        """The (low, high) real values mapped to 0 and 1 by ``options``; None for "none"."""
        if options.normalization == "window":
            return options.window
        if options.normalization == "percentile":
            stats = self.statistics(options.percentiles)
            return stats["p_low"], stats["p_high"]
        if options.normalization == "dtype":
            scaled = self.kind == "nifti" and (self._source.slope != 1.0 or self._source.inter != 0.0)
            if (self.dtype.kind != "u" or scaled) and options.fallback == "percentile":
                if "fallback" not in self._warned:
                    self._warned.add("fallback")
                    logger.warning("WARNING: %s stores %s%s voxels, which have no fixed range, so its slices cannot be "
                                   "scaled like the model's training images (by their type's range); scaling them "
                                   "with percentiles %g-%g instead: scores and verdicts may be off. Fit the model on "
                                   "volumes, or store the volume as uint8/uint16.", self.path,
                                   "scaled " if scaled else "", self.dtype, *options.percentiles)
                stats = self.statistics(options.percentiles)
                return stats["p_low"], stats["p_high"]
            if self.dtype.kind != "u" or scaled:
                raise InputError(f"normalization 'dtype' needs unsigned integer voxels, but {self.path} stores "
                                 f"{'scaled ' if scaled else ''}{self.dtype}: use 'percentile' or 'window'.")
            return 0.0, self._type_top(options)
        return None

    def _type_top(self, options: SliceOptions) -> float:
        """The value "dtype" maps to 1: the type's largest, or a DICOM's own 2**BitsStored - 1 (8-bit values in a
        16-bit container are 8-bit data). Warns once when the voxels would come out nearly black by it."""
        top = float(np.iinfo(self.dtype).max)
        bits = getattr(self._source, "bits_stored", None)
        if bits and 0 < bits < 8 * self.dtype.itemsize:
            top = float(2**bits - 1)
        if top > 255 and "dark" not in self._warned:
            high = self.statistics(options.percentiles)["max"]
            if high <= 255:
                self._warned.add("dark")
                logger.warning("WARNING: %s stores %s voxels that all lie in 0..%g, so scaled like the model's 2D "
                               "training images (by the type's range, value / %g) its slices are nearly black (at "
                               "most %.4f) and its scores say little; if it holds 8-bit data, store it as uint8 (or "
                               "with BitsStored 8), or pass --normalization window --window 0,255.", self.path,
                               self.dtype, high, top, high / top)
        return top

    def _foreground_level(self, options: SliceOptions) -> tuple[float, bool]:
        """Threshold for foreground pixels and whether it applies to normalised (True) or raw values."""
        if options.normalization == "none":
            stats = self.statistics(options.percentiles)
            return stats["min"] + options.foreground_threshold * (stats["max"] - stats["min"]), False
        return options.foreground_threshold, True

    def _candidates(self, axis: int, options: SliceOptions) -> list[int]:
        indices = range(self.shape[axis])
        if options.slices is not None:
            indices = indices[options.slices]
        return sorted(indices)

    def _iter(self, options: SliceOptions, indices: list[int] | None) -> Iterator[tuple[int, np.ndarray, bool]]:
        """(k, normalised slice, kept?) over the candidate slices, applying the foreground rule."""
        axis = self.resolve_axis(options.axis)
        candidates = self._candidates(axis, options) if indices is None else sorted(set(int(k) for k in indices))
        bad = [k for k in candidates if not 0 <= k < self.shape[axis]]
        if bad:
            raise InputError(f"Slice {bad[0]} is out of range for axis {axis} of {self.path} ({self.shape[axis]} slices).")
        if "tiny" not in self._warned:
            self._warned.add("tiny")
            warn_if_tiny(self.slice_shape(axis), f"{self.path} (slices along axis {axis})")
        if axis != 2:
            self._slice_store(axis)  # before the statistics pass, which can then reuse it
        if self.dtype.kind == "f" and options.normalization in ("window", "dtype"):
            self.statistics(options.percentiles)  # one rule with 2D images: a volume without finite values is refused
        value_range = self.intensity_range(options)
        check = indices is None and options.min_foreground > 0
        cache_key = (axis, options.normalization, tuple(options.percentiles), options.window,
                     options.foreground_threshold, options.eight_bit)
        fractions = self._foreground.setdefault(cache_key, {})
        if check and all(k in fractions for k in candidates):  # known from slice_indices(): read only kept slices
            candidates = [k for k in candidates if fractions[k] >= options.min_foreground]
            check = False
        level, on_normalised = self._foreground_level(options) if check else (0.0, True)
        for k, raw in self._raw_slices(axis, candidates):
            out = raw if value_range is None else normalise(raw, *value_range)
            if options.eight_bit and value_range is not None:
                out = np.round(out * 255.0) / np.float32(255.0)
            keep = True
            if check:
                if k not in fractions:
                    fractions[k] = float(np.mean((out if on_normalised else raw) > level))
                keep = fractions[k] >= options.min_foreground
            yield k, out, keep

    def slice_indices(self, options: SliceOptions) -> list[int]:
        """Slices kept along the options' axis: the slice range, then the foreground rule."""
        axis = self.resolve_axis(options.axis)
        candidates = self._candidates(axis, options)
        if candidates and options.min_foreground > 0:
            candidates = [k for k, _, keep in self._iter(options, None) if keep]
        if not candidates:
            raise InputError(self._nothing_selected(axis, options))
        return candidates

    def _nothing_selected(self, axis: int, options: SliceOptions) -> str:
        """The sentence for a selection that keeps no slice."""
        n = self.shape[axis]
        if options.slices is not None and not self._candidates(axis, options):
            start, stop, step = options.slices.indices(n)
            return (f"--slices {options.slices.start}:{options.slices.stop}{':' + str(step) if step != 1 else ''} "
                    f"selects no slice of {self.path}, which has {n} slices along axis {axis} (0..{n - 1}).")
        return (f"No slice of {self.path} along axis {axis} has a foreground fraction of at least "
                f"{options.min_foreground:g} (--min-foreground): lower it.")

    def iter_slices(self, options: SliceOptions, indices: Iterable[int] | None = None
                    ) -> Iterator[tuple[int, np.ndarray]]:
        """(k, float32 2D slice) in increasing k; normalised to [0, 1] unless normalization is "none".

        ``indices`` overrides the range and foreground rule (e.g. read a mask's slices at the
        image's kept indices).  Reads slab by slab; percentile statistics take one extra pass.
        """
        kept = 0
        for k, out, keep in self._iter(options, None if indices is None else list(indices)):
            if keep:
                kept += 1
                yield k, out
        if indices is None and kept == 0:
            raise InputError(self._nothing_selected(self.resolve_axis(options.axis), options))

    def read_slice(self, index: int, options: SliceOptions) -> np.ndarray:
        """One slice, normalised as ``options`` say (range and foreground rule ignored)."""
        return next(self.iter_slices(options, indices=[index]))[1]


def read_mask_volume(path: str | os.PathLike, reference: Volume) -> Volume:
    """Open a mask volume and check it lies on the reference's voxel grid (same shape and affine)."""
    mask = Volume.open(path)
    if mask.shape != reference.shape:
        raise InputError(f"Mask {mask.path} has shape {mask.shape} but its image {reference.path} has "
                         f"{reference.shape}: masks must be on the image's voxel grid.")
    if not np.allclose(mask.affine, reference.affine, rtol=1e-5, atol=1e-4):
        raise InputError(f"Mask {mask.path} has another affine than its image {reference.path}: resample "
                         f"the mask onto the image's voxel grid.")
    return mask
