"""Pixel metrics over any number of images in bounded memory: :class:`PixelScoreAccumulator`, a float32
histogram at a fixed relative resolution (see its docstring), and the order-preserving float keys it bins by.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from normdino.errors import InputError
from normdino.evaluation.curves import (aupr_from_counts, aupro_from_counts, auroc_from_counts, dice_from_counts,
                                        pr_from_counts, region_weights, roc_from_counts, undefined)

_BLOCK_BITS = 12  # bins are allocated lazily in blocks of 4096 (64 KiB of counts)


def float_keys(values: np.ndarray) -> np.ndarray:
    """Order-preserving map float32 -> uint32 (a < b  <=>  key(a) < key(b); -0.0 folded onto +0.0); the per-image
    statistics share it."""
    f = np.ascontiguousarray(values, dtype=np.float32).ravel() + np.float32(0.0)
    u = f.view(np.uint32)
    return np.where(u >= np.uint32(0x80000000), ~u, u | np.uint32(0x80000000))


def keys_to_float(keys: np.ndarray) -> np.ndarray:
    """Inverse of :func:`float_keys` (as float64)."""
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
                weights, n = region_weights(mask.reshape(scores.shape))
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
        bins = float_keys(scores) >> self._shift
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
        return keys_to_float((ids.astype(np.uint64) << np.uint64(self._shift)).astype(np.uint32))

    def _bin_upper(self, ids: np.ndarray) -> np.ndarray:
        top = ((ids.astype(np.uint64) + 1) << np.uint64(self._shift)) - 1
        return keys_to_float(top.astype(np.uint32))

    def _bin_of(self, value: float) -> int:
        return int(float_keys(np.array([value]))[0] >> self._shift)

    # -- metrics -----------------------------------------------------------------------------

    def auroc(self) -> float:
        """Pixel AUROC over everything added (bin-level ties count one half)."""
        _, neg, pos, _ = self._bins()
        return auroc_from_counts(neg[::-1], pos[::-1])

    def aupr(self) -> float:
        """Pixel average precision over everything added."""
        _, neg, pos, _ = self._bins()
        return aupr_from_counts(neg[::-1], pos[::-1])

    def aupro(self, fpr_limit: float = 0.3) -> float:
        """Streamed AUPRO up to ``fpr_limit``; needs ``track_regions=True``."""
        if not self.track_regions:
            raise InputError("AUPRO needs the accumulator to be built with track_regions=True.")
        _, neg, _, weight = self._bins()
        return aupro_from_counts(neg[::-1], weight[::-1], self.n_regions_, fpr_limit)

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
            undefined("The ROC curve is undefined when only one class is present; returning empty arrays.")
            return np.zeros(0), np.zeros(0), np.zeros(0)
        fpr, tpr = roc_from_counts(neg[::-1], pos[::-1])
        thresholds = np.concatenate([[np.inf], self._bin_lower(ids[::-1])])
        keep = _downsample(fpr, tpr, max_points)
        return fpr[keep], tpr[keep], thresholds[keep]

    def pr_curve(self, max_points: int = 1000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(precision, recall, thresholds) downsampled for plotting, highest threshold first."""
        ids, neg, pos, _ = self._bins()
        if self.n_anomalous_ == 0:
            undefined("The PR curve is undefined without anomalous pixels; returning empty arrays.")
            return np.zeros(0), np.zeros(0), np.zeros(0)
        precision, recall = pr_from_counts(neg[::-1], pos[::-1])
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
        return dice_from_counts(*self.confusion_at(threshold))

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
