"""Metrics against scikit-learn and direct computations; streaming against exact."""

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from normdino.errors import InputError
from normdino.evaluation.accumulator import PixelScoreAccumulator
from normdino.evaluation.curves import MetricUndefinedWarning
from normdino.evaluation.metrics import (
    aupro,
    dice,
    image_aupr,
    image_auroc,
    pixel_aupr,
    pixel_auroc,
    threshold_at_fpr,
)


def _random_maps(seed, n=12, shape=(32, 40), quantize=None, shift=1.0):
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for i in range(n):
        mask = np.zeros(shape, dtype=np.uint8)
        if i % 3:  # two thirds of the images have a lesion or two
            for _ in range(rng.integers(1, 3)):
                r, c = rng.integers(0, shape[0] - 8), rng.integers(0, shape[1] - 8)
                mask[r:r + rng.integers(2, 8), c:c + rng.integers(2, 8)] = 255
        scores = rng.normal(size=shape) + shift * (mask > 0)
        if quantize:
            scores = np.round(scores * quantize) / quantize  # many ties
        maps.append(scores)
        masks.append(mask)
    return maps, masks


def _flat(maps, masks):
    return np.concatenate([m.ravel() for m in maps]), np.concatenate([k.ravel() > 0 for k in masks])


@pytest.mark.parametrize("seed,quantize", [(0, None), (1, None), (2, 4), (3, 1)])
def test_pixel_auroc_aupr_match_sklearn(seed, quantize):
    maps, masks = _random_maps(seed, quantize=quantize)
    s, y = _flat(maps, masks)
    assert pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert pixel_aupr(maps, masks) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_hand_made_maps():
    scores = np.array([[0.1, 0.2], [0.8, 0.9]])
    mask = np.array([[0, 0], [1, 1]])
    assert pixel_auroc(scores, mask) == 1.0 and pixel_aupr(scores, mask) == 1.0
    assert pixel_auroc(-scores, mask) == 0.0
    assert pixel_auroc(np.full((2, 2), 0.5), mask) == 0.5  # all tied
    # ranking (desc): pos, neg, pos, neg -> AUROC 3/4, AP = 1/2 * 1 + 1/2 * 2/3
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    mask = np.array([1, 0, 1, 0])
    assert pixel_auroc(scores, mask) == pytest.approx(0.75)
    assert pixel_aupr(scores, mask) == pytest.approx(0.5 + 1 / 3)
    # a tie between one normal and one anomalous pixel counts one half
    assert pixel_auroc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5
    # lists of maps of different shapes, None = all-normal image
    assert pixel_auroc([np.array([0.9, 0.2]), np.array([[0.1]])], [np.array([1, 0]), None]) == 1.0


def test_all_normal_and_all_anomalous():
    scores = np.linspace(0, 1, 10)
    with pytest.warns(MetricUndefinedWarning):
        assert math.isnan(pixel_auroc(scores, np.zeros(10)))
    with pytest.warns(MetricUndefinedWarning):
        assert math.isnan(pixel_aupr(scores, None))
    with pytest.warns(MetricUndefinedWarning):
        assert math.isnan(pixel_auroc(scores, np.ones(10)))
    assert pixel_aupr(scores, np.ones(10)) == 1.0  # precision is 1 everywhere, as in sklearn
    assert average_precision_score(np.ones(10), scores) == 1.0
    acc = PixelScoreAccumulator().add(scores, None)
    with pytest.warns(MetricUndefinedWarning):
        assert math.isnan(acc.auroc())
    with pytest.warns(MetricUndefinedWarning):
        assert math.isnan(image_auroc([0.1, 0.4], [1, 1]))


