"""Curve maths from per-threshold counts, shared by the exact metrics (:mod:`normdino.evaluation.metrics`) and
the streaming accumulator (:mod:`normdino.evaluation.accumulator`): ROC, precision-recall, AUPRO, Dice.

Inputs are per-threshold-group counts in DESCENDING score order. An undefined metric (AUROC with one class,
AUPR or AUPRO without anomalous pixels, Dice of two empty sets) is NaN with a :class:`MetricUndefinedWarning`.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import ndimage

from normdino.errors import InputError


class MetricUndefinedWarning(RuntimeWarning):
    """A metric is undefined for these labels (e.g. AUROC with one class); NaN was returned."""


def undefined(message: str) -> float:
    warnings.warn(message, MetricUndefinedWarning, stacklevel=3)
    return math.nan


def trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) * 0.5))


def roc_from_counts(neg: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) with a leading (0, 0), one point per threshold group."""
    fp = np.concatenate([[0.0], np.cumsum(neg, dtype=np.float64)])
    tp = np.concatenate([[0.0], np.cumsum(pos, dtype=np.float64)])
    return fp / fp[-1], tp / tp[-1]


def auroc_from_counts(neg: np.ndarray, pos: np.ndarray) -> float:
    n_neg, n_pos = float(np.sum(neg)), float(np.sum(pos))
    if n_neg == 0 or n_pos == 0:
        return undefined("AUROC is undefined when only one class is present (all pixels normal or all anomalous); returning NaN.")
    fpr, tpr = roc_from_counts(neg, pos)
    return trapezoid(tpr, fpr)


def pr_from_counts(neg: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(precision, recall) per threshold group, highest threshold first."""
    tp = np.cumsum(pos, dtype=np.float64)
    fp = np.cumsum(neg, dtype=np.float64)
    predicted = tp + fp
    precision = np.divide(tp, predicted, out=np.ones_like(tp), where=predicted > 0)
    return precision, tp / tp[-1]


def aupr_from_counts(neg: np.ndarray, pos: np.ndarray) -> float:
    if float(np.sum(pos)) == 0:
        return undefined("AUPR is undefined without anomalous pixels; returning NaN.")
    precision, recall = pr_from_counts(neg, pos)
    return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))


def aupro_from_counts(neg: np.ndarray, region_weight: np.ndarray, n_regions: int, fpr_limit: float) -> float:
    """Normalised area under PRO(FPR) up to fpr_limit; region_weight sums 1/|region| per group."""
    if not 0 < fpr_limit <= 1:
        raise InputError(f"fpr_limit must be in (0, 1], got {fpr_limit}.")
    n_neg = float(np.sum(neg))
    if n_regions == 0 or n_neg == 0:
        return undefined("AUPRO is undefined without anomalous regions or without normal pixels; returning NaN.")
    fpr = np.concatenate([[0.0], np.cumsum(neg, dtype=np.float64) / n_neg])
    pro = np.concatenate([[0.0], np.cumsum(region_weight, dtype=np.float64) / n_regions])
    end = int(np.searchsorted(fpr, fpr_limit, side="right"))  # fpr[:end] <= limit
    x, y = fpr[:end], pro[:end]
    if end < fpr.size and x[-1] < fpr_limit:
        x0, x1, y0, y1 = fpr[end - 1], fpr[end], pro[end - 1], pro[end]
        y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        x, y = np.append(x, fpr_limit), np.append(y, y_lim)
    return trapezoid(y, x) / fpr_limit


def region_weights(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Per pixel 1/|connected region| (0 on normal pixels) and the region count; 8-connectivity in 2D."""
    binary = np.asarray(mask) != 0
    structure = ndimage.generate_binary_structure(binary.ndim, binary.ndim)
    labels, n = ndimage.label(binary, structure=structure)
    if n == 0:
        return np.zeros(binary.size), 0
    sizes = np.bincount(labels.ravel())
    inverse_size = np.zeros(sizes.size)
    inverse_size[1:] = 1.0 / sizes[1:]
    return inverse_size[labels.ravel()], int(n)


def dice_from_counts(tp: int, fp: int, fn: int) -> float:
    """Dice of pooled counts; undefined (NaN) without anomalous pixels in the masks, where it could only be 0 or
    0/0 and says nothing about finding lesions."""
    if tp + fn == 0:
        return undefined("Dice is undefined without anomalous pixels in the masks; returning NaN.")
    return 2.0 * tp / (2 * tp + fp + fn)
