"""Results as DICOM: a Segmentation of the anomaly mask and a Parametric Map of the anomaly score, made with highdicom.

Both objects derive from the source series, so PACS viewers, OHIF and 3D Slicer lay them over the scan: they
reference the source study, series, instances and frame of reference, carry one frame per source slice on the
source geometry (position, orientation, pixel spacing copied from each slice), and get new series and instance
UIDs. The patient and study modules are copied from the source (nothing new about the patient is written);
``anonymize`` empties them instead, keeping only the UIDs that link a result to its scan.

Frame k of an object is voxel plane ``volume[:, :, k]`` of :class:`normdino.io.volumes.Volume` (rows, columns of
source file k, files sorted along the slice normal), the same plane the NIfTI maps hold.
highdicom and pydicom are optional (``pip install "normdino[medical]"``) and imported lazily.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from normdino.errors import InputError
from normdino.files import atomic_path

logger = logging.getLogger(__name__)

DICOM_OUTPUTS = ("seg", "pmap")
SEGMENT_LABEL = "anomaly"
#: Derived series are numbered after their source's SeriesNumber, so viewers list them after the scan.
SEG_SERIES_OFFSET = 1000
PMAP_SERIES_OFFSET = 2000
#: Emptied by ``anonymize`` (patient module and the identifying study attributes); UIDs are kept.
PATIENT_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientSize",
                    "PatientWeight", "PatientBirthTime", "OtherPatientIDs", "OtherPatientIDsSequence",
                    "OtherPatientNames", "IssuerOfPatientID", "PatientComments", "EthnicGroup",
                    "PatientAddress", "PatientTelephoneNumbers", "PatientMotherBirthName")
STUDY_KEYWORDS = ("AccessionNumber", "ReferringPhysicianName", "StudyDate", "StudyTime", "StudyID",
                  "StudyDescription", "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
                  "PerformingPhysicianName", "OperatorsName", "RequestingPhysician")


@dataclass(frozen=True)
class Algorithm:
    """What made a result, as written into the objects (Algorithm Identification, software versions)."""

    method: str
    version: str
    name: str = "normdino"
    parameters: dict[str, str] = field(default_factory=dict)


def parse_dicom_out(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """``--dicom-out``: "seg,pmap" (the default, None), "seg", "pmap" or "none" -> the objects to write."""
    if text is None:
        return DICOM_OUTPUTS
    parts = [p.strip().lower() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    if parts == ["none"]:
        return ()
    unknown = [p for p in parts if p not in DICOM_OUTPUTS]
    if unknown or not parts:
        raise InputError(f"--dicom-out {text if isinstance(text, str) else ','.join(text)!r} is not a choice: write "
                         "seg, pmap, seg,pmap or none.")
    return tuple(p for p in DICOM_OUTPUTS if p in parts)


def _libraries() -> tuple[Any, Any]:
    """Import highdicom and pydicom, or say how to install them."""
    try:
        import highdicom
        import pydicom
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise InputError('Writing DICOM Segmentations and Parametric Maps needs highdicom: '
                         'pip install "normdino[medical]".') from err
    return highdicom, pydicom


def read_sources(files: Sequence[str | os.PathLike], anonymize: bool = False) -> list[Any]:
    """The headers of the source slices (no pixel data), in frame order; ``anonymize`` empties their patient data."""
    _, pydicom = _libraries()
    sources = []
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as err:  # pydicom raises many types for a bad file
            raise InputError(f"{path} is no longer a readable DICOM file ({err}).") from err
        missing = [key for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
                                   "FrameOfReferenceUID") if not str(ds.get(key, "") or "")]
        if missing:
            raise InputError(f"{path} lacks {', '.join(missing)}, which a DICOM result must reference: re-export "
                             "the series from the PACS with its full headers, or use --dicom-out none.")
        sources.append(_anonymized(ds) if anonymize else ds)
    return sources


def _anonymized(ds: Any) -> Any:
    """``ds`` with the patient module and the identifying study attributes emptied (type 2: kept, empty)."""
    for keyword in PATIENT_KEYWORDS + STUDY_KEYWORDS:
        if keyword in ds:
            if keyword.endswith("Sequence"):
                del ds[keyword]
            else:
                setattr(ds, keyword, "")
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "AccessionNumber", "ReferringPhysicianName", "StudyID"):
        setattr(ds, keyword, "")
    return ds


def _mark_anonymized(obj: Any) -> None:
    """Say in the object that its patient data was removed on purpose (PS3.15 attributes)."""
    for keyword in PATIENT_KEYWORDS + STUDY_KEYWORDS:
        if keyword in obj and not keyword.endswith("Sequence"):
            setattr(obj, keyword, "")
    obj.PatientIdentityRemoved = "YES"
    obj.DeidentificationMethod = "normdino --anonymize: identifiers emptied, UIDs kept"


def _series_number(source: Any, offset: int) -> int:
    try:
        return int(source.get("SeriesNumber", 0) or 0) + offset
    except (TypeError, ValueError):
        return offset


def _algorithm_sequence(hd: Any, algorithm: Algorithm) -> Any:
    from pydicom.sr.codedict import codes

    return hd.AlgorithmIdentificationSequence(
        name=algorithm.name, version=algorithm.version, family=codes.cid7162.ArtificialIntelligence,
        parameters={"method": algorithm.method, **algorithm.parameters})


def _software(algorithm: Algorithm) -> str:
    return f"{algorithm.name} {algorithm.version}"


def _check_frames(array: np.ndarray, sources: Sequence[Any], what: str) -> None:
    if array.ndim != 3 or array.shape[2] != len(sources):
        raise InputError(f"The {what} has shape {array.shape} but its series has {len(sources)} slices.")
    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    if array.shape[:2] != (rows, cols):
        raise InputError(f"The {what} has {array.shape[0]}x{array.shape[1]} pixels per slice but the series has "
                         f"{rows}x{cols}.")


def write_segmentation(path: str | os.PathLike, sources: Sequence[Any], mask: np.ndarray, algorithm: Algorithm,
                       anonymize: bool = False) -> Path:
    """Write a binary DICOM Segmentation with one segment "anomaly" of ``mask`` (rows, columns, slices) atomically.

    ``sources``: the source slices' headers in frame order (:func:`read_sources`). Slices without an anomalous
    pixel are left out (highdicom's default), as Segmentations usually are; an all-empty mask keeps its frames, empty
    (the object then says "nothing found" instead of being absent).
    """
    hd, _ = _libraries()
    from pydicom.sr.codedict import codes

    mask = np.asarray(mask).astype(bool)
    _check_frames(mask, sources, "mask")
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label=SEGMENT_LABEL,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.DCM.AbnormalRegion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=_algorithm_sequence(hd, algorithm))
    frames = np.moveaxis(mask, 2, 0)
    empty = not frames.any()
    try:
        seg = hd.seg.Segmentation(
            source_images=list(sources), pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[description], series_instance_uid=hd.UID(),
            series_number=_series_number(sources[0], SEG_SERIES_OFFSET), sop_instance_uid=hd.UID(), instance_number=1,
            manufacturer=algorithm.name, manufacturer_model_name=f"{algorithm.name} {algorithm.method}",
            software_versions=_software(algorithm), device_serial_number="0", content_label="ANOMALY",
            content_description=f"{algorithm.name} anomaly mask ({algorithm.method})",
            series_description=f"{algorithm.name} anomaly mask ({algorithm.method})",
            omit_empty_frames=not empty)
    except (ValueError, TypeError, AttributeError) as err:  # highdicom's checks of the source headers
        raise InputError(f"Cannot derive a DICOM Segmentation from {_where(sources)}: {err}") from err
    if anonymize:
        _mark_anonymized(seg)
    return _save(seg, path)


def write_parametric_map(path: str | os.PathLike, sources: Sequence[Any], scores: np.ndarray, frames: Sequence[int],
                         algorithm: Algorithm, display_range: tuple[float, float] | None = None,
                         anonymize: bool = False) -> Path:
    """Write a DICOM Parametric Map of the float32 anomaly ``scores`` (rows, columns, slices) of the scored ``frames``.

    Values are stored as 32-bit floats (Float Pixel Data), exactly the scores; the real-world value mapping is
    the identity, unit "no units". ``display_range`` (low, high) becomes the default window.
    """
    hd, _ = _libraries()
    from pydicom.sr.codedict import codes

    scores = np.asarray(scores, dtype=np.float32)
    _check_frames(scores, sources, "score map")
    frames = sorted(set(int(k) for k in frames))
    if not frames:
        raise InputError(f"No slice of {_where(sources)} was scored: there is no Parametric Map to write.")
    values = np.ascontiguousarray(np.moveaxis(scores[:, :, frames], 2, 0))
    if not np.isfinite(values).all():
        raise InputError(f"The anomaly scores of {_where(sources)} hold NaN or infinite values.")
    low, high = float(values.min()), float(values.max())
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="ANOMALY", lut_explanation=f"{algorithm.name} anomaly score ({algorithm.method})",
        unit=codes.UCUM.NoUnits, value_range=(low, high if high > low else low + 1.0), slope=1.0, intercept=0.0)
    window_low, window_high = display_range if display_range is not None else (low, high)
    if not window_high > window_low:
        window_high = window_low + 1.0
    voi = hd.VOILUTTransformation(window_center=(window_low + window_high) / 2, window_width=window_high - window_low,
                                  window_explanation="anomaly score display range")
    try:
        pmap = hd.pm.ParametricMap(
            source_images=[sources[k] for k in frames], pixel_array=values, series_instance_uid=hd.UID(),
            series_number=_series_number(sources[0], PMAP_SERIES_OFFSET), sop_instance_uid=hd.UID(),
            instance_number=1, manufacturer=algorithm.name,
            manufacturer_model_name=f"{algorithm.name} {algorithm.method}", software_versions=_software(algorithm),
            device_serial_number="0", contains_recognizable_visual_features=False,
            real_world_value_mappings=[mapping], voi_lut_transformations=[voi], content_label="ANOMALY_SCORE",
            content_description=f"{algorithm.name} anomaly score ({algorithm.method})",
            series_description=f"{algorithm.name} anomaly score ({algorithm.method})")
    except (ValueError, TypeError, AttributeError) as err:
        raise InputError(f"Cannot derive a DICOM Parametric Map from {_where(sources)}: {err}") from err
    if anonymize:
        _mark_anonymized(pmap)
    return _save(pmap, path)


def _where(sources: Sequence[Any]) -> str:
    return f"series {sources[0].get('SeriesInstanceUID', '?')}" if sources else "an empty series"


def _save(obj: Any, path: str | os.PathLike) -> Path:
    """Save in the DICOM file format, atomically (a temp file renamed onto ``path``)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        obj.save_as(tmp, enforce_file_format=True)
    logger.info("wrote %s", path)
    return path


def is_segmentation(path: str | os.PathLike) -> bool:
    """True for a DICOM Segmentation file (SOP class Segmentation Storage), read up to its pixel data."""
    _, pydicom = _libraries()
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:  # not DICOM at all
        return False
    return str(ds.get("SOPClassUID", "")) == "1.2.840.10008.5.1.4.1.1.66.4"


def read_segmentation_mask(path: str | os.PathLike, files: Sequence[str | os.PathLike],
                           shape: tuple[int, int, int]) -> np.ndarray:
    """A DICOM Segmentation as a boolean mask on a series' voxel grid (rows, columns, slices of ``files``).

    Each frame lands on the slice it references (its source SOPInstanceUID), or else on the slice at its
    ImagePositionPatient; all segments are merged (a lesion mask); fractional segmentations count above 0.5.
    One sentence when a frame belongs to no slice of the series or the pixel grids differ.
    """
    hd, pydicom = _libraries()
    try:
        seg = hd.seg.segread(path)
    except Exception as err:  # highdicom raises many types for a bad object
        raise InputError(f"{path} is not a readable DICOM Segmentation ({err}).") from err
    headers = [pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID", "ImagePositionPatient"])
               for f in files]
    by_uid = {str(h.SOPInstanceUID): k for k, h in enumerate(headers)}
    positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    pixels = np.asarray(seg.pixel_array)
    if pixels.ndim == 2:
        pixels = pixels[None]
    if pixels.shape[1:3] != tuple(shape[:2]):
        raise InputError(f"Segmentation {path} has {pixels.shape[1]}x{pixels.shape[2]} pixels per frame but its "
                         f"series has {shape[0]}x{shape[1]}: it was not made on this series.")
    if pixels.ndim == 4:  # (frames, rows, columns, segments) in some highdicom versions
        pixels = pixels.any(axis=-1)
    fractional = str(seg.get("SegmentationType", "BINARY")) == "FRACTIONAL"
    maximum = float(seg.get("MaximumFractionalValue", 1) or 1)
    mask = np.zeros(shape, dtype=bool)
    for n, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        k = None
        derivation = group.get("DerivationImageSequence")
        if derivation:
            sources = derivation[0].get("SourceImageSequence") or []
            if sources:
                k = by_uid.get(str(sources[0].ReferencedSOPInstanceUID))
        if k is None and "PlanePositionSequence" in group:
            position = np.array([float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient])
            distances = np.linalg.norm(positions - position, axis=1)
            k = int(np.argmin(distances)) if distances.min() < 1e-3 else None
        if k is None:
            raise InputError(f"Frame {n + 1} of Segmentation {path} belongs to no slice of its series (neither its "
                             "source instance nor its position is in the series).")
        frame = pixels[n] > (maximum / 2 if fractional else 0)
        mask[:, :, k] |= frame
    return mask
