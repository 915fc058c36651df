"""NIfTI files: one 3D volume read slab by slab, and per-slice maps written back on the same voxel grid.

The volume's array axes and affine are the file's own (what ``nibabel.load(path).affine`` gives).
:class:`VolumeWriter` keeps the reference's qform, sform, pixdim and units, so a map overlays its scan
in any viewer. nibabel is optional (``pip install "normdino[medical]"``) and imported lazily.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Iterable, Iterator, Mapping

import numpy as np

from normdino.errors import InputError
from normdino.files import atomic_path
from normdino.io import slabs
from normdino.io.slabs import SliceStore, planes_per_slab, runs

if TYPE_CHECKING:
    from normdino.io.slicing import SliceOptions
    from normdino.io.volumes import Volume

_READ_ERRORS = (OSError, EOFError, zlib.error, ValueError)


def import_nibabel() -> Any:
    """Import nibabel, or say how to install it."""
    try:
        import nibabel
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise InputError('Reading and writing NIfTI volumes needs nibabel: pip install "normdino[medical]".') from err
    return nibabel


def is_nifti_name(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


class NiftiSource:
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
        """(k, plane k along the third axis) for sorted ``indices``, one slab (<= 32 MB as read) at a time.

        A plane is a view into its slab: copy what must outlive the next step, so the slab is freed before the
        next one is read and memory stays one slab whatever the volume's length.
        """
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
            del block  # before the next slab is read: one slab in memory, not two (planes must be copied to outlive it)

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


def open_nifti(path: Path, volume_index: int | None) -> tuple[NiftiSource, np.ndarray, Any, int | None]:
    """Read a NIfTI header and check it holds one grayscale 3D volume (or a chosen one of a 4D file).

    Returns the voxel source, the affine, the nibabel header and the 4D index to record (None for 3D).
    """
    nib = import_nibabel()
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
    zooms = np.asarray(header.get_zooms()[:3], dtype=np.float64)
    if not (np.isfinite(affine).all() and np.isfinite(zooms).all()):
        raise InputError(f"{path} has a NaN or infinite voxel size or orientation in its header (pixdim, qform or "
                         "sform), so where its voxels lie is unknown: repair the header (e.g. rewrite it with the "
                         "scanner's geometry) before using it.")
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
    source = NiftiSource(path, proxy, shape4, index)
    source.check_complete()
    return source, affine, header, (volume_index if n_volumes > 1 or volume_index is not None else None)



def output_header(reference: Volume, dtype: np.dtype) -> Any:
    """A NIfTI header with the reference's geometry (qform, sform, pixdim, units) for a 3D map of ``dtype``."""
    nib = import_nibabel()
    if reference.header is not None:
        source = reference.header  # same binary header (qform, sform, pixdim, units), without extensions
        header = source.__class__(source.binaryblock, source.endianness, check=False)
        own = tuple(int(n) for n in source.get_data_shape())
        # a 2D file (H, W) is read as (H, W, 1): its maps keep its own shape (the same voxels, in the same order)
        header.set_data_shape(own if len(own) < 3 and int(np.prod(own)) == int(np.prod(reference.shape))
                              else reference.shape)
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
        if not is_nifti_name(self.path):
            raise InputError(f"Output {self.path} must end in .nii or .nii.gz.")
        self._header = output_header(reference, self.dtype)
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
