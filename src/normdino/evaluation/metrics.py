"""Evaluation metrics of the paper's protocol: pixel and image AUROC/AUPR, Dice at a set FPR, AUPRO.

Conventions (used everywhere in this module):

* A pixel is predicted anomalous when its score is **strictly above** the threshold.
* Masks are anomalous where they are non-zero; ``None`` means an all-normal image.
* Undefined metrics (AUROC with only one class, AUPR, AUPRO or Dice without anomalous pixels)
  return NaN and emit :class:`MetricUndefinedWarning`
  instead of raising, so one degenerate split does not abort a whole benchmark table.
  AUPR with only anomalous pixels is 1.0 (precision is 1 at every threshold), as in scikit-learn;
  AUPR without anomalous pixels is NaN here where scikit-learn returns 0.
* Dice is pooled over the whole data set (2 TP / (2 TP + FP + FN) with TP, FP, FN summed over all
  pixels of all images), as in the paper; it is not the mean of per-image Dice.
* AUPR is average precision, Σ (R_i − R_{i−1}) P_i over distinct thresholds, as scikit-learn's
  ``average_precision_score`` (no interpolation).

Exact functions (``pixel_auroc``, ``pixel_aupr``, ``aupro``, …) hold all scores in memory; exact AUROC and
average precision are scikit-learn's (``roc_auc_score``, ``average_precision_score``). For a whole
benchmark use :class:`normdino.evaluation.accumulator.PixelScoreAccumulator`, which streams images into a
fixed-resolution histogram; the curve maths both share is :mod:`normdino.evaluation.curves`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import numpy as np

from normdino.errors import InputError
from normdino.evaluation.curves import aupro_from_counts, dice_from_counts, region_weights, undefined
from normdino.thresholds import thresholds_at_fprs

ArrayOrList = Union[np.ndarray, Sequence[np.ndarray]]

__all__ = ["pixel_auroc", "pixel_aupr", "image_auroc", "image_aupr", "threshold_at_fpr", "dice", "aupro"]


# ---------------------------------------------------------------------------------------------
# Input handling


def _as_list(x: ArrayOrList) -> list[np.ndarray]:
    if isinstance(x, np.ndarray):
        return [x]
    return [np.asarray(a) for a in x]


def _flatten_pairs(scores: ArrayOrList, masks: ArrayOrList | None) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate score maps and their masks (None entries = all normal) into flat float64 / bool arrays."""
    score_list = _as_list(scores)
    if masks is None:
        mask_list: list[np.ndarray | None] = [None] * len(score_list)
    elif isinstance(masks, np.ndarray):
        mask_list = [masks]
    else:
        mask_list = [None if m is None else np.asarray(m) for m in masks]
    if len(score_list) != len(mask_list):
        raise InputError(f"Got {len(score_list)} score maps but {len(mask_list)} masks; pass one mask (or None) per map.")
    flat_scores, flat_labels = [], []
    for i, (s, m) in enumerate(zip(score_list, mask_list)):
        s = np.asarray(s, dtype=np.float64).ravel()
        if m is None:
            lab = np.zeros(s.shape, dtype=bool)
        else:
            if m.size != s.size:
                raise InputError(f"Score map {i} has {s.size} values but its mask has {m.size}; they must have the same shape.")
            lab = np.asarray(m).ravel() != 0
        flat_scores.append(s)
        flat_labels.append(lab)
    if not flat_scores:
        return np.zeros(0), np.zeros(0, dtype=bool)
    scores_1d = np.concatenate(flat_scores)
    if not np.all(np.isfinite(scores_1d)):
        raise InputError("Scores contain NaN or infinite values; the model produced invalid anomaly scores.")
    return scores_1d, np.concatenate(flat_labels)


