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
benchmark use :class:`PixelScoreAccumulator`, which streams images into a fixed-resolution histogram.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from typing import Union

import numpy as np
from scipy import ndimage

from normdino.errors import InputError
from normdino.thresholds import thresholds_at_fprs

logger = logging.getLogger(__name__)

ArrayOrList = Union[np.ndarray, Sequence[np.ndarray]]

__all__ = [
    "MetricUndefinedWarning",
    "PixelScoreAccumulator",
    "pixel_auroc",
    "pixel_aupr",
    "image_auroc",
    "image_aupr",
    "threshold_at_fpr",
    "dice",
    "aupro",
]


class MetricUndefinedWarning(RuntimeWarning):
    """A metric is undefined for these labels (e.g. AUROC with one class); NaN was returned."""


def _undefined(message: str) -> float:
    warnings.warn(message, MetricUndefinedWarning, stacklevel=3)
    return math.nan


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
# Curve maths shared by the exact functions and the streaming accumulator.
# Inputs are per-threshold-group counts in DESCENDING score order.


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) * 0.5))


def _roc_from_counts(neg: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) with a leading (0, 0), one point per threshold group."""
    fp = np.concatenate([[0.0], np.cumsum(neg, dtype=np.float64)])
    tp = np.concatenate([[0.0], np.cumsum(pos, dtype=np.float64)])
    return fp / fp[-1], tp / tp[-1]


def _auroc_from_counts(neg: np.ndarray, pos: np.ndarray) -> float:
    n_neg, n_pos = float(np.sum(neg)), float(np.sum(pos))
    if n_neg == 0 or n_pos == 0:
        return _undefined("AUROC is undefined when only one class is present (all pixels normal or all anomalous); returning NaN.")
    fpr, tpr = _roc_from_counts(neg, pos)
    return _trapezoid(tpr, fpr)


def _pr_from_counts(neg: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(precision, recall) per threshold group, highest threshold first."""
    tp = np.cumsum(pos, dtype=np.float64)
    fp = np.cumsum(neg, dtype=np.float64)
    predicted = tp + fp
    precision = np.divide(tp, predicted, out=np.ones_like(tp), where=predicted > 0)
    return precision, tp / tp[-1]


def _aupr_from_counts(neg: np.ndarray, pos: np.ndarray) -> float:
    if float(np.sum(pos)) == 0:
        return _undefined("AUPR is undefined without anomalous pixels; returning NaN.")
    precision, recall = _pr_from_counts(neg, pos)
    return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))


def _aupro_from_counts(neg: np.ndarray, region_weight: np.ndarray, n_regions: int, fpr_limit: float) -> float:
    """Normalised area under PRO(FPR) up to fpr_limit; region_weight sums 1/|region| per group."""
    if not 0 < fpr_limit <= 1:
        raise InputError(f"fpr_limit must be in (0, 1], got {fpr_limit}.")
    n_neg = float(np.sum(neg))
    if n_regions == 0 or n_neg == 0:
        return _undefined("AUPRO is undefined without anomalous regions or without normal pixels; returning NaN.")
    fpr = np.concatenate([[0.0], np.cumsum(neg, dtype=np.float64) / n_neg])
    pro = np.concatenate([[0.0], np.cumsum(region_weight, dtype=np.float64) / n_regions])
    end = int(np.searchsorted(fpr, fpr_limit, side="right"))  # fpr[:end] <= limit
    x, y = fpr[:end], pro[:end]
    if end < fpr.size and x[-1] < fpr_limit:
        x0, x1, y0, y1 = fpr[end - 1], fpr[end], pro[end - 1], pro[end]
        y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        x, y = np.append(x, fpr_limit), np.append(y, y_lim)
    return _trapezoid(y, x) / fpr_limit


def _region_weights(mask: np.ndarray) -> tuple[np.ndarray, int]:
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


# ---------------------------------------------------------------------------------------------
# Exact metrics (everything in memory)


def pixel_auroc(scores: ArrayOrList, masks: ArrayOrList | None) -> float:
    """Exact AUROC over all pixels of all maps (ties count one half); NaN + warning if one class only."""
    return _exact_auroc(*_flatten_pairs(scores, masks))


def _exact_auroc(s: np.ndarray, y: np.ndarray) -> float:
    """scikit-learn's ROC AUC (ties count one half); NaN + warning with one class only."""
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0 or n_pos == y.size:
        return _undefined("AUROC is undefined when only one class is present (all pixels normal or all anomalous); returning NaN.")
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s))


