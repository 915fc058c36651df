"""DICOM series: finding the files of a series, reading their geometry, and their pixels as planes.

Geometry: ``i`` = row, ``j`` = column of each file's pixel array, ``k`` = slice position along the slice
normal, ascending; the affine comes from ImagePositionPatient / ImageOrientationPatient / PixelSpacing
(LPS), flipped to RAS. pydicom is optional (``pip install "normdino[medical]"``) and imported lazily.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from normdino.errors import InputError

logger = logging.getLogger(__name__)

_DICOM_MAGIC_OFFSET = 128
DICOM_PROBE_FILES = 32
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
_MAX_TILT_DEGREES = 0.05


def import_pydicom() -> Any:
    """Import pydicom, or say how to install it."""
    try:
        import pydicom
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise InputError('Reading DICOM series needs pydicom: pip install "normdino[medical]".') from err
    return pydicom


def looks_like_dicom(path: Path) -> bool:
    """A .dcm suffix or the 'DICM' magic after the 128-byte preamble (DICOMDIR excluded)."""
    if path.name.upper() == "DICOMDIR":
        return False
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            f.seek(_DICOM_MAGIC_OFFSET)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def dicom_files(folder: Path, limit: int | None = None) -> list[Path]:
    """DICOM files directly in ``folder`` (sorted by name); probe at most ``limit`` files."""
    found = []
    entries = [entry for entry in sorted(folder.iterdir()) if not entry.name.startswith(".")]  # ._x.dcm: AppleDouble
    for probed, entry in enumerate(entries):
        if limit is not None and probed >= limit:
            break
        if entry.is_file() and looks_like_dicom(entry):
            found.append(entry)
            if limit is not None:
                break
    return found


class DicomSource:
    """Planes of a DICOM series, one file per plane, rescaled to real values (e.g. HU).

    ``info``: the series' identity from its first slice (study_uid, series_uid, modality, series_description,
    series_number), for result tables and names.
    """

    def __init__(self, files: list[Path], rescale: list[tuple[float, float]], shape: tuple[int, int, int],
                 raw_dtype: np.dtype, inverted: list[int | None] | None = None, info: dict | None = None,
                 bits_stored: int | None = None) -> None:
        self.files = files
        self.bits_stored = bits_stored  # unsigned integer pixels: the DICOM's own range is 0..2**bits_stored - 1
        self.info = dict(info or {})
        self.rescale = rescale
        self.shape = shape
        self.raw_dtype = raw_dtype
        self.plane_dtype = raw_dtype
        self.inverted = inverted or [None] * len(files)  # per file: None, or the sum that inverts MONOCHROME1

    def scale(self, raw: np.ndarray) -> np.ndarray:
        return np.asarray(raw, dtype=np.float32)

    def read_plane(self, k: int) -> np.ndarray:
        """Pixel array of file k with its own RescaleSlope / RescaleIntercept applied."""
        pydicom = import_pydicom()
        path = self.files[k]
        try:
            ds = pydicom.dcmread(path)
            pixels = ds.pixel_array
        except Exception as err:  # pydicom raises many types for bad pixel data
            raise InputError(f"Cannot read the pixel data of {path} ({err}); the file may be truncated, "
                             f"or compressed with a codec that needs extra packages (pylibjpeg, gdcm).") from err
        if pixels.shape != self.shape[:2]:
            raise InputError(f"{path} has pixel array shape {pixels.shape}, expected {self.shape[:2]} "
                             f"like the rest of its series.")
        slope, inter = self.rescale[k]
        out = pixels.astype(np.float32)
        if self.inverted[k] is not None:  # MONOCHROME1: low stored values are bright; flip within the stored range
            out = np.float32(self.inverted[k]) - out
        if slope != 1.0 or inter != 0.0:
            out = out * np.float32(slope) + np.float32(inter)
        return out

    def iter_raw_planes(self, indices: Iterable[int]) -> Iterator[tuple[int, np.ndarray]]:
        for k in indices:
            yield k, self.read_plane(k)


def _dicom_affine(position: np.ndarray, orientation: np.ndarray, spacing: np.ndarray,
                  slice_step: np.ndarray) -> np.ndarray:
    """RAS affine of array (row, column, slice) from DICOM LPS geometry."""
    row_cosine, column_cosine = orientation[:3], orientation[3:]
    lps = np.eye(4)
    lps[:3, 0] = column_cosine * spacing[0]  # moving down a row: along the column direction, row spacing
    lps[:3, 1] = row_cosine * spacing[1]     # moving along a row: column spacing
    lps[:3, 2] = slice_step
    lps[:3, 3] = position
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def open_dicom_series(folder: Path) -> tuple[DicomSource, np.ndarray]:
    """Read the headers of a DICOM folder, check it is one series, sort slices along the normal."""
    files = dicom_files(folder)
    if not files:
        raise InputError(f"No DICOM files in {folder}.")
    return open_dicom_files(files, folder)


def open_dicom_files(files: list[Path], folder: Path | str) -> tuple[DicomSource, np.ndarray]:
    """Read the headers of the files of one series (``folder`` names it in messages), sort slices along the normal.

    A file repeating an instance already read (same SOPInstanceUID) is read once, with a warning; slices of
    mixed sizes, and a gap in the slice positions (missing slices), are refused with one sentence each.
    """
    pydicom = import_pydicom()
    records = []
    seen: dict[str, Path] = {}
    duplicates: list[tuple[Path, Path]] = []
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as err:
            raise InputError(f"{path} is not a readable DICOM file ({err}); remove it from {folder} or re-export.") from err
        if str(ds.get("SOPClassUID", "")) == _DICOMDIR_SOP_CLASS:
            continue
        instance = str(ds.get("SOPInstanceUID", "") or "")
        if instance and instance in seen:
            duplicates.append((path, seen[instance]))
            continue
        seen[instance] = path
        missing = [key for key in ("Rows", "Columns", "ImagePositionPatient", "ImageOrientationPatient",
                                   "PixelSpacing") if key not in ds]
        if missing:
            raise InputError(f"{path} lacks {', '.join(missing)}: it is not an image slice of a 3D series.")
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise InputError(f"{path} is a multi-frame DICOM, which is not supported: convert it to NIfTI "
                             f"(e.g. with dcm2niix).")
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise InputError(f"{path} is a colour image; only grayscale DICOM series are supported.")
        records.append({
            "path": path,
            "series": str(ds.get("SeriesInstanceUID", "")),
            "size": (int(ds.Rows), int(ds.Columns)),
            "position": np.array([float(v) for v in ds.ImagePositionPatient]),
            "orientation": np.array([float(v) for v in ds.ImageOrientationPatient]),
            "spacing": np.array([float(v) for v in ds.PixelSpacing]),
            "rescale": (float(ds.get("RescaleSlope", 1.0) or 1.0), float(ds.get("RescaleIntercept", 0.0) or 0.0)),
            "signed": int(ds.get("PixelRepresentation", 0)) == 1,
            "bits": int(ds.get("BitsAllocated", 16)),
            "bits_stored": int(ds.get("BitsStored", 0) or 0),
            "thickness": float(ds.get("SpacingBetweenSlices", ds.get("SliceThickness", 1.0)) or 1.0),
            "inverted": _monochrome1_sum(ds),
            "info": {"study_uid": str(ds.get("StudyInstanceUID", "") or ""),
                     "series_uid": str(ds.get("SeriesInstanceUID", "") or ""),
                     "modality": str(ds.get("Modality", "") or ""),
                     "series_description": str(ds.get("SeriesDescription", "") or ""),
                     "series_number": str(ds.get("SeriesNumber", "") or "")},
        })
    if duplicates:
        logger.warning("%s: %d file(s) repeat an instance already read (same SOPInstanceUID: %s is %s); each "
                       "instance is read once.", folder, len(duplicates), duplicates[0][0], duplicates[0][1])
    if not records:
        raise InputError(f"No DICOM image slices in {folder}.")
    series = sorted({r["series"] for r in records})
    if len(series) > 1:
        raise InputError(f"{folder} mixes {len(series)} DICOM series (SeriesInstanceUID {', '.join(series[:3])}"
                         f"{', ...' if len(series) > 3 else ''}): put each series in its own folder.")
    first = records[0]
    for r in records[1:]:
        if r["size"] != first["size"]:
            raise InputError(f"The series in {folder} mixes slice sizes: {r['path']} is {r['size'][0]}x{r['size'][1]} "
                             f"pixels but {first['path']} is {first['size'][0]}x{first['size'][1]}; a series of "
                             "equal-sized slices is needed (re-export it, or split it into one folder per size).")
        if not np.allclose(r["orientation"], first["orientation"], atol=1e-4):
            raise InputError(f"{r['path']} has another ImageOrientationPatient than {first['path']}: "
                             f"one folder must hold one series.")
        if not np.allclose(r["spacing"], first["spacing"], atol=1e-4):
            raise InputError(f"{r['path']} has another PixelSpacing than {first['path']}: one folder must hold one series.")
    orientation = first["orientation"]
    normal = np.cross(orientation[:3], orientation[3:])
    records.sort(key=lambda r: float(r["position"] @ normal))
    first = records[0]
    depths = np.array([r["position"] @ normal for r in records])
    if len(records) > 1:
        gaps = np.diff(depths)
        if np.any(gaps < 1e-4 * max(1.0, float(np.abs(gaps).max()))):
            k = int(np.argmin(gaps))
            raise InputError(f"{records[k]['path']} and {records[k + 1]['path']} lie at the same position: "
                             f"{folder} holds several echoes or time points; put each in its own folder.")
        slice_step = (records[-1]["position"] - records[0]["position"]) / (len(records) - 1)
        typical = float(np.median(gaps))
        if len(gaps) > 1 and gaps.max() > 1.5 * typical:
            k = int(np.argmax(gaps))
            raise InputError(f"The series in {folder} misses slices: {records[k]['path']} and {records[k + 1]['path']} "
                             f"are {gaps[k]:.3g} mm apart where its other slices are {typical:.3g} mm apart; "
                             "export the complete series.")
        if gaps.max() - gaps.min() > 0.01 * gaps.mean():
            logger.warning("%s: slice spacing varies from %.3g to %.3g mm (missing slices?); the written "
                           "maps use the mean spacing.", folder, gaps.min(), gaps.max())
    else:
        slice_step = normal * first["thickness"]
    tilt = _tilt_degrees(slice_step, normal)
    if tilt > _MAX_TILT_DEGREES:
        logger.warning("%s: the slices are stacked at %.2f degrees to their plane's normal (gantry tilt); the "
                       "maps are written with the matching sheared affine, which only the NIfTI sform holds "
                       "(viewers that use the qform show them without the shear).", folder, tilt)
    if any(r["inverted"] is not None for r in records):
        logger.info("%s: MONOCHROME1 (low values bright): stored values inverted so that bright is high.", folder)
    affine = _dicom_affine(first["position"], orientation, first["spacing"], slice_step)
    rescale = [r["rescale"] for r in records]
    if all(s == 1.0 and float(i).is_integer() for s, i in rescale) and first["bits"] in (8, 16):
        raw_dtype = np.dtype(f"{'i' if first['signed'] else 'u'}{first['bits'] // 8}")
        if any(i != 0.0 for _, i in rescale):
            raw_dtype = np.dtype(np.float32)
    else:
        raw_dtype = np.dtype(np.float32)
    shape = (first["size"][0], first["size"][1], len(records))
    stored = {r["bits_stored"] for r in records}
    bits_stored = stored.pop() if raw_dtype.kind == "u" and len(stored) == 1 else None
    return DicomSource([r["path"] for r in records], rescale, shape, raw_dtype,
                       [r["inverted"] for r in records], first["info"], bits_stored=bits_stored or None), affine


def _monochrome1_sum(ds: Any) -> int | None:
    """For a MONOCHROME1 file, the number s with inverted = s - stored (maps the stored range onto itself); else None."""
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper() != "MONOCHROME1":
        return None
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    return -1 if int(ds.get("PixelRepresentation", 0)) == 1 else 2**bits - 1


def _tilt_degrees(step: np.ndarray, normal: np.ndarray) -> float:
    """Angle between the slice-to-slice step and the slices' normal (0 unless the gantry was tilted)."""
    cosine = abs(float(step @ normal)) / max(float(np.linalg.norm(step)) * float(np.linalg.norm(normal)), 1e-12)
    return float(np.degrees(np.arccos(min(1.0, cosine))))
