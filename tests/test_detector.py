"""End to end on generated phantoms with a tiny random backbone: fit, save, load, predict, calibrate."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from normdino import AnomalyDetector
from normdino.errors import InputError, ModelFileError
from normdino.io.phantoms import write_phantom_dataset
from tiny_methods import TINY_METHOD_PARAMS as METHODS


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
    history, best = fitted.training_summary_["val_log_likelihood"], fitted.training_summary_["best_epoch"]
    assert len(history) == 3 and 1 <= best <= 3
    assert history[best - 1] == max(history)
    assert fitted.training_summary_["n_train_images"] == 12
    assert fitted.training_summary_["n_val_images"] == 10


def test_thresholds_give_the_requested_fpr_on_validation_images(fitted, phantoms):
    """Calibration uses exactly the validation pixels: 'score > t' flags floor(fpr·N) of them, ties aside."""
    from normdino.features.cache import extract_tokens

    val = _pngs(phantoms / "valid" / "good" / "img")
    maps = list(fitted.pixel_maps(extract_tokens(fitted.backbone_, val, progress=False)))
    pixels = np.concatenate([m.ravel() for m in maps]).astype(np.float64)
    for fpr in (0.01, 0.05, 0.10):
        t = fitted.pixel_threshold(fpr)
        allowed = int(np.floor(fpr * pixels.size))
        ties = int((pixels == t).sum()) - 1
        assert allowed - ties <= int((pixels > t).sum()) <= allowed
    scores = np.array([np.sort(m.ravel())[-41:].mean() for m in maps])  # top 1 % of 64x64 pixels
    for fpr in (0.10, 0.5):
        flagged = int((scores > fitted.image_threshold(fpr)).sum())
        assert int(np.floor(fpr * len(scores))) - 1 <= flagged <= int(np.floor(fpr * len(scores)))
    # predicting the same images from their files (float32 tokens, not the float16 store) stays within 1 %
    predicted = np.concatenate([p.pixel_map.ravel() for p in fitted.predict(val)])
    for fpr in (0.01, 0.05, 0.10):
        assert abs((predicted > fitted.pixel_threshold(fpr)).mean() - fpr) <= 0.01


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
    """Between grid points the threshold is linear in log-FPR, computed here from the stored table."""
    fprs, table = fitted.calibration_fprs_, fitted.pixel_thresholds_
    for fpr in (0.037, 0.0123, 0.2):
        i = int(np.searchsorted(fprs, fpr))
        lo, hi = fprs[i - 1], fprs[i]
        w = (np.log(fpr) - np.log(lo)) / (np.log(hi) - np.log(lo))
        assert fitted.pixel_threshold(fpr) == pytest.approx((1 - w) * table[i - 1] + w * table[i], rel=1e-12)
    assert fitted.pixel_threshold(0.05) == table[np.searchsorted(fprs, 0.05)]
    with pytest.raises(InputError, match="strictly between 0 and 1"):
        fitted.pixel_threshold(1.5)
    with pytest.raises(InputError, match="outside the calibrated range"):
        fitted.pixel_threshold(0.9)


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
    _rewrite_header(good, tmp_path / "future.normdino", lambda m: m.update(format_version="3.0"))
    with pytest.raises(ModelFileError, match="upgrade normdino"):
        AnomalyDetector.load(tmp_path / "future.normdino")
    _rewrite_header(good, tmp_path / "other.normdino", lambda m: m.update(format="something-else"))
    with pytest.raises(ModelFileError, match="not a normdino model"):
        AnomalyDetector.load(tmp_path / "other.normdino")


def test_dpmm_maps_and_thresholds_equal_those_recorded(phantoms, tiny_dinov2_dir):
    """tests/data/dpmm_regression.json was written by tests/data/record_dpmm_regression.py: first before the method
    interface, again when EM batches became whole images (issue 22; the first recording still held with row batches)."""
    import torch

    recorded = json.loads((Path(__file__).parent / "data" / "dpmm_regression.json").read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the recording used one thread: same reduction order, same bits
    try:
        detector = AnomalyDetector(backbone=str(tiny_dinov2_dir), image_size=112, n_components=16, epochs=3,
                                   batch_images=4, progress=False, seed=0)
        detector.fit(_pngs(phantoms / "train" / "good"), _pngs(phantoms / "valid" / "good" / "img"))
        predictions = detector.predict(_pngs(phantoms / "test" / "Ungood" / "img"), fpr=0.05)
    finally:
        torch.set_num_threads(threads)
    assert detector.training_summary_["best_epoch"] == recorded["best_epoch"] + 1
    assert detector.method_.n_prototypes == recorded["n_prototypes"]
    # the FPR grid is np.geomspace's: its last bit depends on the numpy release, hence rtol 1e-14
    np.testing.assert_allclose(detector.calibration_fprs_, recorded["calibration_fprs"], rtol=1e-14, atol=0)
    # The recording's tokens came from the transformers/numpy releases of 2026-11-25; later releases change the
    # last bits of the attention and matmul kernels (transformers 5.25 + numpy 2.4.6: maps move by 6e-6, the
    # thresholds, which are map values, by 1.4e-5). 5e-5 absorbs that drift and still catches a change of
    # the method that moves a prototype or a score visibly.
    drift = 5e-5
    np.testing.assert_allclose(detector.pixel_thresholds_, recorded["pixel_thresholds"], rtol=0, atol=drift)
    np.testing.assert_allclose(detector.image_thresholds_, recorded["image_thresholds"], rtol=0, atol=drift)
    for prediction, patch_map, score in zip(predictions, recorded["patch_maps"], recorded["scores"]):
        np.testing.assert_allclose(prediction.patch_map, patch_map, rtol=0, atol=drift)
        assert prediction.score == pytest.approx(score, abs=drift)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_fits_saves_loads_and_predicts_bit_identically(method, phantoms, tiny_dinov2_dir, tmp_path):
    from normdino.cli import main

    detector = AnomalyDetector(method=method, backbone=str(tiny_dinov2_dir), image_size=56, progress=False,
                               **METHODS[method])
    detector.fit(_pngs(phantoms / "train" / "good")[:8], _pngs(phantoms / "valid" / "good" / "img")[:6])
    paths = _pngs(phantoms / "test" / "Ungood" / "img")
    before = detector.predict(paths)
    saved = detector.save(tmp_path / f"{method}.normdino")
    loaded = AnomalyDetector.load(saved, progress=False)
    assert loaded.method_name == method and type(loaded.method_) is type(detector.method_)
    for a, b in zip(before, loaded.predict(paths)):
        np.testing.assert_array_equal(a.patch_map, b.patch_map)
        np.testing.assert_array_equal(a.mask, b.mask)
        assert a.score == b.score and a.is_anomalous == b.is_anomalous
    auto = AnomalyDetector.load(saved, progress=False, device="auto")  # the state follows the resolved device
    assert auto.predict(paths[:1])[0].pixel_map.shape == before[0].pixel_map.shape
    assert main(["info", str(saved), "--json"]) == 0


def test_info_json_names_the_method(phantoms, tiny_dinov2_dir, tmp_path, capsys):
    from normdino.cli import main

    detector = AnomalyDetector(method="patchcore-30", backbone=str(tiny_dinov2_dir), image_size=56, progress=False)
    saved = detector.fit(_pngs(phantoms / "train" / "good")[:6]).save(tmp_path / "pc.normdino")
    capsys.readouterr()
    assert main(["info", str(saved), "--json"]) == 0
    header = json.loads(capsys.readouterr().out)
    assert header["method"]["name"] == "patchcore-30" and header["method"]["params"]["coreset_size"] == "30"
    assert main(["info", str(saved)]) == 0
    assert "patchcore-30" in capsys.readouterr().out


def test_a_detector_built_from_a_backbone_instance_saves_a_file_that_loads(phantoms, tmp_path):
    from normdino.features.backbone import Backbone

    backbone = Backbone.random("dinov2_vits14", seed=3, tiny=True, image_size=70)
    detector = AnomalyDetector(method="anomalydino-1shot", backbone=backbone, progress=False)
    detector.fit(_pngs(phantoms / "train" / "good")[:6])
    loaded = AnomalyDetector.load(detector.save(tmp_path / "m.normdino"), progress=False)
    assert loaded.backbone_.is_random and loaded.backbone_.image_size == 70
    image = _pngs(phantoms / "test" / "Ungood" / "img")[0]
    np.testing.assert_array_equal(loaded.predict([image])[0].pixel_map, detector.predict([image])[0].pixel_map)


def test_method_hyper_parameters_are_checked_before_any_work(tmp_path):
    with pytest.raises(InputError, match="no hyper-parameter shots"):
        AnomalyDetector(method="dpmm", shots=3).fit(["/does/not/matter.png"])
    with pytest.raises(InputError, match="n_components must be at least 1"):
        AnomalyDetector(n_components=0).fit(["/does/not/matter.png"])
    with pytest.raises(InputError, match="sigma must be at least 0"):
        AnomalyDetector(sigma=-2).fit(["/does/not/matter.png"])
    with pytest.raises(InputError, match="sigma must be of type float"):
        AnomalyDetector(sigma=float("nan")).fit(["/does/not/matter.png"])
    with pytest.raises(InputError, match="batch_size must be at least 1"):
        AnomalyDetector(batch_size=0).fit(["/does/not/matter.png"])


def test_python_api_takes_a_folder_string(phantoms, tiny_dinov2_dir):
    detector = AnomalyDetector(method="anomalydino-1shot", backbone=str(tiny_dinov2_dir), image_size=56,
                               progress=False)
    detector.fit(str(phantoms / "train" / "good"), str(phantoms / "valid" / "good" / "img"))
    assert detector.training_summary_["n_train_images"] == 12
    assert len(detector.predict(str(phantoms / "test" / "Ungood" / "img"))) == 3


def test_held_out_split_keeps_each_source_on_one_side():
    from normdino.detector import held_out_split

    sources = [f"volume{v}" for v in range(6) for _ in range(5)]  # 6 volumes of 5 slices
    train, val = held_out_split(sources, 0.2, seed=0)
    assert len(train) + len(val) == 30 and len(val) >= 5
    assert not {sources[i] for i in train} & {sources[i] for i in val}
    assert {sources[i] for i in val} == {sources[i] for i in val}
    again = held_out_split(sources, 0.2, seed=0)
    assert np.array_equal(again[1], val)


def test_volume_slices_are_held_out_by_volume(tiny_dinov2_dir):
    rng = np.random.default_rng(0)
    slices = [rng.random((40, 40)).astype(np.float32) for _ in range(12)]
    sources = []

    def stream():
        for i, s in enumerate(slices):
            sources.append(f"vol{i // 4}")  # three volumes of four slices
            yield s

    detector = AnomalyDetector(method="anomalydino", backbone=str(tiny_dinov2_dir), image_size=56, progress=False,
                               val_fraction=0.3)
    detector.fit(stream(), sources=sources)
    assert detector.training_summary_["n_val_images"] == 4  # one whole volume
    assert detector.training_summary_["n_train_images"] == 8


def test_runtime_and_precision_are_recorded_and_another_choice_warns(phantoms, tiny_dinov2_dir, tmp_path, caplog):
    detector = AnomalyDetector(method="anomalydino-1shot", backbone=str(tiny_dinov2_dir), image_size=56,
                               progress=False, precision="int8")
    path = detector.fit(_pngs(phantoms / "train" / "good")[:6]).save(tmp_path / "int8.normdino")
    header = json.loads(_header_json(path))
    assert header["backbone"]["precision"] == "int8" and header["backbone"]["runtime"] == "torch"
    same = AnomalyDetector.load(path, progress=False)
    assert same.backbone_.precision == "int8" and "calibrated with backbone" not in caplog.text
    fp32 = AnomalyDetector.load(path, progress=False, precision="fp32")
    assert fp32.backbone_.precision == "fp32" and "calibrated with backbone precision int8" in caplog.text


def _header_json(path):
    from normdino.model_file import read_header

    return json.dumps(read_header(path))


def test_the_api_caches_tokens_by_default(phantoms, tiny_dinov2_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NORMDINO_CACHE_DIR", str(tmp_path / "cache"))
    images = _pngs(phantoms / "train" / "good")[:6]
    detector = AnomalyDetector(method="anomalydino", backbone=str(tiny_dinov2_dir), image_size=56, progress=False)
    assert detector.token_cache_dir() == tmp_path / "cache"
    detector.fit(images)
    assert any((tmp_path / "cache").iterdir())
    assert AnomalyDetector(cache_dir=None).token_cache_dir() is None


def test_slices_named_by_patient_are_held_out_by_patient(tiny_dinov2_dir, tmp_path):
    """lgg-flair style names (<patient>_<slice>.png): no patient lands on both sides of the held-out split."""
    rng = np.random.default_rng(0)
    paths = []
    for patient in range(5):
        for slice_index in range(4):
            path = tmp_path / f"TCGA_CS_49{patient}0_19970222_{slice_index + 1}.png"
            Image.fromarray((rng.random((32, 32)) * 255).astype(np.uint8)).save(path)
            paths.append(path)
    detector = AnomalyDetector(method="anomalydino", backbone=str(tiny_dinov2_dir), image_size=56, progress=False,
                               val_fraction=0.2, cache_dir=None)
    detector.fit(paths)
    assert detector.training_summary_["n_val_images"] == 4  # one whole patient, not 4 slices of several


def test_held_out_groups_fall_back_to_files_for_independent_images():
    from normdino.io.inputs import held_out_groups

    lgg = [f"d/TCGA_CS_49{p}0_19970222_{s}.png" for p in range(5) for s in range(3)]
    assert len(set(held_out_groups(lgg))) == 5
    numbered = [f"d/img_{i:03d}.png" for i in range(10)]  # one 'patient' only: every file is its own unit
    assert held_out_groups(numbered) == numbered
    volumes = ["p1/flair.nii.gz", "p2/flair.nii.gz", "p3/flair.nii.gz", "p4/flair.nii.gz"]
    assert len(set(held_out_groups(volumes))) == 4


def test_the_batch_size_is_chosen_per_device_and_runtime_unless_given(fitted, tmp_path):
    """None or 'auto' gives the measured best of the device and runtime (issue 22); a given number wins, and a
    loaded model does not reuse the batch size it was fitted with."""
    from normdino.features.runtimes import AUTO_BATCH_SIZES, auto_batch_size

    threads = torch.get_num_threads()
    assert auto_batch_size("cpu", "torch") == threads and ("cpu", "torch") not in AUTO_BATCH_SIZES  # one per core
    assert auto_batch_size("cpu", "onnx") == 8 and auto_batch_size("cuda:0", "torch") == 64
    assert auto_batch_size("xla", "torch") == 8  # untabled: 8
    assert AnomalyDetector(batch_size="auto").effective_batch_size == threads
    assert AnomalyDetector(batch_size=None, device="cpu", runtime="onnx").effective_batch_size == 8
    assert AnomalyDetector(batch_size=5).effective_batch_size == 5
    with pytest.raises(InputError, match="batch_size must be of type int"):
        AnomalyDetector(batch_size="many").effective_batch_size
    path = fitted.save(tmp_path / "m.normdino")
    assert json.loads(_header_json(path))["detector"]["batch_size"] == 8  # what the fit used (readable by older versions)
    assert AnomalyDetector.load(path, progress=False).effective_batch_size == threads
    assert AnomalyDetector.load(path, progress=False, batch_size=3).effective_batch_size == 3


def test_maps_do_not_depend_on_the_batch_size_beyond_float_rounding(fitted, phantoms):
    """The auto batch size may differ from the old fixed 8: maps agree to float rounding (fp32 torch on a CPU)."""
    images = _pngs(phantoms / "test" / "Ungood" / "img") + _pngs(phantoms / "test" / "good" / "img")
    batch_size = fitted.batch_size
    try:
        fitted.batch_size = 1
        one = [p.pixel_map for p in fitted.predict(images)]
        fitted.batch_size = 8
        eight = [p.pixel_map for p in fitted.predict(images)]
    finally:
        fitted.batch_size = batch_size
    for a, b in zip(one, eight):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-6)


# ---------------------------------------------------------------------- the prediction stream


def _images_of(phantoms):
    return [np.asarray(Image.open(p), dtype=np.float32) / 255.0
            for p in _pngs(phantoms / "test" / "Ungood" / "img") + _pngs(phantoms / "test" / "good" / "img")]


def _assert_same_prediction(a, b):
    np.testing.assert_array_equal(a.pixel_map, b.pixel_map)
    np.testing.assert_array_equal(a.patch_map, b.patch_map)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert (a.score, a.threshold, a.is_anomalous, a.fpr) == (b.score, b.threshold, b.is_anomalous, b.fpr)


def test_predict_batches_gives_each_batch_what_predict_gives_it_in_order(fitted, phantoms):
    """Batches of the caller's sizes (empty ones too) come back in order, each equal bit for bit to predict()
    on that batch: the pipeline that runs the next batch's model during this one's scoring changes nothing."""
    images = _images_of(phantoms)
    sizes = [2, 0, 1, 3, 0]
    assert sum(sizes) == len(images)
    starts = np.cumsum([0, *sizes])
    batches = [images[a:b] for a, b in zip(starts, starts[1:])]
    streamed = list(fitted.predict_batches(iter(batches), fpr=0.1))
    assert [len(out) for out in streamed] == sizes
    for batch, out in zip(batches, streamed):
        for alone, got in zip(fitted.predict(batch, fpr=0.1) if batch else [], out):
            _assert_same_prediction(alone, got)


def test_an_image_that_cannot_be_preprocessed_gets_its_error_in_its_place(fitted, phantoms):
    images = _images_of(phantoms)[:3]
    bad = images[1] * 255.0  # values above 1: refused, never clipped
    out = list(fitted.predict_batches([[images[0], bad, images[2]]]))[0]
    assert isinstance(out[1], InputError) and "must lie in [0, 1]" in str(out[1])
    for image, got in zip([images[0], images[2]], [out[0], out[2]]):
        _assert_same_prediction(fitted.predict([image])[0], got)
    with pytest.raises(InputError, match=r"must lie in \[0, 1\]"):  # the API raises it, after what came before it
        list(fitted.iter_predict([images[0], bad]))


def test_a_batch_that_fails_in_the_model_is_retried_image_by_image(fitted, phantoms, monkeypatch):
    """Memory short for a batch of 3 but not for one image: each image is predicted alone, and an image that
    fails even alone gets the error, the others their predictions (``retry=False``: the batch's error for all)."""
    images = _images_of(phantoms)[:4]
    expected = [fitted.predict([image])[0] for image in images]
    real = fitted._embed
    poisoned = images[2]

    def short_of_memory(pixels):
        if len(pixels) > 1 or torch.equal(pixels[0], fitted.backbone_.preprocess(poisoned)):
            raise MemoryError
        return real(pixels)

    monkeypatch.setattr(fitted, "_embed", short_of_memory)
    first, second = fitted.predict_batches([images[:3], images[3:]])
    assert isinstance(first[2], MemoryError)
    for want, got in zip(expected[:2] + expected[3:], first[:2] + second):
        _assert_same_prediction(want, got)
    (whole,) = fitted.predict_batches([images[:2]], retry=False)
    assert all(isinstance(outcome, MemoryError) for outcome in whole)


@pytest.mark.parametrize("groups", [([0.3, 0.1, 0.1],), ([], [0.5, 0.01], [0.01]), ([],), ([1e-4, 0.05], [0.05, 0.2])])
def test_sorted_fprs_equal_numpy_unique(groups):
    from normdino.detector import FPR_GRID, sorted_fprs

    got = sorted_fprs(*groups)
    want = np.unique(np.concatenate([np.asarray(g, dtype=np.float64) for g in groups]))
    assert got.dtype == np.float64 and np.array_equal(got, want)
    assert np.array_equal(FPR_GRID, np.unique(np.concatenate([np.geomspace(1e-4, 0.5, 240), [0.01, 0.05, 0.10]])))
