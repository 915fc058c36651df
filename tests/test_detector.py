"""End to end on generated phantoms with a tiny random backbone: fit, save, load, predict, calibrate."""

import json
import struct

import numpy as np
import pytest
from PIL import Image

from normdino import AnomalyDetector
from normdino.errors import InputError, ModelFileError
from normdino.io.phantoms import write_phantom_dataset


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("phantoms"), n_train=12, n_valid=10,
                                 n_test_normal=3, n_test_anomalous=3, size=64, seed=0)


def _pngs(folder):
    return sorted(folder.glob("*.png"))


@pytest.fixture(scope="module")
def fitted(phantoms, tiny_dinov2_dir):
    detector = AnomalyDetector(backbone=str(tiny_dinov2_dir), image_size=112, n_components=16, epochs=3,
                               batch_images=4, progress=False, seed=0)
    return detector.fit(_pngs(phantoms / "train" / "good"), _pngs(phantoms / "valid" / "good" / "img"))


def test_fit_learns_prototypes_and_summary(fitted):
    assert fitted.prototypes_.ndim == 2 and 1 <= fitted.prototypes_.shape[0] <= 16
    assert fitted.grid_shape_ == (8, 8)  # 112 px / patch 14
    assert len(fitted.history_) == 3 and 1 <= fitted.best_epoch_ + 1 <= 3
    assert fitted.history_[fitted.best_epoch_] == max(fitted.history_)
    assert fitted.training_summary_["n_train_images"] == 12
    assert fitted.training_summary_["n_val_images"] == 10


def test_thresholds_give_the_requested_fpr_on_validation_images(fitted, phantoms):
    predictions = fitted.predict(_pngs(phantoms / "valid" / "good" / "img"))
    pixels = np.concatenate([p.pixel_map.ravel() for p in predictions])
    for fpr in (0.01, 0.05, 0.10):
        assert abs((pixels > fitted.pixel_threshold(fpr)).mean() - fpr) <= 0.01
    scores = np.array([p.score for p in predictions])
    assert (scores > fitted.image_threshold(0.10)).mean() <= 0.10 + 1 / len(scores)


def test_predict_shapes_and_consistency(fitted, phantoms):
    paths = _pngs(phantoms / "test" / "Ungood" / "img")
    pred = fitted.predict(paths, fpr=0.05)[0]
    assert pred.patch_map.shape == (8, 8)
    assert pred.pixel_map.shape == (64, 64) and pred.pixel_map.dtype == np.float32
    assert pred.mask.dtype == bool and pred.mask.shape == (64, 64)
    np.testing.assert_array_equal(pred.mask, pred.pixel_map > fitted.pixel_threshold(0.05))
    top = np.sort(pred.pixel_map.ravel())[-41:]  # top 1 % of 4096 pixels
    assert pred.score == pytest.approx(top.mean(), rel=1e-5)
    # arrays and files give the same result
    image = np.asarray(Image.open(paths[0]), dtype=np.float32) / 255.0
    np.testing.assert_allclose(fitted.predict_one(image).pixel_map, pred.pixel_map, atol=1e-6)


def test_save_load_round_trip_gives_identical_maps(fitted, phantoms, tmp_path):
    paths = _pngs(phantoms / "test" / "Ungood" / "img")
    before = fitted.predict(paths)
    path = fitted.save(tmp_path / "model.normdino")
    loaded = AnomalyDetector.load(path, progress=False)
    after = loaded.predict(paths)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a.pixel_map, b.pixel_map)
        np.testing.assert_array_equal(a.mask, b.mask)
        assert a.score == b.score
    assert loaded.pixel_threshold(0.05) == fitted.pixel_threshold(0.05)
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_any_fpr_between_grid_points_is_interpolated(fitted):
    t1, t2, t3 = (fitted.pixel_threshold(f) for f in (0.04, 0.045, 0.05))
    assert t1 >= t2 >= t3
    with pytest.raises(InputError, match="strictly between 0 and 1"):
        fitted.pixel_threshold(1.5)


def test_held_out_validation_when_none_given(phantoms, tiny_dinov2_dir):
    detector = AnomalyDetector(backbone=str(tiny_dinov2_dir), image_size=112, n_components=8, epochs=1,
                               progress=False, val_fraction=0.25)
    detector.fit(_pngs(phantoms / "train" / "good"))
    assert detector.training_summary_["n_train_images"] == 9
    assert detector.training_summary_["n_val_images"] == 3
    assert detector.training_summary_["val_held_out"] is True


def test_unfitted_detector_says_so():
    with pytest.raises(InputError, match="not fitted"):
        AnomalyDetector().predict([np.zeros((8, 8), np.float32)])


def _rewrite_header(path, out, change):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = json.loads(header["__metadata__"]["normdino"])
    change(meta)
    header["__metadata__"]["normdino"] = json.dumps(meta)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    out.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])


def test_model_file_errors(fitted, tmp_path):
    good = fitted.save(tmp_path / "model.normdino")
    with pytest.raises(ModelFileError, match="does not exist"):
        AnomalyDetector.load(tmp_path / "missing.normdino")
    (tmp_path / "text.normdino").write_text("hello")
    with pytest.raises(ModelFileError, match="not a normdino model file"):
        AnomalyDetector.load(tmp_path / "text.normdino")
    (tmp_path / "cut.normdino").write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ModelFileError, match="truncated"):
        AnomalyDetector.load(tmp_path / "cut.normdino")
    _rewrite_header(good, tmp_path / "future.normdino", lambda m: m.update(format_version="2.0"))
    with pytest.raises(ModelFileError, match="upgrade normdino"):
        AnomalyDetector.load(tmp_path / "future.normdino")
    _rewrite_header(good, tmp_path / "other.normdino", lambda m: m.update(format="something-else"))
    with pytest.raises(ModelFileError, match="not a normdino model"):
        AnomalyDetector.load(tmp_path / "other.normdino")
