"""The REST API through FastAPI's test client: every endpoint, every kind of upload, every bad input."""

from __future__ import annotations

import gzip
import io
import logging
import struct
import zipfile

import numpy as np
import pytest
from PIL import Image

from conftest import png_bytes

nib = pytest.importorskip("nibabel")

from fastapi.testclient import TestClient  # noqa: E402

from normdino import AnomalyDetector  # noqa: E402
from normdino.serving.app import create_app  # noqa: E402
from normdino.serving.models import load_models  # noqa: E402
from normdino.serving.settings import ServeSettings  # noqa: E402

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def models(served_model):
    return load_models([str(served_model), f"second={served_model}"])


@pytest.fixture(scope="module")
def client(models):
    settings = ServeSettings(max_upload_bytes=2 * 2**20, max_image_pixels=1_000_000, max_volume_voxels=2_000_000,
                             token=TOKEN)
    app = create_app(models, settings)
    with TestClient(app, raise_server_exceptions=False) as client:
        client.headers.update(AUTH)
        yield client


def post(client, data: bytes, name="upload.bin", **params):
    query = "&".join(f"{k}={v}" for k, v in {"model": "brain", **params}.items())
    return client.post(f"/predict?{query}", files={"file": (name, data, "application/octet-stream")})


def assert_error(response, status, *words):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "status"} and body["status"] == status
    assert "Traceback" not in body["error"] and "/tmp" not in body["error"] and "normdino-serve" not in body["error"]
    for word in words:
        assert word.lower() in body["error"].lower(), body["error"]


# ---------------------------------------------------------------------------------------- endpoints


def test_health_and_models_describe_what_is_served(client, served_model):
    health = client.get("/health").json()
    assert health["status"] == "ok" and set(health["models"]) == {"brain", "second"}
    listed = {m["name"]: m for m in client.get("/models").json()["models"]}
    detector = AnomalyDetector.load(served_model, progress=False)
    brain = listed["brain"]
    assert brain["method"] == "dpmm" == detector.method_name
    assert brain["random_weights"] is True and brain["backbone"] == detector.backbone_.name
    assert brain["fpr_range"] == [pytest.approx(detector.calibration_fprs_[0]),
                                  pytest.approx(detector.calibration_fprs_[-1])]


def test_openapi_docs_list_the_endpoints(client):
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/health", "/models", "/predict", "/results/{result_id}/{name}"} <= set(paths)


def test_the_viewer_page_is_served(client):
    page = client.get("/", headers={"Authorization": ""})
    assert page.status_code == 200 and 'id="file-input"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]  # no third-party scripts
    assert "<script>" not in page.text and "http" not in page.text.replace("http-equiv", "")
    assert client.get("/static/viewer.js").status_code == 200


def test_png_prediction_matches_the_detector_and_its_files(client, samples, served_model):
    response = post(client, samples["png"].read_bytes(), name="Doe^John_1987.png", fpr=0.05)
    assert response.status_code == 200, response.text
    answer = response.json()
    detector = AnomalyDetector.load(served_model, progress=False)
    expected = detector.predict([samples["png"]], fpr=0.05)[0]
    assert answer["kind"] == "image" and answer["format"] == "png" and answer["shape"] == [64, 64]
    assert answer["score"] == pytest.approx(expected.score, rel=1e-5)
    assert answer["verdict"] == ("anomalous" if expected.is_anomalous else "normal")
    assert answer["thresholds"]["pixel"] == pytest.approx(detector.pixel_threshold(0.05))
    assert answer["thresholds"]["image"] == pytest.approx(detector.image_threshold(0.05))
    assert not any("Doe" in name for name in answer["files"])  # the client's file name is not echoed anywhere
    mask = np.asarray(Image.open(io.BytesIO(client.get(answer["files"]["image_mask.png"]).content)))
    np.testing.assert_array_equal(mask > 0, expected.mask)
    map16 = np.asarray(Image.open(io.BytesIO(client.get(answer["files"]["image_anomaly.png"]).content)))
    assert map16.dtype == np.uint16 and map16.shape == (64, 64)
    low, high = answer["viewer"]["map_range"]
    np.testing.assert_allclose(low + map16 / 65535 * (high - low), expected.pixel_map, atol=(high - low) / 65535)
    # the viewer's arrays are the same 16-bit numbers, and the calibration table is the detector's
    viewer = answer["viewer"]
    maps = np.frombuffer(client.get(viewer["maps"]).content, dtype="<u2").reshape(viewer["n"], 64, 64)
    np.testing.assert_array_equal(maps[0], map16)
    images = np.frombuffer(client.get(viewer["images"]).content, dtype=np.uint8)
    np.testing.assert_array_equal(images.reshape(64, 64), np.asarray(Image.open(samples["png"])))
    np.testing.assert_allclose(viewer["calibration"]["pixel_thresholds"], detector.pixel_thresholds_)