def test_image_metrics_match_sklearn():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(size=200) + labels, 1)
    assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_aupr(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert image_auroc(list(scores), list(labels)) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_thresholds_at_many_fprs_equal_one_at_a_time():
    from normdino.thresholds import thresholds_at_fprs

    scores = np.round(np.random.default_rng(3).normal(size=5000), 2)
    fprs = [0.001, 0.01, 0.05, 0.1, 0.5]
    assert thresholds_at_fprs(scores, fprs).tolist() == [threshold_at_fpr(scores, f) for f in fprs]


@pytest.mark.parametrize("fpr", [0.0, 0.01, 0.05, 0.1, 0.29, 0.5])
def test_threshold_at_fpr_is_the_tightest_quantile(fpr):
    rng = np.random.default_rng(7)
    normal = np.round(rng.normal(size=(10, 50)), 2)  # ties
    t = threshold_at_fpr(list(normal), fpr)
    flat = normal.ravel()
    allowed = math.floor(fpr * flat.size + 1e-9)
    assert np.count_nonzero(flat > t) <= allowed
    assert t in flat
    lower = flat[flat < t]
    if lower.size:  # any lower threshold would flag too many
        assert np.count_nonzero(flat > lower.max()) > allowed


def test_dice_matches_sklearn_f1_and_errors():
    rng = np.random.default_rng(3)
    preds = [rng.random((8, 8)) > 0.6 for _ in range(4)]
    masks = [rng.random((8, 8)) > 0.7 for _ in range(4)]
    expected = f1_score(np.concatenate([m.ravel() for m in masks]), np.concatenate([p.ravel() for p in preds]))
    assert dice(preds, masks) == pytest.approx(expected)
    with pytest.warns(MetricUndefinedWarning):
        assert math.isnan(dice(np.zeros((3, 3)), np.zeros((3, 3))))
    with pytest.raises(InputError, match="same shape"):
        dice(np.zeros((3, 3)), np.zeros((3, 4)))


def test_dice_at_fpr_against_direct_computation():
    maps, masks = _random_maps(11, n=15, shape=(24, 24), shift=2.0)
    healthy, _ = _random_maps(12, n=10, shape=(24, 24), shift=0.0)  # scores of healthy validation images
    fprs = (0.01, 0.05, 0.10)
    thresholds = [threshold_at_fpr(healthy, f) for f in fprs]
    acc = PixelScoreAccumulator(thresholds=thresholds)
    for m, k in zip(maps, masks):
        acc.add(m, k)
    s, y = _flat(maps, masks)
    for t in thresholds:
        pred = s > t
        tp, fp, fn = np.sum(pred & y), np.sum(pred & ~y), np.sum(~pred & y)
        assert acc.dice_at(t) == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-12)
        assert dice([m > t for m in maps], masks) == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-12)
    # thresholds read from a streamed healthy accumulator are bin upper values: histogram Dice is exact there
    healthy_acc = PixelScoreAccumulator()
    for h in healthy:
        healthy_acc.add(h)
    h_flat = np.concatenate([h.ravel() for h in healthy])
    for f in fprs:
        t = healthy_acc.threshold_at_fpr(f)
        assert np.count_nonzero(h_flat.astype(np.float32) > t) <= math.floor(f * h_flat.size)
        assert t >= threshold_at_fpr(healthy, f)
        assert t == pytest.approx(threshold_at_fpr(healthy, f), rel=1e-4)
        pred = s.astype(np.float32) > t
        tp, fp, fn = np.sum(pred & y), np.sum(pred & ~y), np.sum(~pred & y)
        assert acc.dice_at(t) == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-12)


def test_streaming_matches_exact_on_millions_of_pixels():
    rng = np.random.default_rng(0)
    acc = PixelScoreAccumulator(flush_size=1 << 20)
    all_scores, all_labels = [], []
    for i in range(50):  # 50 x 240 x 240 = 2.9 M pixels
        mask = np.zeros((240, 240), dtype=bool)
        if i % 2:
            mask[60:60 + i, 100:140] = True
        scores = (0.2 + 0.05 * rng.standard_normal((240, 240)) + 0.06 * mask).astype(np.float32)
        acc.add(scores, mask)
        all_scores.append(scores.ravel())
        all_labels.append(mask.ravel())
    s, y = np.concatenate(all_scores), np.concatenate(all_labels)
    exact_auroc, exact_aupr = pixel_auroc(s, y), pixel_aupr(s, y)
    assert abs(acc.auroc() - exact_auroc) < 1e-4
    assert abs(acc.aupr() - exact_aupr) < 1e-4
    assert abs(acc.auroc() - exact_auroc) <= acc.auroc_error_bound() + 1e-12
    assert acc.auroc_error_bound() < 1e-4
    assert acc.n_normal_ + acc.n_anomalous_ == s.size and acc.n_anomalous_ == y.sum()


