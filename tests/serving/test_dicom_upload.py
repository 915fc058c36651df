"""A DICOM series upload gets a DICOM Segmentation and Parametric Map back, besides the NIfTI maps (issue 23)."""

import io
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

hd = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")

sys.path.insert(0, str(Path(__file__).parents[1] / "io"))
from dicom_series import write_series  # noqa: E402

from normdino.io.phantoms import make_phantom  # noqa: E402


def test_a_dicom_upload_returns_seg_and_pmap_that_reference_it(served_model, tmp_path):
    from fastapi.testclient import TestClient

    from normdino.serving.app import create_app
    from normdino.serving.models import load_models

    rng = np.random.default_rng(5)
    planes = np.stack([make_phantom(rng, size=48, lesions=1)[0] for _ in range(4)], axis=2)
    files = write_series(tmp_path / "s", (planes * 1000).astype(np.int16))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for path in files:
            zf.write(path, f"export/{path.name}")
    with TestClient(create_app(load_models([str(served_model)]))) as client:
        response = client.post("/predict", files={"file": ("series.zip", buffer.getvalue())}, params={"fpr": 0.1})
        assert response.status_code == 200, response.text
        answer = response.json()
        sources = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in files}
        study = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        for name in ("series_seg.dcm", "series_pmap.dcm"):
            download = client.get(answer["files"][name])
            assert download.status_code == 200 and download.headers["content-type"] == "application/dicom"
            ds = pydicom.dcmread(io.BytesIO(download.content))
            assert ds.StudyInstanceUID == study and ds.PatientName == "Doe^Jane"
            referenced = ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence
            assert {i.ReferencedSOPInstanceUID for i in referenced} <= sources
        pmap = pydicom.dcmread(io.BytesIO(client.get(answer["files"]["series_pmap.dcm"]).content))
        assert pmap.NumberOfFrames == 4