@pytest.mark.parametrize("kind", ["jpeg", "tiff"])
def test_jpeg_and_tiff_are_recognised_from_their_bytes(client, samples, kind):
    answer = post(client, samples[kind].read_bytes(), name="no-extension").json()
    assert answer["format"] == kind and answer["shape"] == [64, 64] and "image_anomaly.png" in answer["files"]


@pytest.mark.parametrize("kind", ["nifti_gz", "nifti", "dicom_zip"])
def test_volumes_give_nifti_maps_in_the_input_geometry(client, samples, kind):
    from normdino.io.volumes import Volume

    answer = post(client, samples[kind].read_bytes(), fpr=0.1).json()
    assert answer["kind"] == "volume" and len(answer["slices"]) == 4
    assert all(s["is_anomalous"] == (s["score"] > answer["thresholds"]["image"]) for s in answer["slices"])
    name = "series" if kind == "dicom_zip" else "volume"
    nifti = client.get(answer["files"][f"{name}_anomaly.nii.gz"])
    assert nifti.status_code == 200
    out = nib.Nifti1Image.from_bytes(gzip.decompress(nifti.content))
    source = samples["dicom_folder" if kind == "dicom_zip" else kind]
    with Volume.open(source) as reference:
        assert out.shape == reference.shape == tuple(answer["shape"])
        np.testing.assert_allclose(out.affine, reference.affine, atol=1e-5)
    # per-slice scores are the top-1 % means of the slices in the map file
    maps = np.asarray(out.dataobj)
    for s in answer["slices"]:
        top = np.sort(maps[:, :, s["index"]].ravel())[-23:]  # 1 % of 48 x 48
        assert s["score"] == pytest.approx(top.mean(), rel=1e-5)
    assert answer["viewer"]["plane"] == "axial" and answer["viewer"]["n"] == 4


# ---------------------------------------------------------------------------------------- bad input


def test_a_wrong_type_is_refused_by_content_not_name(client):
    assert_error(post(client, b"hello, this is text and not an image\n" * 5, name="scan.png"), 415, "not a supported")
    assert_error(post(client, gzip.compress(b"x" * 2000), name="scan.nii.gz"), 415, "not a NIfTI")


def test_a_single_dicom_file_asks_for_the_series(client, samples):
    one = next(samples["dicom_folder"].iterdir()).read_bytes()
    assert_error(post(client, one), 415, "zip of the whole series")


@pytest.mark.parametrize("kind", ["png", "jpeg", "nifti_gz", "nifti", "dicom_zip"])
def test_truncated_files_are_refused_with_a_sentence(client, samples, kind):
    data = samples[kind].read_bytes()
    response = post(client, data[: int(len(data) * 0.6)])
    assert_error(response, 400)
    assert response.json()["error"].rstrip().endswith(".") or response.json()["error"].endswith(")")
    assert client.get("/health").json()["status"] == "ok"  # still serving


def test_too_large_uploads_are_refused(client):
    assert_error(post(client, b"\x89PNG\r\n\x1a\n" + bytes(3 * 2**20)), 413, "larger than the server's limit")


def test_decompression_bombs_are_refused(client):
    # a 4000 x 4000 PNG of zeros: 16 MP, compresses to a few KB, over the 1 MP limit
    assert_error(post(client, png_bytes(np.zeros((4000, 4000), np.uint8))), 413, "megapixels")
    # a NIfTI whose header claims 512^3 voxels, gzip-compressed to nothing
    header = nib.Nifti1Header()
    header.set_data_shape((512, 512, 512))
    header.set_data_dtype(np.uint8)
    assert_error(post(client, gzip.compress(header.binaryblock + bytes(4))), 413, "voxels")
    # a zip member that inflates 1000-fold
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("slice.dcm", bytes(8 * 2**20))
    assert_error(post(client, buffer.getvalue()), 413)


