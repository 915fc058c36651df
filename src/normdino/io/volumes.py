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
  display upright).  :class:`VolumeWriter` puts a map back with the same indexing, so map
  pixel (r, c) of slice k lands on the voxel the input pixel (r, c) came from.
* Named axes are resolved from the affine with ``nibabel.aff2axcodes`` (closest world axis
  of each array axis, oblique affines included): "axial" is the array axis pointing S/I,
  "coronal" A/P, "sagittal" L/R.
* Memory: slices are read a slab (<= 32 MB) at a time along the file's slowest array axis
  (the third), never the whole volume.  Slicing along another axis first copies the volume,
  slice-major, to a temp file (one pass; disk and page cache, not process memory).  Maps are
  written plane by plane as they arrive along the third axis, else gathered in a temp file.

nibabel and pydicom are optional (``pip install "normdino[medical]"``) and imported lazily.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import math
import os
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Mapping

import numpy as np

from normdino.errors import InputError
from normdino.files import atomic_path
from normdino.io import slabs
from normdino.io.dicom import DICOM_PROBE_FILES, dicom_files, looks_like_dicom, open_dicom_series
from normdino.io.intensity import normalise
from normdino.io.reading import warn_if_tiny
from normdino.io.slabs import SliceStore, planes_per_slab, runs
from normdino.io.slicing import SliceOptions

logger = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".dcm")

_MEDICAL_HINT = 'pip install "normdino[medical]"'
_AXIS_CODES = {"axial": ("S", "I"), "coronal": ("A", "P"), "sagittal": ("L", "R")}
_MAX_STAT_SAMPLES = 2_000_000
_READ_ERRORS = (OSError, EOFError, zlib.error, ValueError)


def _nibabel() -> Any:
    """Import nibabel, or say how to install it."""
    try:
        import nibabel
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise InputError(f"Reading and writing NIfTI volumes needs nibabel: {_MEDICAL_HINT}.") from err
    return nibabel


# --------------------------------------------------------------------------- paths