def test_streaming_handles_any_range_and_sign():
    rng = np.random.default_rng(1)
    scores = np.concatenate([rng.normal(size=5000) * 1e-6, rng.normal(size=5000) * 1e5, [-3e30, 2e30, 0.0, -0.0]])
    labels = rng.random(scores.size) < 0.3
    acc = PixelScoreAccumulator(track_regions=False)
    acc.add(scores[:7000], labels[:7000]).add(scores[7000:], labels[7000:])
    assert acc.auroc() == pytest.approx(roc_auc_score(labels, scores), abs=1e-4)
    assert acc.aupr() == pytest.approx(average_precision_score(labels, scores), abs=1e-4)


def test_curves_and_histograms():
    maps, masks = _random_maps(4, n=30, shape=(40, 40))
    acc = PixelScoreAccumulator()
    for m, k in zip(maps, masks):
        acc.add(m, k)
    fpr, tpr, thr = acc.roc_curve(max_points=50)
    assert fpr.size <= 52 and (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0) and np.all(np.diff(thr) <= 0)
    precision, recall, _ = acc.pr_curve(max_points=50)
    assert recall[-1] == 1.0 and np.all(np.diff(recall) >= 0) and np.all((precision >= 0) & (precision <= 1))
    edges, normal, anomalous = acc.histograms(n_bins=20)
    assert edges.size == 21 and normal.sum() == acc.n_normal_ and anomalous.sum() == acc.n_anomalous_
    s, y = _flat(maps, masks)
    assert edges[0] <= s.min() and edges[-1] >= s.max()


def _brute_force_aupro(maps, masks, limit):
    """PRO curve by direct counting at every distinct score, regions by an explicit 8-connected flood fill."""
    regions = []
    for img, mask in enumerate(masks):
        seen = np.zeros(mask.shape, dtype=bool)
        for r0, c0 in zip(*np.nonzero(mask)):
            if seen[r0, c0]:
                continue
            stack, pixels = [(r0, c0)], []
            seen[r0, c0] = True
            while stack:
                r, c = stack.pop()
                pixels.append((r, c))
                for dr in (-1, 0, 1):
                    for dc in (-1, 0, 1):
                        rr, cc = r + dr, c + dc
                        if 0 <= rr < mask.shape[0] and 0 <= cc < mask.shape[1] and mask[rr, cc] and not seen[rr, cc]:
                            seen[rr, cc] = True
                            stack.append((rr, cc))
            regions.append((img, pixels))
    normal = np.concatenate([m[k == 0] for m, k in zip(maps, masks)])
    points = [(0.0, 0.0)]
    for t in np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]:
        fpr = np.mean(normal >= t)
        pro = np.mean([np.mean([maps[i][p] >= t for p in pixels]) for i, pixels in regions])
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


@pytest.mark.parametrize("limit", [0.05, 0.3, 1.0])
def test_aupro_against_brute_force(limit):
    maps, masks = _random_maps(9, n=6, shape=(16, 16), quantize=3)
    masks = [(k > 0).astype(np.uint8) for k in masks]
    masks[1][0, 0] = masks[1][1, 1] = 1  # diagonal neighbours: one region under 8-connectivity
    expected = _brute_force_aupro(maps, masks, limit)
    assert aupro(maps, masks, fpr_limit=limit) == pytest.approx(expected, abs=1e-12)
    acc = PixelScoreAccumulator(track_regions=True)
    for m, k in zip(maps, masks):
        acc.add(m, k)
    assert acc.aupro(limit) == pytest.approx(expected, abs=1e-9)


def test_input_errors():
    with pytest.raises(InputError, match="same shape"):
        pixel_auroc(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(InputError, match="NaN"):
        pixel_auroc(np.array([0.1, np.nan]), np.array([0, 1]))
    with pytest.raises(InputError, match="mask has shape"):
        PixelScoreAccumulator().add(np.zeros((4, 4)), np.zeros((2, 2)))
    with pytest.raises(InputError, match="NaN"):
        PixelScoreAccumulator().add(np.array([np.inf]))
    with pytest.raises(InputError, match="fpr"):
        threshold_at_fpr(np.zeros(3), 1.0)
    with pytest.raises(InputError, match="track_regions"):
        PixelScoreAccumulator().aupro()


def test_no_warnings_on_well_defined_inputs():
    maps, masks = _random_maps(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pixel_auroc(maps, masks)
        pixel_aupr(maps, masks)
        aupro(maps, masks)
