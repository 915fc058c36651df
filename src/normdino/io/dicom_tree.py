"""PACS exports: every DICOM series in a folder tree, found by SeriesInstanceUID, one volume each.

An export holds any number of patients, studies and series in nested folders, with or without a DICOMDIR, and
often with files that have no extension: every file with the DICOM preamble ("DICM" at byte 128) or a .dcm
suffix is read (headers only) and grouped by SeriesInstanceUID. Series that are not image volumes (structured
reports, RT structure sets, presentation states, key objects, segmentations, localizers) are set aside with a
sentence saying why. A series is named by a path that does not exist on disk, ``<folder>#<SeriesInstanceUID>``
(:func:`series_path`), which :func:`find_series` resolves back to its files.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from normdino.errors import InputError
from normdino.io.dicom import import_pydicom, looks_like_dicom

logger = logging.getLogger(__name__)

SERIES_SEPARATOR = "#"
_KNOWN: dict[str, "Series"] = {}  # series_path -> Series, from the last find_series over its folder
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
#: SOP classes (by prefix) that are not image volumes, and what to call them.
NON_IMAGE_CLASSES = (
    ("1.2.840.10008.5.1.4.1.1.88.", "a structured report (SR)"),
    ("1.2.840.10008.5.1.4.1.1.481.", "a radiotherapy object (RTSTRUCT, RTPLAN, RTDOSE or RT image)"),
    ("1.2.840.10008.5.1.4.1.1.11.", "a presentation state"),
    ("1.2.840.10008.5.1.4.1.1.66", "a segmentation or registration object"),
    ("1.2.840.10008.5.1.4.1.1.30", "a parametric map"),
    ("1.2.840.10008.5.1.4.1.1.59", "a key object selection"),
    ("1.2.840.10008.5.1.4.1.1.104.", "an encapsulated document (PDF, CDA)"),
    ("1.2.840.10008.5.1.4.1.1.9.", "a waveform"),
    ("1.2.840.10008.5.1.4.1.1.7", "a secondary capture (a picture, not a scan)"),
    ("1.2.840.10008.1.3.10", "a DICOMDIR"),
)
NON_IMAGE_MODALITIES = {"SR": "a structured report (SR)", "RTSTRUCT": "an RT structure set (RTSTRUCT)",
                        "PR": "a presentation state", "KO": "a key object selection", "SEG": "a segmentation",
                        "RTPLAN": "an RT plan", "RTDOSE": "an RT dose", "DOC": "a document",
                        "REG": "a registration object"}
_TAGS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "Modality", "SeriesDescription",
         "SeriesNumber", "ImageType", "PatientID", "PatientName", "StudyDate", "StudyDescription", "AccessionNumber",
         "Rows", "ImagePositionPatient")


@dataclass
class Series:
    """One series of an export: its files and the identity a reader finds it by in a viewer."""

    uid: str
    files: list[Path] = field(default_factory=list)
    folder: Path = Path(".")
    modality: str = ""
    description: str = ""
    number: str = ""
    study_uid: str = ""
    study_date: str = ""
    study_description: str = ""
    accession: str = ""
    patient_id: str = ""
    patient_name: str = ""
    not_image: str | None = None  # why the series is not an image volume, if it is not

    @property
    def path(self) -> Path:
        """The name the pipeline knows the series by: ``<folder>#<SeriesInstanceUID>``."""
        return series_path(self.folder, self.uid)

    def label(self) -> str:
        """How a person names the series: its number and description, then its UID."""
        what = " ".join(part for part in (f"#{self.number}" if self.number else "",
                                          f"'{self.description}'" if self.description else "") if part)
        return f"series {what + ' ' if what else ''}({self.uid}, {len(self.files)} file{'s' * (len(self.files) != 1)})"


@dataclass
class SeriesFilter:
    """Which series to take: ``description`` matches SeriesDescription (case-insensitive substring, or a regular
    expression when it holds regex characters), ``modality`` the Modality (e.g. MR, CT)."""

    description: str | None = None
    modality: str | None = None

    def __post_init__(self) -> None:
        if self.description is not None:
            try:
                self._pattern = re.compile(self.description if _is_regex(self.description)
                                           else re.escape(self.description), re.IGNORECASE)
            except re.error as err:
                raise InputError(f"--series {self.description!r} is not a valid pattern ({err}).") from err
        if self.modality is not None:
            self.modality = self.modality.strip().upper()
            if not re.fullmatch(r"[A-Z0-9 ]{1,16}", self.modality):
                raise InputError(f"--modality {self.modality!r} is not a DICOM modality (e.g. MR, CT, PT).")

    def __bool__(self) -> bool:
        return self.description is not None or self.modality is not None

    def matches(self, series: Series) -> bool:
        if self.modality is not None and series.modality.upper() != self.modality:
            return False
        return self.description is None or bool(self._pattern.search(series.description))


def _is_regex(text: str) -> bool:
    return any(c in text for c in "^$*+?[]()|\\")


def series_path(folder: Path, uid: str) -> Path:
    """The pipeline's name of series ``uid`` found under ``folder``."""
    return Path(f"{folder}{SERIES_SEPARATOR}{uid}")


def split_series_path(path: str | os.PathLike) -> tuple[Path, str] | None:
    """(folder, SeriesInstanceUID) of a path made by :func:`series_path`, else None (an ordinary path)."""
    text = str(path)
    folder, sep, uid = text.rpartition(SERIES_SEPARATOR)
    if not sep or not _UID.match(uid) or os.path.lexists(text):
        return None
    return Path(folder), uid