def test_zip_member_names_are_never_paths(client, samples, tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("../../escape.txt", "outside")
    assert_error(post(client, buffer.getvalue()), 415, "no DICOM")
    assert not (tmp_path.parent.parent / "escape.txt").exists()


def test_token_is_required_on_every_api_call(client, samples):
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
        for method, path in (("get", "/health"), ("get", "/models"), ("post", "/predict?model=brain")):
            response = getattr(client, method)(path, headers=headers)
            assert_error(response, 401, "token")


def test_unknown_model_and_bad_fpr(client, samples):
    assert_error(post(client, samples["png"].read_bytes(), model="liver"), 404, "no model named 'liver'", "brain")
    response = client.post("/predict", files={"file": ("a.png", samples["png"].read_bytes())})
    assert_error(response, 400, "several models")
    assert_error(post(client, samples["png"].read_bytes(), fpr=0.9), 400, "outside the calibrated range")
    assert_error(post(client, samples["png"].read_bytes(), fpr="abc"), 422, "fpr")


def test_missing_and_empty_files(client):
    assert_error(client.post("/predict?model=brain"), 422, "no file")
    assert_error(post(client, b""), 400, "empty")


def test_results_expire_can_be_deleted_and_uploads_do_not_stay(models, samples, tmp_path):
    from normdino.serving.results import ResultStore

    now = [0.0]
    store = ResultStore(ttl_s=60, root=tmp_path / "store", clock=lambda: now[0])
    with TestClient(create_app(models, ServeSettings(), store)) as client:
        answer = post(client, samples["png"].read_bytes()).json()
        url = answer["files"]["image_mask.png"]
        assert client.get(url).status_code == 200
        assert not list((tmp_path / "store" / "uploads").iterdir())  # the upload is gone after the response
        now[0] = 61.0
        assert_error(client.get(url), 404, "expired")
        assert not (tmp_path / "store" / "results" / answer["id"]).exists()
        second = post(client, samples["png"].read_bytes()).json()
        assert client.delete(f"/results/{second['id']}").status_code == 204
        assert_error(client.get(second["files"]["image_mask.png"]), 404)
        assert_error(client.get(f"/results/{second['id']}/../../etc/passwd"), 404)
    assert not (tmp_path / "store").exists()  # removed when the server stops


def test_nothing_of_the_upload_is_logged(client, samples, caplog):
    caplog.set_level(logging.DEBUG)
    post(client, samples["dicom_zip"].read_bytes(), name="Doe^Jane_MRN123.zip")
    post(client, samples["png"].read_bytes()[:300], name="Doe^Jane_MRN123.png")
    text = caplog.text
    assert "predict: model brain" in text
    assert "Doe" not in text and "MRN123" not in text


def test_an_internal_failure_is_a_500_sentence_and_the_server_keeps_serving(models, samples, monkeypatch):
    import normdino.serving.app as app_module

    def broken(*args, **kwargs):
        raise RuntimeError("boom /secret/path")

    monkeypatch.setattr(app_module, "run_prediction", broken)
    with TestClient(create_app(models), raise_server_exceptions=False) as client:
        response = post(client, samples["png"].read_bytes())
        assert_error(response, 500, "keeps serving")
        assert "boom" not in response.text
        assert client.get("/health").status_code == 200


def test_nifti_header_sniffing_both_byte_orders():
    from normdino.serving.uploads import sniff

    header = nib.Nifti1Header()
    header.set_data_shape((4, 4, 4))
    little = header.binaryblock + bytes(4)
    big = nib.Nifti1Header(endianness=">")
    big.set_data_shape((4, 4, 4))
    assert sniff(little) == "nifti" and sniff(big.binaryblock + bytes(4)) == "nifti"
    assert sniff(struct.pack("<i", 348) + bytes(400)) is None  # right size field, no magic
