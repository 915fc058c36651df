"""Synthetic DICOM series for tests: complete enough (patient, study, series, frame of reference, image plane)
for highdicom to derive Segmentations and Parametric Maps from them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

IOP = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
PATIENT = {"PatientName": "Doe^Jane", "PatientID": "PID-0042", "PatientBirthDate": "19700101", "PatientSex": "F"}


def _instance(sop_class: str, patient: dict | None):
    """A new instance of ``sop_class`` (file meta, new SOP instance UID) with the patient module filled in."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    for key, value in (PATIENT if patient is None else patient).items():
        setattr(ds, key, value)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    return ds


def write_series(folder: Path, pixels: np.ndarray, *, study_uid: str | None = None, series_uid: str | None = None,
                 frame_of_reference_uid: str | None = None, modality: str = "MR", description: str = "AX FLAIR",
                 series_number: int = 3, origin=(-100.0, -80.0, 30.0), spacing=(0.7, 0.8), step: float = 2.5,
                 orientation=IOP, patient: dict | None = None, names: str = "IM{k:04d}.dcm", seed: int = 0,
                 image_type=("ORIGINAL", "PRIMARY", "AXIAL"), unsigned: bool = False, bits_stored: int = 16
                 ) -> list[Path]:
    """Write ``pixels[:, :, k]`` (int16, or uint16 with ``unsigned``, ``bits_stored`` of 16 used) as instance k of
    one series (files named in shuffled order); the paths by k."""
    from pydicom.uid import CTImageStorage, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rows, cols, n = pixels.shape
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_of_reference_uid = frame_of_reference_uid or generate_uid()
    orientation = np.asarray(orientation, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    order = np.random.default_rng(seed).permutation(n)
    sop_class = MRImageStorage if modality == "MR" else CTImageStorage
    paths = []
    for k in range(n):
        position = np.asarray(origin, dtype=float) + k * step * normal
        ds = _instance(sop_class, patient)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240102", "101500", "1", "ACC42"
        ds.ReferringPhysicianName = "Ref^Doc"
        ds.Modality = modality
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        ds.InstanceNumber = k + 1
        ds.Manufacturer = "Test"
        ds.ImageType = list(image_type)
        ds.PositionReferenceIndicator = ""
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
        ds.PixelRepresentation = 0 if unsigned else 1
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in orientation]
        ds.PixelSpacing = [str(spacing[0]), str(spacing[1])]
        ds.SliceThickness = str(step)
        if modality == "CT":
            ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = "1", "0", "HU"
        ds.PixelData = np.ascontiguousarray(pixels[:, :, k].astype("<u2" if unsigned else "<i2")).tobytes()
        path = folder / names.format(k=int(order[k]))
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_sr(path: Path, study_uid: str, patient: dict | None = None) -> Path:
    """A basic text structured report (no pixels) of ``study_uid``."""
    from pydicom.dataset import Dataset
    from pydicom.uid import BasicTextSRStorage, generate_uid

    ds = _instance(BasicTextSRStorage, patient)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = "SR", 99, 1, "Report"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240102", "101500", "1", "ACC42"
    ds.ReferringPhysicianName = ""
    ds.ValueType, ds.CompletionFlag, ds.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
    ds.ContentDate, ds.ContentTime = "20240102", "101500"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = "18748-4", "LN", "Diagnostic imaging report"
    ds.ConceptNameCodeSequence = [concept]
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_export(root: Path, staging: Path) -> dict:
    """A PACS export in the DICOMDIR layout (nested folders, files without extension, a DICOMDIR): patient A with
    an MR study (FLAIR 5 slices, T1 4 slices of another size, a 3-slice localizer, a structured report) and patient
    B with a CT study (4 slices). Returns the series UIDs by name."""
    from pydicom import dcmread
    from pydicom.fileset import FileSet
    from pydicom.uid import generate_uid

    rng = np.random.default_rng(0)
    study_a, study_b = generate_uid(), generate_uid()
    frame_a = generate_uid()
    other = {"PatientName": "Roe^Richard", "PatientID": "PID-7", "PatientBirthDate": "19600101", "PatientSex": "M"}
    uids = {name: generate_uid() for name in ("flair", "t1", "localizer", "ct")}
    written = []
    written += write_series(staging / "flair", (rng.random((16, 16, 5)) * 900).astype(np.int16), study_uid=study_a,
                            series_uid=uids["flair"], frame_of_reference_uid=frame_a, description="AX FLAIR",
                            series_number=3)
    written += write_series(staging / "t1", (rng.random((12, 14, 4)) * 900).astype(np.int16), study_uid=study_a,
                            series_uid=uids["t1"], frame_of_reference_uid=frame_a, description="AX T1",
                            series_number=4)
    written += write_series(staging / "loc", (rng.random((16, 16, 3)) * 900).astype(np.int16), study_uid=study_a,
                            series_uid=uids["localizer"], description="Localizer", series_number=1,
                            image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    written.append(write_sr(staging / "sr" / "report.dcm", study_a))
    uids["sr"] = str(dcmread(written[-1]).SeriesInstanceUID)
    written += write_series(staging / "ct", (rng.random((16, 16, 4)) * 900).astype(np.int16), study_uid=study_b,
                            series_uid=uids["ct"], modality="CT", description="CT HEAD", series_number=2,
                            patient=other)
    fileset = FileSet()
    for path in written:
        fileset.add(dcmread(path))
    fileset.write(root)
    return uids
