"""The command line's whole runs from Python: fit_to_file (held-out split, torchrun-ready) and predict_to_folder."""

import csv

import numpy as np
import pytest

from normdino.detector import AnomalyDetector
from normdino.errors import NormdinoError, OutputError
from normdino.io.phantoms import write_phantom_dataset
from normdino.workflows.fit import fit_to_file
from normdino.workflows.predict import PredictionRun, predict_to_folder

TINY = {"image_size": 56, "epochs": 2, "n_components": 6, "cache_dir": None, "progress": False}


@pytest.fixture(scope="module")
def fitted(tiny_dinov2_dir, tmp_path_factory):
    """Phantoms without validation images, and the model fit_to_file wrote from their healthy training images."""
    root = tmp_path_factory.mktemp("workflows")
    data = write_phantom_dataset(root / "data", n_train=10, n_valid=0, n_test_normal=2, n_test_anomalous=3,
                                 size=48, seed=5)
    detector = fit_to_file([data / "train" / "good"], root / "m.normdino", backbone=str(tiny_dinov2_dir), **TINY)
    return root / "m.normdino", detector


@pytest.fixture(scope="module")
def data(fitted):
    return fitted[0].parent / "data"


def test_fit_to_file_holds_out_healthy_images_and_writes_the_model_it_returns(fitted, data):
    path, detector = fitted
    summary = detector.training_summary_
    n_images = len(list((data / "train" / "good").glob("*.png")))
    assert summary["val_held_out"] is True and summary["n_val_images"] >= 1
    assert summary["n_train_images"] + summary["n_val_images"] == n_images  # a split, not a copy
    loaded = AnomalyDetector.load(path, progress=False)
    for fpr in (0.01, 0.05):
        assert loaded.pixel_threshold(fpr) == pytest.approx(detector.pixel_threshold(fpr), rel=1e-6)
    assert loaded.volume_settings == {"image_intensity": "dtype"}  # 2D images only: the rule predict must match


def test_fit_to_file_refuses_to_write_over_an_input_before_any_work(data, tiny_dinov2_dir):
    target = next((data / "train" / "good").glob("*.png"))
    before = target.read_bytes()
    with pytest.raises(OutputError, match="is one of the training or validation inputs"):
        fit_to_file([data / "train" / "good"], target, backbone=str(tiny_dinov2_dir), **TINY)
    assert target.read_bytes() == before


def test_predict_to_folder_writes_the_detectors_own_scores(fitted, data, tmp_path):
    path, detector = fitted
    images = sorted((data / "test" / "Ungood" / "img").glob("*.png"))
    run = predict_to_folder(path, images, tmp_path / "out", fpr=0.05, overlays=False, progress=False)
    assert isinstance(run, PredictionRun) and (run.n_written, run.n_skipped) == (len(images), 0)
    rows = list(csv.DictReader(run.scores_csv.open()))
    assert [r["input"] for r in rows] == [str(p) for p in images]
    expected = [p.score for p in AnomalyDetector.load(path, progress=False).predict(images, fpr=0.05)]
    np.testing.assert_allclose([float(r["score"]) for r in rows], expected, rtol=1e-4)
    assert (tmp_path / "out" / "index.html").is_file() and (tmp_path / "out" / "summary.json").is_file()


def test_predict_to_folder_takes_a_fitted_detector_and_skips_what_it_cannot_read(fitted, data, tmp_path):
    _, detector = fitted
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    good = sorted((data / "test" / "good" / "img").glob("*.png"))
    run = predict_to_folder(detector, [*good, broken], tmp_path / "out", overlays=False, progress=False)
    assert (run.n_written, run.n_skipped) == (len(good), 1)
    rows = {r["input"]: r for r in csv.DictReader(run.scores_csv.open())}
    assert rows[str(broken)]["status"] == "skipped" and rows[str(broken)]["message"]
    with pytest.raises(NormdinoError, match="already holds"):  # never written into an earlier result
        predict_to_folder(detector, good, tmp_path / "out", progress=False)
    with pytest.raises(NormdinoError):  # nothing usable: one sentence, not an empty report
        predict_to_folder(detector, [broken], tmp_path / "only-broken", progress=False)