def _walk(root: Path) -> Iterator[Path]:
    """Every regular, non-hidden file under ``root`` (sorted, symlinked folders not followed)."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(folder) / name


def _not_image(ds: Any) -> str | None:
    """Why a file is not a slice of an image volume (None if it may be one)."""
    sop_class = str(ds.get("SOPClassUID", "") or "")
    for prefix, what in NON_IMAGE_CLASSES:
        if sop_class.startswith(prefix):
            return what
    modality = str(ds.get("Modality", "") or "").upper()
    if modality in NON_IMAGE_MODALITIES:
        return NON_IMAGE_MODALITIES[modality]
    image_type = [str(v).upper() for v in (ds.get("ImageType", []) or [])]
    if "LOCALIZER" in image_type or "SCOUT" in image_type:
        return "a localizer (scout)"
    if "Rows" not in ds:
        return "an object without pixel data"
    if "ImagePositionPatient" not in ds:
        return "an image without patient geometry (ImagePositionPatient)"
    return None


def find_series(root: str | os.PathLike) -> list[Series]:
    """Every series under ``root``, image volumes and others alike, in the order their first file is found.

    Files are read up to their pixel data (pydicom's ``stop_before_pixels``); a file that is not DICOM is
    passed over, one that claims to be but cannot be read is a warning.
    """
    pydicom = import_pydicom()
    root = Path(root)
    found: dict[str, Series] = {}
    unreadable = []
    for path in _walk(root):
        if not looks_like_dicom(path):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_TAGS))
        except Exception as err:  # pydicom raises many types for a damaged file
            unreadable.append((path, err))
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:
            continue  # a DICOMDIR or another object outside any series
        series = found.get(uid)
        if series is None:
            series = found[uid] = Series(
                uid=uid, folder=path.parent, modality=str(ds.get("Modality", "") or ""),
                description=str(ds.get("SeriesDescription", "") or "").strip(),
                number=str(ds.get("SeriesNumber", "") or ""), study_uid=str(ds.get("StudyInstanceUID", "") or ""),
                study_date=str(ds.get("StudyDate", "") or ""),
                study_description=str(ds.get("StudyDescription", "") or "").strip(),
                accession=str(ds.get("AccessionNumber", "") or ""), patient_id=str(ds.get("PatientID", "") or ""),
                patient_name=str(ds.get("PatientName", "") or ""))
        elif series.folder not in path.parents:
            series.folder = Path(os.path.commonpath([series.folder, path.parent]))
        series.files.append(path)
        why = _not_image(ds)
        if why is not None and series.not_image is None:
            series.not_image = why
    for path, err in unreadable[:3]:
        logger.warning("%s looks like DICOM but cannot be read (%s); passed over.", path, err)
    if len(unreadable) > 3:
        logger.warning("%d more unreadable DICOM files under %s passed over.", len(unreadable) - 3, root)
    _KNOWN.update({str(s.path): s for s in found.values()})
    return list(found.values())


def known_series(path: str | os.PathLike) -> Series | None:
    """The series a :func:`series_path` path names, as :func:`find_series` last found it (None if unknown)."""
    return _KNOWN.get(str(path))


def series_files(path: str | os.PathLike) -> list[Path]:
    """The files of the series named by a :func:`series_path` path (looked up again under its folder)."""
    parts = split_series_path(path)
    if parts is None:
        raise InputError(f"{path} does not exist.")
    folder, uid = parts
    known = known_series(path)
    if known is not None and all(f.is_file() for f in known.files):
        return known.files
    if not folder.is_dir():
        raise InputError(f"{folder} (where series {uid} was found) does not exist any more.")
    for series in find_series(folder):
        if series.uid == uid:
            return series.files
    raise InputError(f"No series with SeriesInstanceUID {uid} under {folder} any more.")


def export_name(series: Series, anonymize: bool = False, pseudonyms: dict[str, str] | None = None) -> str:
    """``<patient>/<study>/<series>`` output name, as a viewer's lists show them (``anonymize``: numbered
    patients and studies in the order met, kept in ``pseudonyms``, never a name, ID or date)."""
    pseudonyms = {} if pseudonyms is None else pseudonyms
    if anonymize:
        patient = pseudonyms.setdefault(f"patient:{series.patient_id}:{series.patient_name}",
                                        f"patient-{sum(k.startswith('patient:') for k in pseudonyms) + 1:03d}")
        study = pseudonyms.setdefault(f"study:{series.study_uid}",
                                      f"study-{sum(k.startswith('study:') for k in pseudonyms) + 1:03d}")
    else:
        patient = _safe(series.patient_id or series.patient_name.replace("^", " ")) or "unknown-patient"
        study = _safe("_".join(part for part in (series.study_date, series.study_description or series.accession)
                               if part)) or f"study-{series.study_uid[-8:]}"
    number = f"S{int(series.number):03d}" if series.number.strip().lstrip("-").isdigit() else ""
    name = _safe("_".join(part for part in (number, series.description) if part)) or f"series-{series.uid[-8:]}"
    return f"{patient}/{study}/{name}"


def _safe(text: str, limit: int = 64) -> str:
    """A file-name-safe version of ``text``: letters, digits, '-', '_', '.'; runs of others become one '_'."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip()).strip("._")
    return cleaned[:limit]