def _exact_aupr(s: np.ndarray, y: np.ndarray) -> float:
    """scikit-learn's average precision; NaN + warning without anomalous samples (scikit-learn would say 0)."""
    if not np.any(y):
        return _undefined("AUPR is undefined without anomalous pixels; returning NaN.")
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
    return _dice_from_counts(tp, fp, fn)


def _dice_from_counts(tp: int, fp: int, fn: int) -> float:
    """Dice of pooled counts; undefined (NaN) without anomalous pixels in the masks, where it could only be 0 or
    0/0 and says nothing about finding lesions."""
    if tp + fn == 0:
        return _undefined("Dice is undefined without anomalous pixels in the masks; returning NaN.")
    return 2.0 * tp / (2 * tp + fp + fn)


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
        w, n = _region_weights(np.asarray(m).reshape(s.shape))
        weights.append(w)
        n_regions += n
    s, y = _flatten_pairs(score_list, mask_list)
    neg, region_weight = _group_by_value(s, [(~y).astype(np.float64), np.concatenate(weights) if weights else np.zeros(0)])
    return _aupro_from_counts(neg, region_weight, n_regions, fpr_limit)


# ---------------------------------------------------------------------------------------------
# Streaming accumulator

_BLOCK_BITS = 12  # bins are allocated lazily in blocks of 4096 (64 KiB of counts)


def _float_keys(values: np.ndarray) -> np.ndarray:
    """Order-preserving map float32 -> uint32 (a < b  <=>  key(a) < key(b); -0.0 folded onto +0.0)."""
    f = np.ascontiguousarray(values, dtype=np.float32).ravel() + np.float32(0.0)
    u = f.view(np.uint32)
    return np.where(u >= np.uint32(0x80000000), ~u, u | np.uint32(0x80000000))


def float_keys(values: np.ndarray) -> np.ndarray:
    """Public name of the order-preserving float32 -> uint32 map (shared with the per-image statistics)."""
    return _float_keys(values)


def keys_to_float(keys: np.ndarray) -> np.ndarray:
    """Inverse of :func:`float_keys` (as float64)."""
    return _keys_to_float(keys)


def _keys_to_float(keys: np.ndarray) -> np.ndarray:
    keys = np.asarray(keys, dtype=np.uint32)
    u = np.where(keys >= np.uint32(0x80000000), keys & np.uint32(0x7FFFFFFF), ~keys)
    return u.astype(np.uint32).view(np.float32).astype(np.float64)


