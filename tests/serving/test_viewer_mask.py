"""The viewer's mask, computed from the 16-bit map PNG as viewer.js does, equals the mask of the exact .npy scores.

Issue 20: ``--fusion pixel`` scores are centred (negative on most healthy pixels) but the method declared the
range [0, 1], so the 16-bit PNG clipped them to 0 and the viewer masked 100 % of an image whose true mask at the
same threshold covered half of it. Checked for every registered method and every fusion rule.
"""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from PIL import Image

from normdino import AnomalyDetector
from normdino.io.phantoms import write_phantom_dataset
from normdino.io.writing import PredictionWriter
from normdino.methods import registry
from normdino.methods.himatch import FUSIONS
from tiny_methods import TINY_METHOD_PARAMS

PNG16_MAX = 65535
FPRS = (1e-3, 0.01, 0.1, 0.3, 0.5)


# ---------------------------------------------------------------- viewer.js, line by line (doubles, like JS)
def interp_log(fprs: list[float], values: list[float], fpr: float) -> float:
    """viewer.js interpLog: the threshold at fpr, linear in log(FPR) between the calibrated points."""
    x = math.log(fpr)
    if fpr <= fprs[0]:
        return values[0]
    if fpr >= fprs[-1]:
        return values[-1]
    lo, hi = 0, len(fprs) - 1
    while hi - lo > 1:
        mid = (lo + hi) >> 1
        if fprs[mid] <= fpr:
            lo = mid
        else:
            hi = mid
    x0, x1 = math.log(fprs[lo]), math.log(fprs[hi])
    return values[lo] + (values[hi] - values[lo]) * (x - x0) / (x1 - x0)


def score_of(value: int, low: float, high: float) -> float:
    """viewer.js scoreOf."""
    return low + value / PNG16_MAX * (high - low)


def mask_cut(threshold: float, low: float, high: float) -> int:
    """viewer.js maskCut: the largest 16-bit value whose score is not above the threshold (-1 if none)."""
    value = math.floor((threshold - low) / (high - low) * PNG16_MAX)
    value = min(PNG16_MAX, max(-1, value))
    while value + 1 <= PNG16_MAX and score_of(value + 1, low, high) <= threshold:
        value += 1
    while value >= 0 and score_of(value, low, high) > threshold:
        value -= 1
    return value


def test_interp_log_mirror_matches_the_javascript_source():
    """The mirror above stays honest: viewer.js still does these steps."""
    from importlib.resources import files

    js = files("normdino.serving").joinpath("static/viewer.js").read_text()
    for line in ("return low + value / PNG16_MAX * (high - low);",
                 "let value = Math.floor((state.threshold - low) / (high - low) * PNG16_MAX);",
                 "value = Math.min(PNG16_MAX, Math.max(-1, value));",
                 "while (value + 1 <= PNG16_MAX && scoreOf(value + 1) <= state.threshold) value++;",
                 "while (value >= 0 && scoreOf(value) > state.threshold) value--;",
                 "if (maps[i] > cut) { inMask[i] = 1; count++; }",
                 "state.threshold = interpLog(c.fprs, c.pixel_thresholds, state.fpr);"):
        assert line in js, line


# ---------------------------------------------------------------- every method and fusion
def _cases() -> list[tuple[str, dict]]:
    cases = []
    for name, params in TINY_METHOD_PARAMS.items():
        if any(p.name == "fusion" for p in registry.method_class(name).PARAMS):
            cases.extend((name, dict(params, fusion=rule)) for rule in FUSIONS)
        else:
            cases.append((name, dict(params)))
    return cases


def test_the_cases_cover_every_registered_family():
    assert {registry.split_name(name)[0] for name, _ in _cases()} == set(registry.families())


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("viewer-mask"), n_train=6, n_valid=4, n_test_normal=1,
                                 n_test_anomalous=2, size=48, seed=2)


