"""Fixtures of the serving tests: one tiny fitted model, sample uploads of every kind, an app and a live server."""

from __future__ import annotations

import io
import socket
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from normdino.io.phantoms import make_phantom, write_phantom_dataset  # noqa: E402


@pytest.fixture(scope="session")
def served_model(tmp_path_factory, tiny_dinov2_dir) -> Path:
    """A tiny DPMM model fitted on 64-px phantoms with a tiny random DINOv2, saved as brain.normdino."""
    from normdino import AnomalyDetector

    root = tmp_path_factory.mktemp("serve-model")
    data = write_phantom_dataset(root / "data", n_train=10, n_valid=8, n_test_normal=1, n_test_anomalous=2,
                                 size=64, seed=0)
    detector = AnomalyDetector(backbone=str(tiny_dinov2_dir), image_size=112, n_components=16, epochs=2,
                               batch_images=4, progress=False, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is enough, and it never waits on a busy second core
    try:
        detector.fit(sorted((data / "train" / "good").glob("*.png")),
                     sorted((data / "valid" / "good" / "img").glob("*.png")))
    finally:
        torch.set_num_threads(threads)
    return detector.save(root / "brain.normdino")


@pytest.fixture(scope="session")
def samples(tmp_path_factory) -> dict[str, Path]:
    """Uploads of every supported kind (and a few bad ones) in one folder."""
    nib = pytest.importorskip("nibabel")
    root = tmp_path_factory.mktemp("uploads")
    rng = np.random.default_rng(3)
    image, _ = make_phantom(rng, size=64, lesions=2)
    gray = np.rint(image * 255).astype(np.uint8)
    Image.fromarray(gray).save(root / "patient.png")
    Image.fromarray(gray).save(root / "patient.jpg", quality=95)
    Image.fromarray((image * 4000).astype(np.uint16)).save(root / "patient.tif")
    planes = np.stack([make_phantom(rng, size=48, lesions=1 if k == 2 else 0)[0] for k in range(4)], axis=2)
    affine = np.diag([0.9, 0.9, 3.0, 1.0])
    nib.save(nib.Nifti1Image((planes * 1000).astype(np.int16), affine), root / "scan.nii.gz")
    nib.save(nib.Nifti1Image((planes * 1000).astype(np.int16), affine), root / "scan.nii")
    series = root / "series"
    write_dicom_series(series, (planes * 1000).astype(np.int16))
    with zipfile.ZipFile(root / "series.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(series.iterdir()):
            zf.write(path, f"export/{path.name}")
        zf.writestr("export/README.txt", "not a DICOM file")
    return {"png": root / "patient.png", "jpeg": root / "patient.jpg", "tiff": root / "patient.tif",
            "nifti_gz": root / "scan.nii.gz", "nifti": root / "scan.nii", "dicom_zip": root / "series.zip",
            "dicom_folder": series}


def write_dicom_series(folder: Path, pixels: np.ndarray) -> None:
    """An axial CT series of pixels[:, :, k] (int16), one file per slice, 0.8 mm pixels, 2.5 mm apart."""
    pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    series_uid = generate_uid()
    for k in range(pixels.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.Modality, ds.PatientName = "CT", "Doe^Jane"
        ds.Rows, ds.Columns = pixels.shape[:2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.ImagePositionPatient = [-20.0, -20.0, 2.5 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.8, 0.8]
        ds.SliceThickness = 2.5
        ds.PixelData = np.ascontiguousarray(pixels[:, :, k].astype("<i2")).tobytes()
        ds.save_as(folder / f"IM{k:04d}.dcm", enforce_file_format=True)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


class LiveServer:
    """uvicorn serving an app in a background thread on a free 127.0.0.1 port."""

    def __init__(self, app):
        import uvicorn

        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        import httpx

        for _ in range(500):  # wait for start-up: poll, no fixed sleep
            try:
                httpx.get(self.url + "/static/viewer.css", timeout=0.2)
                return self
            except httpx.TransportError:
                threading.Event().wait(0.02)
        raise RuntimeError("the test server did not start")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.socket.close()


def deflated_dicom(pixel_bytes: int, rows: int = 64, cols: int = 64, geometry: bool = True, **tags) -> bytes:
    """A DICOM file in the deflated transfer syntax whose PixelData holds ``pixel_bytes`` zeros: a few KB that
    inflate to ``pixel_bytes`` (written chunk by chunk, never held inflated). ``tags`` set more attributes."""
    import struct
    import zlib

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.Modality = generate_uid(), "CT"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    if geometry:
        ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing = [0, 0, 0], [1, 0, 0, 0, 1, 0], [1, 1]
    for key, value in tags.items():
        setattr(ds, key, value)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    out = DicomBytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [out.getvalue(), deflate.compress(body.getvalue() + b"\xe0\x7f\x10\x00OW\x00\x00"
                                              + struct.pack("<I", pixel_bytes))]
    chunk = bytes(2**20)
    for _ in range(pixel_bytes // len(chunk)):
        parts.append(deflate.compress(chunk))
    parts += [deflate.compress(bytes(pixel_bytes % len(chunk))), deflate.flush()]
    return b"".join(parts)


def zip_bytes(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def rss_mb() -> float:
    """This process's resident memory in MB (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