class PixelScoreAccumulator:
    """Pixel metrics over any number of images in bounded memory: a float32 histogram at fixed *relative* resolution.

    Design: each score is cast to float32 and its bit pattern mapped to an order-preserving integer; a bin
    keeps its sign, exponent and the top ``mantissa_bits`` mantissa bits, so every bin spans a relative width
    of 2**-mantissa_bits (1.5e-5 by default) whatever the range of the scores — no range is needed up front
    and outliers cost little. Bins are allocated lazily in blocks of 4096 (64 KiB), so memory is bounded by
    the spread of the scores (at most 2**(9+mantissa_bits) bins, in practice a few to a few tens of MiB),
    never by the pixel count; images are buffered up to ``flush_size`` pixels before binning.
    Metrics treat each bin as one tied threshold; ``auroc_error_bound()`` gives the largest possible
    difference to the exact AUROC of the float32 scores (≤ 1e-4 by a wide margin on score maps).

    Dice at thresholds given up front (``thresholds=``) is counted exactly while streaming; at other
    thresholds it is read from the histogram (exact when the threshold is a bin's upper value, as the ones
    returned by :meth:`threshold_at_fpr` are; otherwise pixels in the threshold's own bin count as below it).
    With ``track_regions=True`` it also streams AUPRO (regions labelled per image with scipy).
    """

    def __init__(
        self,
        thresholds: Sequence[float] = (),
        *,
        mantissa_bits: int = 16,
        track_regions: bool = False,
        flush_size: int = 1 << 20,
    ) -> None:
        if not 4 <= mantissa_bits <= 20:
            raise InputError(f"mantissa_bits must be between 4 and 20, got {mantissa_bits}.")
        self.thresholds = tuple(float(t) for t in thresholds)
        self.mantissa_bits = mantissa_bits
        self.track_regions = track_regions
        self.flush_size = flush_size
        self._shift = np.uint32(23 - mantissa_bits)
        self._block_bits = min(_BLOCK_BITS, mantissa_bits)
        self._block_size = 1 << self._block_bits
        self._n_blocks = 1 << (9 + mantissa_bits - self._block_bits)  # sign + 8 exponent bits + the rest of the mantissa
        self._counts: dict[int, np.ndarray] = {}  # block -> int64 (2, block_size): normal, anomalous
        self._weights: dict[int, np.ndarray] = {}  # block -> float64 (block_size,): Σ 1/|region|
        self._buffer: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
        self._buffered = 0
        self._binned: tuple[np.ndarray, ...] | None = None
        self.confusion_ = np.zeros((len(self.thresholds), 3), dtype=np.int64)  # TP, FP, FN per threshold
        self.n_images_ = 0
        self.n_normal_ = 0
        self.n_anomalous_ = 0
        self.n_regions_ = 0

    # -- streaming -------------------------------------------------------------------------

    def add(self, scores: np.ndarray, mask: np.ndarray | None = None) -> "PixelScoreAccumulator":
        """Add one image's score map (any shape) and its mask (same number of pixels; None = all normal)."""
        scores = np.asarray(scores)
        flat = scores.ravel()
        if not np.all(np.isfinite(flat)):
            raise InputError(f"Score map {self.n_images_} contains NaN or infinite values; the model produced invalid anomaly scores.")
        if mask is None:
            labels = np.zeros(flat.size, dtype=bool)
        else:
            mask = np.asarray(mask)
            if mask.size != flat.size:
                raise InputError(
                    f"Score map {self.n_images_} has shape {scores.shape} but its mask has shape {mask.shape}; "
                    "resize the score map to the mask before adding it."
                )
            labels = mask.ravel() != 0
        weights = None
        if self.track_regions:
            if mask is not None and labels.any():
                weights, n = _region_weights(mask.reshape(scores.shape))
                self.n_regions_ += n
            else:
                weights = np.zeros(flat.size)
        for i, t in enumerate(self.thresholds):
            above = flat > t
            tp = int(np.count_nonzero(above & labels))
            self.confusion_[i] += (tp, int(np.count_nonzero(above)) - tp, int(np.count_nonzero(labels)) - tp)
        n_anomalous = int(np.count_nonzero(labels))
        self.n_images_ += 1
        self.n_anomalous_ += n_anomalous
        self.n_normal_ += flat.size - n_anomalous
        self._buffer.append((flat.astype(np.float32), labels, weights))
        self._buffered += flat.size
        self._binned = None
        if self._buffered >= self.flush_size:
            self._flush()
        return self

    def _flush(self) -> None:
        if not self._buffer:
            return
        scores = np.concatenate([b[0] for b in self._buffer])
        labels = np.concatenate([b[1] for b in self._buffer])
        weights = np.concatenate([b[2] for b in self._buffer]) if self.track_regions else None
        self._buffer, self._buffered = [], 0
        bins = _float_keys(scores) >> self._shift
        self._bin_into(bins[~labels], channel=0, weights=None)
        self._bin_into(bins[labels], channel=1, weights=None if weights is None else weights[labels])

    def _bin_into(self, bins: np.ndarray, channel: int, weights: np.ndarray | None) -> None:
        if bins.size == 0:
            return
        blocks = bins >> np.uint32(self._block_bits)
        if self._n_blocks <= 1 << 16:
            blocks = blocks.astype(np.uint16)  # numpy's stable sort is a radix sort for 16-bit integers
        low = (bins & np.uint32(self._block_size - 1)).astype(np.intp)
        per_block = np.bincount(blocks, minlength=self._n_blocks)
        present = np.flatnonzero(per_block)
        if present.size > 1:
            order = np.argsort(blocks, kind="stable")
            low = low[order]
            if weights is not None:
                weights = weights[order]
        ends = np.cumsum(per_block[present])
        starts = ends - per_block[present]
        for block, start, end in zip(present.tolist(), starts.tolist(), ends.tolist()):
            counts = self._counts.get(block)
            if counts is None:
                counts = self._counts[block] = np.zeros((2, self._block_size), dtype=np.int64)
            counts[channel] += np.bincount(low[start:end], minlength=self._block_size)
            if weights is not None:
                acc = self._weights.get(block)
                if acc is None:
                    acc = self._weights[block] = np.zeros(self._block_size)
                acc += np.bincount(low[start:end], weights=weights[start:end], minlength=self._block_size)

    def _bins(self) -> tuple[np.ndarray, ...]:
        """Occupied bins in ASCENDING order: (bin ids, normal counts, anomalous counts, region weights)."""
        self._flush()
        if self._binned is None:
            ids, neg, pos, weights = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)], [np.zeros(0)]
            for block in sorted(self._counts):
                counts = self._counts[block]
                occupied = np.flatnonzero(counts[0] + counts[1])
                ids.append(occupied + (block << self._block_bits))
                neg.append(counts[0, occupied])
                pos.append(counts[1, occupied])
                if self.track_regions:
                    weights.append(self._weights.get(block, np.zeros(self._block_size))[occupied])
            ids_, neg_, pos_ = np.concatenate(ids), np.concatenate(neg), np.concatenate(pos)
            weights_ = np.concatenate(weights) if self.track_regions else np.zeros(ids_.size)
            self._binned = (ids_, neg_, pos_, weights_)
        return self._binned

    def _bin_lower(self, ids: np.ndarray) -> np.ndarray:
        return _keys_to_float((ids.astype(np.uint64) << np.uint64(self._shift)).astype(np.uint32))

    def _bin_upper(self, ids: np.ndarray) -> np.ndarray:
        top = ((ids.astype(np.uint64) + 1) << np.uint64(self._shift)) - 1
        return _keys_to_float(top.astype(np.uint32))

    def _bin_of(self, value: float) -> int:
        return int(_float_keys(np.array([value]))[0] >> self._shift)

    # -- metrics -----------------------------------------------------------------------------

    def auroc(self) -> float:
        """Pixel AUROC over everything added (bin-level ties count one half)."""
        _, neg, pos, _ = self._bins()
        return _auroc_from_counts(neg[::-1], pos[::-1])

    def aupr(self) -> float:
        """Pixel average precision over everything added."""
        _, neg, pos, _ = self._bins()
        return _aupr_from_counts(neg[::-1], pos[::-1])

    def aupro(self, fpr_limit: float = 0.3) -> float:
        """Streamed AUPRO up to ``fpr_limit``; needs ``track_regions=True``."""
        if not self.track_regions:
            raise InputError("AUPRO needs the accumulator to be built with track_regions=True.")
        _, neg, _, weight = self._bins()
        return _aupro_from_counts(neg[::-1], weight[::-1], self.n_regions_, fpr_limit)

    def auroc_error_bound(self) -> float:
        """Largest possible |histogram AUROC − exact AUROC of the float32 scores|: ½ Σ_bins n_normal · n_anomalous / (N_normal · N_anomalous)."""
        _, neg, pos, _ = self._bins()
        if self.n_normal_ == 0 or self.n_anomalous_ == 0:
            return math.nan
        return 0.5 * float(np.dot(neg.astype(np.float64), pos)) / (float(self.n_normal_) * float(self.n_anomalous_))

    def roc_curve(self, max_points: int = 1000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(fpr, tpr, thresholds) downsampled to about ``max_points`` for plotting; thresholds are bin lower values (first is +inf)."""
        ids, neg, pos, _ = self._bins()
        if self.n_normal_ == 0 or self.n_anomalous_ == 0:
            _undefined("The ROC curve is undefined when only one class is present; returning empty arrays.")
            return np.zeros(0), np.zeros(0), np.zeros(0)
        fpr, tpr = _roc_from_counts(neg[::-1], pos[::-1])
        thresholds = np.concatenate([[np.inf], self._bin_lower(ids[::-1])])
        keep = _downsample(fpr, tpr, max_points)
        return fpr[keep], tpr[keep], thresholds[keep]

    def pr_curve(self, max_points: int = 1000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(precision, recall, thresholds) downsampled for plotting, highest threshold first."""
        ids, neg, pos, _ = self._bins()
        if self.n_anomalous_ == 0:
            _undefined("The PR curve is undefined without anomalous pixels; returning empty arrays.")
            return np.zeros(0), np.zeros(0), np.zeros(0)
        precision, recall = _pr_from_counts(neg[::-1], pos[::-1])
        keep = _downsample(recall, precision, max_points)
        return precision[keep], recall[keep], self._bin_lower(ids[::-1])[keep]

    def histograms(
        self, n_bins: int = 100, value_range: tuple[float, float] | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(edges, normal counts, anomalous counts) on ``n_bins`` equal bins over ``value_range`` (default: all scores)."""
        ids, neg, pos, _ = self._bins()
        if ids.size == 0:
            return np.zeros(n_bins + 1), np.zeros(n_bins, dtype=np.int64), np.zeros(n_bins, dtype=np.int64)
        values = self._bin_lower(ids)
        if value_range is None:
            lo, hi = float(values[0]), float(self._bin_upper(ids[-1:])[0])
            value_range = (lo, hi if hi > lo else lo + 1.0)
        edges = np.linspace(value_range[0], value_range[1], n_bins + 1)
        normal, _ = np.histogram(values, bins=edges, weights=neg)
        anomalous, _ = np.histogram(values, bins=edges, weights=pos)
        return edges, normal.astype(np.int64), anomalous.astype(np.int64)

    def confusion_at(self, threshold: float) -> tuple[int, int, int]:
        """(TP, FP, FN) for "score > threshold": exact for thresholds given up front, else from the histogram."""
        for i, t in enumerate(self.thresholds):
            if t == threshold:
                tp, fp, fn = (int(v) for v in self.confusion_[i])
                return tp, fp, fn
        ids, neg, pos, _ = self._bins()
        above = self._bin_lower(ids) > threshold
        tp = int(pos[above].sum())
        fp = int(neg[above].sum())
        return tp, fp, self.n_anomalous_ - tp

    def dice_at(self, threshold: float) -> float:
        """Pooled Dice of "score > threshold" against the masks."""
        return _dice_from_counts(*self.confusion_at(threshold))

    def merge(self, other: "PixelScoreAccumulator") -> "PixelScoreAccumulator":
        """Add everything ``other`` has seen into this accumulator (e.g. the shares of several processes).

        Counts are integers, so the merged metrics equal those of one accumulator fed every image.
        Both must have the same thresholds, resolution and region tracking.
        """
        if (other.thresholds, other.mantissa_bits, other.track_regions) != (self.thresholds, self.mantissa_bits, self.track_regions):
            raise InputError("Accumulators with different thresholds, mantissa_bits or track_regions cannot be merged.")
        self._flush()
        other._flush()
        for block, counts in other._counts.items():
            mine = self._counts.get(block)
            self._counts[block] = counts.copy() if mine is None else mine + counts
        for block, weights in other._weights.items():
            mine = self._weights.get(block)
            self._weights[block] = weights.copy() if mine is None else mine + weights
        self.confusion_ = self.confusion_ + other.confusion_
        self.n_images_ += other.n_images_
        self.n_normal_ += other.n_normal_
        self.n_anomalous_ += other.n_anomalous_
        self.n_regions_ += other.n_regions_
        self._binned = None
        return self

    def threshold_at_fpr(self, fpr: float) -> float:
        """Smallest bin-upper-value t with at most ``fpr`` of the NORMAL pixels strictly above t (use on healthy images)."""
        if not 0 <= fpr < 1:
            raise InputError(f"fpr must be in [0, 1), got {fpr}.")
        ids, neg, _, _ = self._bins()
        if self.n_normal_ == 0:
            raise InputError("No normal pixels were added; a threshold at a set FPR needs healthy images.")
        allowed = math.floor(fpr * self.n_normal_ * (1 + 1e-12))
        above = np.concatenate([np.cumsum(neg[::-1])[::-1][1:], [0]])  # normal pixels in bins above each bin
        candidates = np.flatnonzero((above <= allowed) & (neg > 0))
        return float(self._bin_upper(ids[candidates[:1]])[0])


def _downsample(x: np.ndarray, y: np.ndarray, max_points: int) -> np.ndarray:
    """Indices of about max_points points spread evenly along the curve's length, ends included."""
    if x.size <= max_points:
        return np.arange(x.size)
    length = np.concatenate([[0.0], np.cumsum(np.abs(np.diff(x)) + np.abs(np.diff(y)))])
    targets = np.linspace(0.0, length[-1], max_points)
    idx = np.unique(np.clip(np.searchsorted(length, targets), 0, x.size - 1))
    return np.unique(np.concatenate([[0], idx, [x.size - 1]]))