def _is_nifti_name(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def is_volume(path: str | os.PathLike) -> bool:
    """True for a .nii/.nii.gz file or a folder holding DICOM files (checked cheaply)."""
    path = Path(path)
    if path.is_file():
        return _is_nifti_name(path)
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


# --------------------------------------------------------------------------- sources


class _NiftiSource:
    """Voxel planes of one 3D volume in a .nii or .nii.gz file, read slab by slab through nibabel's array proxy.

    The proxy reads only the bytes of the requested slab (``fileslice``); the file stays open between slabs,
    so a .nii.gz is decompressed once front to back when slabs come in increasing order. Planes come out
    as stored (the file's dtype) when the file has no scaling, else as real values in float32.
    """

    def __init__(self, path: Path, proxy: Any, shape4: tuple[int, ...], time_index: int) -> None:
        self.path = path
        self.proxy = proxy
        self.shape4 = shape4
        self.raw_dtype = np.dtype(proxy.dtype)
        self.offset = int(proxy.offset)  # the header's vox_offset is reset by nibabel
        self.slope = float(proxy.slope)
        self.inter = float(proxy.inter)
        self.time_index = time_index
        self.compressed = path.name.lower().endswith(".gz")
        self.scaled = self.slope != 1.0 or self.inter != 0.0
        self.plane_dtype = np.dtype(np.float32) if self.scaled else self.raw_dtype

    @property
    def plane_bytes(self) -> int:
        return self.shape4[0] * self.shape4[1] * self.raw_dtype.itemsize

    def scale(self, plane: np.ndarray) -> np.ndarray:
        """A plane as read (already real-valued) -> float32."""
        return np.asarray(plane, dtype=np.float32)

    def _slicer(self, start: int, stop: int) -> tuple:
        """Index of planes [start, stop) of the chosen volume in the proxy's own dimensions (2D to 7D)."""
        ndim = len(self.proxy.shape)
        if ndim == 2:
            return (slice(None), slice(None))
        extra = (self.time_index,) + (0,) * (ndim - 4) if ndim >= 4 else ()
        return (slice(None), slice(None), slice(start, stop)) + extra

    def iter_raw_planes(self, indices: Iterable[int]) -> Iterator[tuple[int, np.ndarray]]:
        """(k, plane k along the third axis) for sorted ``indices``, one slab (<= 32 MB as read) at a time."""
        nx, ny = self.shape4[:2]
        read_bytes = self.plane_bytes + (nx * ny * 8 if self.scaled else 0)  # raw slab + nibabel's scaled copy
        slab = max(1, slabs.SLAB_BYTES // max(1, read_bytes))
        for start, stop in runs(indices, slab):
            try:
                block = np.asarray(self.proxy[self._slicer(start, stop)])
            except (*_READ_ERRORS, RuntimeError) as err:
                raise InputError(f"{self.path} is truncated or corrupt ({err}); export or download it again.") from err
            block = block.reshape((nx, ny, stop - start))
            if self.scaled:
                block = block.astype(np.float32, copy=False)
            for offset_in_block in range(stop - start):
                yield start + offset_in_block, block[:, :, offset_in_block]

    def check_complete(self) -> None:
        """Refuse a file too short for its header's data (cheap: file size, or the gzip ISIZE trailer)."""
        expected = self.offset + int(np.prod(self.shape4)) * self.raw_dtype.itemsize
        if not self.compressed:
            if self.path.stat().st_size < expected:
                raise InputError(f"{self.path} is truncated: its header promises more image data than the file holds.")
            return
        with open(self.path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            isize = int.from_bytes(f.read(4), "little")
        if isize == expected % 2**32:
            return
        # Trailer disagrees (truncated file, or a multi-member / padded gzip): decompress once to be sure.
        total = 0
        try:
            opened = gzip.open(self.path, "rb")
        except OSError as err:
            raise InputError(f"Cannot read {self.path}: {err}.") from err
        with opened as f:
            while True:
                try:
                    chunk = f.read(16 * 2**20)
                except _READ_ERRORS as err:
                    raise InputError(f"{self.path} is truncated or corrupt ({err}); export or download it again.") from err
                if not chunk:
                    break
                total += len(chunk)
        if total < expected:
            raise InputError(f"{self.path} is truncated: its header promises more image data than the file holds.")


# --------------------------------------------------------------------------- volume


class Volume:
    """A lazily read 3D volume: geometry at hand, voxels read slice by slice on demand.

    Attributes: ``path``, ``kind`` ("nifti" or "dicom"), ``shape`` (3D), ``affine`` (4x4, RAS mm),
    ``dtype`` (stored data type), ``header`` (nibabel header for NIfTI, else None), ``files``
    (DICOM files sorted by slice position), ``volume_index`` (the 4D volume used, NIfTI).
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
        if not path.exists():
            raise InputError(f"{path} does not exist.")
        if path.is_dir():
            if volume_index not in (None, 0):
                raise InputError(f"--volume-index {volume_index} was given but {path} is a DICOM series with one volume.")
            source, affine = open_dicom_series(path)
            return cls(path, "dicom", source.shape, affine, source, files=tuple(source.files))
        if not path.is_file():  # a FIFO or device: opening it could block forever
            raise InputError(f"{path} is not a regular file (a FIFO, socket or device?): pass a volume file or folder.")
        if _is_nifti_name(path):
            return cls._open_nifti(path, volume_index)
        if path.suffix.lower() == ".dcm" or looks_like_dicom(path):
            raise InputError(f"{path} is a single DICOM file: pass the folder that holds its series.")
        raise InputError(f"{path} is not a volume: use a .nii or .nii.gz file or a folder of DICOM files.")

    @classmethod
    def _open_nifti(cls, path: Path, volume_index: int | None) -> "Volume":
        nib = _nibabel()
        try:
            image = nib.load(path, mmap=False, keep_file_open=True)
            header = image.header
            shape = tuple(int(s) for s in image.shape)
            proxy = image.dataobj
            dtype = np.dtype(proxy.dtype)
            affine = np.array(image.affine, dtype=np.float64)
        except InputError:
            raise
        except Exception as err:  # nibabel raises many types for a bad header or gzip stream
            raise InputError(f"{path} is not a readable NIfTI file ({err}); it may be truncated or corrupt.") from err
        if not isinstance(header, (nib.Nifti1Header, nib.Nifti2Header)) or not getattr(header, "is_single", True):
            raise InputError(f"{path} is not a single-file NIfTI image.")
        if dtype.fields is not None:
            raise InputError(f"{path} stores colour (RGB/RGBA) voxels; normdino reads grayscale volumes: convert "
                             "it to one channel first (e.g. its luminance).")
        if dtype.kind == "c":
            raise InputError(f"{path} stores complex voxels; normdino reads real-valued volumes: save the "
                             "magnitude (or the phase) as its own volume first.")
        while len(shape) > 4 and shape[-1] == 1:
            shape = shape[:-1]
        if len(shape) > 4:
            raise InputError(f"{path} has {len(shape)} dimensions {shape}: only 3D and 4D volumes are supported.")
        if len(shape) < 3:
            shape = shape + (1,) * (3 - len(shape))
        n_volumes = shape[3] if len(shape) == 4 else 1
        if n_volumes > 1 and volume_index is None:
            raise InputError(f"{path} is 4D with {n_volumes} volumes (e.g. time points or echoes): choose one "
                             f"with --volume-index 0..{n_volumes - 1}.")
        index = 0 if volume_index is None else int(volume_index)
        if not 0 <= index < n_volumes:
            raise InputError(f"--volume-index {volume_index} is out of range for {path}, which holds "
                             f"{n_volumes} volume{'s' if n_volumes > 1 else ''} (0..{n_volumes - 1}).")
        shape4 = shape[:3] + (n_volumes,)
        source = _NiftiSource(path, proxy, shape4, index)
        source.check_complete()
        return cls(path, "nifti", shape[:3], affine, source, header=header,
                   volume_index=volume_index if n_volumes > 1 or volume_index is not None else None)

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
        nib = _nibabel()
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
                yield k, np.ascontiguousarray(self._source.scale(plane))
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
            return 0.0, float(np.iinfo(self.dtype).max)
        return None

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


# --------------------------------------------------------------------------- writing


def _output_header(reference: Volume, dtype: np.dtype) -> Any:
    """A NIfTI header with the reference's geometry (qform, sform, pixdim, units) for a 3D map of ``dtype``."""
    nib = _nibabel()
    if reference.header is not None:
        source = reference.header  # same binary header (qform, sform, pixdim, units), without extensions
        header = source.__class__(source.binaryblock, source.endianness, check=False)
        header.set_data_shape(reference.shape)
    else:
        header = nib.Nifti1Header()
        header.set_data_shape(reference.shape)
        header.set_qform(reference.affine, code=1)
        header.set_sform(reference.affine, code=1)
        header.set_xyzt_units("mm")
    header.set_data_dtype(dtype)
    header.set_slope_inter(1.0, 0.0)
    header["vox_offset"] = header.single_vox_offset
    for key in ("cal_min", "cal_max", "intent_code", "intent_p1", "intent_p2", "intent_p3"):
        header[key] = 0
    header["intent_name"] = b""
    header["aux_file"] = b""
    header["descrip"] = b"normdino map"
    return header


class VolumeWriter:
    """Write 2D maps into a NIfTI volume with a reference volume's voxel grid and geometry, atomically.

    Use as a context manager and call ``write(k, map)`` per kept slice; slices never written are 0.
    Along the third array axis maps must come in increasing k and are streamed to disk (memory:
    one plane); along other axes they are gathered slice-major in a temp file and written at close.
    ``path`` must end in .nii or .nii.gz (gzip level 1); nothing appears there unless close() succeeds.
    """

    def __init__(self, reference: Volume, path: str | os.PathLike, axis: str | int = "axial",
                 dtype: Any = np.float32) -> None:
        self.reference = reference
        self.path = Path(path)
        self.axis = reference.resolve_axis(axis)
        self.dtype = np.dtype(dtype)
        if not _is_nifti_name(self.path):
            raise InputError(f"Output {self.path} must end in .nii or .nii.gz.")
        self._header = _output_header(reference, self.dtype)
        self._disk_dtype = self._header.get_data_dtype()
        self._slice_shape = reference.slice_shape(self.axis)
        self._stack: contextlib.ExitStack | None = None
        self._file: BinaryIO | None = None
        self._next = 0
        self._buffer: SliceStore | None = None
        self._written: set[int] = set()

    def __enter__(self) -> "VolumeWriter":
        self.open()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort(exc)

    def open(self) -> None:
        """Create the temp file and write the header."""
        stack = contextlib.ExitStack()
        tmp = stack.enter_context(atomic_path(self.path))
        raw = stack.enter_context(open(tmp, "wb"))
        if self.path.name.lower().endswith(".gz"):
            self._file = stack.enter_context(gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=1, mtime=0))
        else:
            self._file = raw
        self._stack = stack
        self._header.write_to(self._file)
        if self.axis != 2:  # gather slice-major in a temp file, write out along the third axis at close
            shape = self.reference.shape
            self._buffer = SliceStore(shape[self.axis], shape[1 - self.axis], shape[2], self.dtype,
                                      planes_per_slab(shape[:2], self.dtype))
            stack.callback(self._buffer.close)

    def _write_plane(self, plane: np.ndarray | None) -> None:
        if plane is None:
            self._file.write(bytes(self._plane_nbytes))
        else:
            self._file.write(np.asarray(plane, dtype=self._disk_dtype).tobytes(order="F"))

    @property
    def _plane_nbytes(self) -> int:
        return self.reference.shape[0] * self.reference.shape[1] * self.dtype.itemsize

    def write(self, index: int, slice_map: np.ndarray) -> None:
        """Put the 2D map of slice ``index`` (shape = the slice's shape) into the volume."""
        if self._file is None:
            raise RuntimeError("VolumeWriter.write() before open(); use it as a context manager.")
        index = int(index)
        slice_map = np.asarray(slice_map)
        if slice_map.shape != self._slice_shape:
            raise InputError(f"The map of slice {index} has shape {slice_map.shape} but slices of "
                             f"{self.reference.path} along axis {self.axis} are {self._slice_shape}: resize it first.")
        if not 0 <= index < self.reference.shape[self.axis]:
            raise InputError(f"Slice {index} is out of range for axis {self.axis} of {self.reference.path}.")
        if index in self._written:
            raise InputError(f"Slice {index} was written twice to {self.path}.")
        if self._buffer is not None:
            self._buffer.write_slice(index, slice_map)
        else:
            if index < self._next:
                raise InputError(f"Maps for {self.path} must come in increasing slice order (got {index} after "
                                 f"{self._next - 1}); pass a dict to write_volume_like instead.")
            while self._next < index:
                self._write_plane(None)
                self._next += 1
            self._write_plane(slice_map)
            self._next += 1
        self._written.add(index)

    def close(self) -> None:
        """Fill the remaining slices with 0, finish the file and move it onto ``path``."""
        if self._stack is None:
            return
        try:
            if self._buffer is not None:
                for _, block in self._buffer.iter_blocks():
                    block = np.moveaxis(block, 0, self.axis)
                    for i in range(block.shape[2]):
                        self._write_plane(block[:, :, i])
            else:
                while self._next < self.reference.shape[2]:
                    self._write_plane(None)
                    self._next += 1
        except BaseException as err:
            self.abort(err)
            raise
        stack, self._stack, self._file, self._buffer = self._stack, None, None, None
        stack.close()

    def abort(self, exc: BaseException | None = None) -> None:
        """Discard the temp file; ``path`` is left untouched."""
        if self._stack is None:
            return
        stack, self._stack, self._file, self._buffer = self._stack, None, None, None
        error = exc if exc is not None else RuntimeError("VolumeWriter aborted")
        stack.__exit__(type(error), error, error.__traceback__)


def write_volume_like(reference: Volume, slice_maps: Mapping[int, np.ndarray] | Iterable[tuple[int, np.ndarray]],
                      options: SliceOptions, path: str | os.PathLike, dtype: Any = np.float32) -> None:
    """Write per-slice 2D maps as a NIfTI volume in ``reference``'s voxel grid (skipped slices = 0).

    The header keeps the reference's qform, sform, pixdim and units (NIfTI input) or the affine
    computed from the DICOM geometry; the map of slice k goes where slice k was read from.
    """
    items = sorted(slice_maps.items()) if isinstance(slice_maps, Mapping) else slice_maps
    with VolumeWriter(reference, path, options.axis, dtype) as writer:
        for index, slice_map in items:
            writer.write(index, slice_map)


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
