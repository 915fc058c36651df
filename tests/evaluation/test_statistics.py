"""Bootstrap intervals and permutation tests against direct numpy / scikit-learn computations."""

import itertools

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from normdino.evaluation.statistics import (ImageStatistics, bootstrap_weights, few_shot_summary,
                                            paired_permutation_test)


def _images(n_normal=4, n_anomalous=5, side=8, seed=0):
    """Score maps quantised to k/16 (each value its own histogram bin, so the histogram is exact)."""
    rng = np.random.default_rng(seed)
    maps, masks, labels = [], [], []
    for i in range(n_normal + n_anomalous):
        mask = np.zeros((side, side), bool)
        if i >= n_normal:
            r, c = rng.integers(0, side - 3, 2)
            mask[r:r + 3, c:c + 3] = True
        scores = np.round(np.clip(rng.normal(0.3, 0.15, (side, side)) + 0.3 * mask, 0, 1) * 16) / 16
        maps.append(scores.astype(np.float32))
        masks.append(mask)
        labels.append(int(mask.any()))
    return maps, masks, labels


def test_bootstrap_weights_are_stratified_and_seeded():
    labels = [0, 0, 0, 1, 1]
    w = bootstrap_weights(labels, 500, seed=4)
    assert w.shape == (500, 5) and (w[:, :3].sum(1) == 3).all() and (w[:, 3:].sum(1) == 2).all()
    assert np.array_equal(w, bootstrap_weights(labels, 500, seed=4))
    assert not np.array_equal(w, bootstrap_weights(labels, 500, seed=5))
    assert w[:, :3].mean(0) == pytest.approx([1, 1, 1], abs=0.15)  # each image drawn once on average
    # the documented draw, done by hand
    rng = np.random.default_rng(4)
    draws0 = rng.integers(0, 3, size=(500, 3))
    assert np.array_equal(w[7, :3], np.bincount(draws0[7], minlength=3))


def test_bootstrap_interval_matches_a_direct_resampling():
    maps, masks, labels = _images()
    thresholds = [0.5, 0.625]
    stats = ImageStatistics(len(thresholds))
    image_scores = [float(np.sort(m.ravel())[-3:].mean()) for m in maps]
    for m, mask, score, label in zip(maps, masks, image_scores, labels):
        stats.add(m, mask if mask.any() else None, thresholds, score, label)
    n = 80
    intervals = stats.bootstrap(n, seed=2)

    weights = bootstrap_weights(labels, n, seed=2)
    direct = {k: [] for k in ("pixel_auroc", "pixel_aupr", "image_auroc", "dice_0", "dice_1")}
    for w in weights:
        idx = np.repeat(np.arange(len(maps)), w)
        s = np.concatenate([maps[i].ravel() for i in idx])
        y = np.concatenate([masks[i].ravel() for i in idx])
        direct["pixel_auroc"].append(roc_auc_score(y, s))
        direct["pixel_aupr"].append(average_precision_score(y, s))
        direct["image_auroc"].append(roc_auc_score(np.asarray(labels)[idx], np.asarray(image_scores)[idx]))
        for t, threshold in enumerate(thresholds):
            p = s > threshold
            direct[f"dice_{t}"].append(2 * (p & y).sum() / (2 * (p & y).sum() + (p & ~y).sum() + (~p & y).sum()))
    for key, values in direct.items():
        assert intervals[key] == pytest.approx(tuple(np.percentile(values, [2.5, 97.5])), abs=1e-9), key


def test_per_image_metrics_match_sklearn_and_memory_is_bounded():
    maps, masks, labels = _images(n_normal=1, n_anomalous=3)
    stats = ImageStatistics(1)
    for m, mask, label in zip(maps, masks, labels):
        stats.add(m, mask, [0.5], 0.0, label)
    auroc, aupr = stats.per_image_pixel_metrics()
    assert np.isnan(auroc[0]) and np.isnan(aupr[0])
    for i in range(1, 4):
        assert auroc[i] == pytest.approx(roc_auc_score(masks[i].ravel(), maps[i].ravel()))
        assert aupr[i] == pytest.approx(average_precision_score(masks[i].ravel(), maps[i].ravel()))

    big = ImageStatistics(3)
    rng = np.random.default_rng(0)
    for _ in range(3):  # 256x256 scores over seven octaves: at most 7 x 256 bins each, whatever the pixel count
        big.add(np.exp2(rng.uniform(-7, 0, (256, 256))), None, [0.1, 0.2, 0.3], 0.0, 0)
    assert all(b.size <= 7 * 256 + 1 for b in big.bins)
    assert big.nbytes <= 3 * ((7 * 256 + 1) * 12 + 3 * 3 * 8)


def test_identical_methods_give_p_one_and_a_planted_difference_is_found():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.6, 0.9, 30)
    same = paired_permutation_test(a, a.copy(), 2000, seed=1)
    assert same.p_value == 1.0 and same.statistic == 0.0 and same.n_pairs == 30
    planted = paired_permutation_test(a + 0.05 + rng.normal(0, 0.01, 30), a, 2000, seed=1)
    assert planted.p_value < 0.01 and planted.statistic == pytest.approx(0.05, abs=0.01)
    assert planted.p_value == pytest.approx(1 / 2001)  # no permutation reaches the observed difference


def test_permutation_p_value_matches_exact_enumeration():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.2, 1, 10), rng.normal(0, 1, 10)
    d = a - b
    patterns = np.array(list(itertools.product([-1, 1], repeat=10)))
    exact = np.mean(np.abs(patterns @ d) >= abs(d.sum()) - 1e-12)
    test = paired_permutation_test(a, b, 40_000, seed=0)
    assert test.p_value == pytest.approx(exact, abs=0.01)
    with_nan = paired_permutation_test(np.append(a, np.nan), np.append(b, 1.0), 100)
    assert with_nan.n_pairs == 10


def test_few_shot_summary():
    assert few_shot_summary([0.7, 0.9, np.nan, 0.8]) == pytest.approx({"max": 0.9, "mean": 0.8, "min": 0.7})