@pytest.mark.parametrize("name, params", _cases(), ids=lambda v: v if isinstance(v, str) else v.get("fusion", ""))
def test_viewer_mask_from_the_png_equals_the_npy_mask(name, params, phantoms, tiny_dinov2_dir, tmp_path):
    detector = AnomalyDetector(method=name, backbone=str(tiny_dinov2_dir), image_size=56, progress=False, seed=0,
                               cache_dir=None, **params)
    train = sorted((phantoms / "train" / "good").glob("*.png"))
    # calibrated on the training images themselves (the fallback without held-out images): there the centred
    # "pixel" fusion gives mostly negative healthy scores, as the reviewer saw with real weights
    detector.fit(train, train)
    if params.get("fusion") == "pixel":
        assert detector.pixel_threshold(0.5) < 0  # the case the test is about
    writer = PredictionWriter(detector, tmp_path / "out", progress=False)
    tests = sorted((phantoms / "test").rglob("img/*.png"))
    writer.write_images(tests)
    writer.finish()
    low, high = writer.map_range  # what the viewer is told (serving: map_value_range(writer))
    calibration = {"fprs": [float(v) for v in detector.calibration_fprs_],
                   "pixel_thresholds": [float(v) for v in detector.pixel_thresholds_]}
    step = (high - low) / PNG16_MAX
    with open(tmp_path / "out" / "scores.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["status"] == "ok"]
    assert len(rows) == len(tests)
    for row in rows:
        exact = np.load(tmp_path / "out" / row["anomaly_npy"]).astype(np.float64)
        with Image.open(tmp_path / "out" / row["anomaly_map"]) as im:
            values = np.asarray(im).astype(np.int64)
            assert float(im.text["normdino:vmin"]) == low and float(im.text["normdino:vmax"]) == high
        for fpr in FPRS:
            threshold = interp_log(calibration["fprs"], calibration["pixel_thresholds"], fpr)
            assert abs(threshold - detector.pixel_threshold(fpr)) <= 1e-9 * max(1.0, abs(threshold))
            viewer = values > mask_cut(threshold, low, high)
            truth = exact > detector.pixel_threshold(fpr)
            differ = viewer != truth
            # only quantisation may differ: pixels within one 16-bit step of the threshold
            assert np.all(np.abs(exact[differ] - threshold) <= step), (
                f"{name} {params.get('fusion', '')} at FPR {fpr}: the viewer masks {viewer.mean():.1%}, "
                f"the .npy {truth.mean():.1%}")
            assert low <= threshold <= high  # every threshold lies where the stored values are not clipped
    if params.get("fusion") == "pixel":  # centred scores have no a-priori range: the calibrated one is recorded
        assert detector.method_.score_range is None
        assert low <= detector.pixel_range_[0] < 0 < detector.pixel_range_[1] <= high


def test_the_calibrated_range_is_saved_and_checked(phantoms, tiny_dinov2_dir, tmp_path):
    from normdino.errors import ModelFileError
    from normdino.model_file import read_model_file, write_model_file

    train = sorted((phantoms / "train" / "good").glob("*.png"))
    detector = AnomalyDetector(method="himatch", backbone=str(tiny_dinov2_dir), image_size=56, progress=False,
                               cache_dir=None, fusion="pixel", **TINY_METHOD_PARAMS["himatch"]).fit(train, train)
    path = detector.save(tmp_path / "m.normdino")
    loaded = AnomalyDetector.load(path, progress=False, cache_dir=None)
    np.testing.assert_array_equal(loaded.pixel_range_, detector.pixel_range_)
    assert PredictionWriter(loaded, tmp_path / "a", progress=False).map_range == \
        PredictionWriter(detector, tmp_path / "b", progress=False).map_range
    header, tensors = read_model_file(path)
    keep = {k: header[k] for k in ("method", "backbone", "detector", "training")}
    write_model_file(tmp_path / "bad.normdino", keep,
                     dict(tensors, **{"calibration.pixel_range": tensors["calibration.pixel_range"].flip(0)}))
    with pytest.raises(ModelFileError, match="calibration score range"):
        AnomalyDetector.load(tmp_path / "bad.normdino", progress=False, cache_dir=None)