def _group_by_value(scores: np.ndarray, weights: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per distinct score value, in DESCENDING score order: the sum of each weight array."""
    _, inverse = np.unique(scores, return_inverse=True)
    n = int(inverse.max()) + 1 if inverse.size else 0
    return [np.bincount(inverse, weights=w, minlength=n)[::-1] for w in weights]


# ---------------------------------------------------------------------------------------------
# Exact metrics (everything in memory)


def pixel_auroc(scores: ArrayOrList, masks: ArrayOrList | None) -> float:
    """Exact AUROC over all pixels of all maps (ties count one half); NaN + warning if one class only."""
    return _exact_auroc(*_flatten_pairs(scores, masks))


def _exact_auroc(s: np.ndarray, y: np.ndarray) -> float:
    """scikit-learn's ROC AUC (ties count one half); NaN + warning with one class only."""
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0 or n_pos == y.size:
        return undefined("AUROC is undefined when only one class is present (all pixels normal or all anomalous); returning NaN.")
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s))


def _exact_aupr(s: np.ndarray, y: np.ndarray) -> float:
    """scikit-learn's average precision; NaN + warning without anomalous samples (scikit-learn would say 0)."""
    if not np.any(y):
        return undefined("AUPR is undefined without anomalous pixels; returning NaN.")
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(y, s))


def pixel_aupr(scores: ArrayOrList, masks: ArrayOrList | None) -> float:
    """Exact average precision over all pixels of all maps; NaN + warning without anomalous pixels."""
    return _exact_aupr(*_flatten_pairs(scores, masks))


def _image_arrays(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel()
    if s.size != y.size:
        raise InputError(f"Got {s.size} image scores but {y.size} labels; pass one label per image.")
    if not np.all(np.isfinite(s)):
        raise InputError("Image scores contain NaN or infinite values; the model produced invalid anomaly scores.")
    return s, y != 0


def image_auroc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """AUROC of image-level scores against labels (1 = anomalous)."""
    return _exact_auroc(*_image_arrays(scores, labels))


def image_aupr(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Average precision of image-level scores against labels (1 = anomalous)."""
    return _exact_aupr(*_image_arrays(scores, labels))


def threshold_at_fpr(normal_scores: ArrayOrList, fpr: float) -> float:
    """The threshold of :func:`normdino.thresholds.thresholds_at_fprs` for one FPR."""
    return float(thresholds_at_fprs(normal_scores, [fpr])[0])


def dice(pred: ArrayOrList, mask: ArrayOrList) -> float:
    """Dice pooled over all pixels of all images: 2 TP / (2 TP + FP + FN); NaN + warning if both are empty."""
    preds, masks = _as_list(pred), _as_list(mask)
    if len(preds) != len(masks):
        raise InputError(f"Got {len(preds)} predictions but {len(masks)} masks; pass one mask per prediction.")
    tp = fp = fn = 0
    for i, (p, m) in enumerate(zip(preds, masks)):
        if p.size != m.size:
            raise InputError(f"Prediction {i} has {p.size} pixels but its mask has {m.size}; they must have the same shape.")
        p, m = p.ravel() != 0, m.ravel() != 0
        tp += int(np.count_nonzero(p & m))
        fp += int(np.count_nonzero(p & ~m))
        fn += int(np.count_nonzero(~p & m))
    return dice_from_counts(tp, fp, fn)


def aupro(score_maps: ArrayOrList, masks: ArrayOrList, fpr_limit: float = 0.3) -> float:
    """Exact normalised area under the per-region-overlap curve up to ``fpr_limit`` (MVTec AD definition).

    Regions are the 8-connected components (full connectivity in nD) of each mask; PRO is the mean over
    all regions of the fraction of the region above the threshold; FPR is over all normal pixels.
    """
    score_list, mask_list = _as_list(score_maps), _as_list(masks)
    if len(score_list) != len(mask_list):
        raise InputError(f"Got {len(score_list)} score maps but {len(mask_list)} masks; pass one mask per map.")
    weights, n_regions = [], 0
    for i, (s, m) in enumerate(zip(score_list, mask_list)):
        if s.size != m.size:
            raise InputError(f"Score map {i} has {s.size} values but its mask has {m.size}; they must have the same shape.")
        w, n = region_weights(np.asarray(m).reshape(s.shape))
        weights.append(w)
        n_regions += n
    s, y = _flatten_pairs(score_list, mask_list)
    neg, region_weight = _group_by_value(s, [(~y).astype(np.float64), np.concatenate(weights) if weights else np.zeros(0)])
    return aupro_from_counts(neg, region_weight, n_regions, fpr_limit)
