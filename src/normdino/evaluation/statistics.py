"""Statistics a reviewer asks for: bootstrap confidence intervals over images and paired permutation tests.

Per-image sufficient statistics (:class:`ImageStatistics`) make resampling cheap and bounded in memory:
for every image it keeps

* a sparse histogram of its pixel scores: the occupied bins of a float32 key that keeps sign, exponent and
  the top ``mantissa_bits`` (8) mantissa bits (relative bin width 2**-8 ≈ 0.4 %), with the normal and the
  anomalous pixel count of each bin;
* its confusion counts (TP, FP, FN) at its own thresholds (set FPRs), exact;
* its image score and label.

Memory is at most 12 bytes × (occupied bins) per image, and the occupied bins of one image are at most
min(its pixel count, 256 per octave of score range): a 256×256 cosine-distance map spanning seven octaves
keeps ≤ 1 792 bins (≤ 21 KiB); 1 000 images stay ≤ 21 MiB, whatever the image size. No pixel is stored.

A bootstrap resample is a vector of per-image multiplicities; its histogram is that vector times the
(images × bins) sparse matrix, so every resample's AUROC/AUPR, pooled Dice and image AUROC come from
matrix products in chunks (never more than ``chunk`` × bins counts at once). Resampling is stratified by
image label (normal and anomalous images are resampled separately), so every resample has both classes.
Thresholds stay those of the point estimate: the interval is conditional on the calibration.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import sparse

from normdino.errors import InputError
from normdino.evaluation.accumulator import float_keys

log = logging.getLogger(__name__)

__all__ = ["ImageStatistics", "bootstrap_weights", "curve_metrics", "confidence_interval",
           "paired_permutation_test", "PermutationResult", "few_shot_summary", "CI_LEVEL"]

CI_LEVEL = 0.95


class ImageStatistics:
    """Per-image sufficient statistics of score maps: sparse coarse histograms, confusion counts, image scores."""

    def __init__(self, n_thresholds: int, mantissa_bits: int = 8) -> None:
        if not 2 <= mantissa_bits <= 16:
            raise InputError(f"mantissa_bits must be between 2 and 16, got {mantissa_bits}.")
        self.n_thresholds = n_thresholds
        self.shift = np.uint32(23 - mantissa_bits)
        self.bins: list[np.ndarray] = []  # per image: occupied bin ids (uint32, ascending)
        self.counts: list[np.ndarray] = []  # per image: (2, bins) uint32 normal, anomalous
        self.confusion: list[np.ndarray] = []  # per image: (n_thresholds, 3) int64 TP, FP, FN
        self.scores: list[float] = []
        self.labels: list[int] = []

    def __len__(self) -> int:
        return len(self.labels)

    def add(self, scores: np.ndarray, mask: np.ndarray | None, thresholds: Sequence[float], image_score: float,
            label: int) -> None:
        """One image: its pixel scores, mask (None = all normal), its thresholds, image score and label."""
        flat = np.asarray(scores, dtype=np.float32).ravel()
        truth = np.zeros(flat.size, bool) if mask is None else np.asarray(mask).ravel() != 0
        if truth.size != flat.size:
            raise InputError(f"image {len(self)}: {flat.size} scores but {truth.size} mask pixels")
        if len(thresholds) != self.n_thresholds:
            raise InputError(f"image {len(self)}: {len(thresholds)} thresholds, expected {self.n_thresholds}")
        keys = float_keys(flat) >> self.shift
        ids, inverse = np.unique(keys, return_inverse=True)
        counts = np.zeros((2, ids.size), np.uint32)
        np.add.at(counts, (truth.astype(np.intp), inverse), 1)
        confusion = np.zeros((self.n_thresholds, 3), np.int64)
        positives = int(truth.sum())
        for i, t in enumerate(thresholds):
            above = flat > t
            tp = int(np.count_nonzero(above & truth))
            confusion[i] = (tp, int(np.count_nonzero(above)) - tp, positives - tp)
        self.bins.append(ids.astype(np.uint32))
        self.counts.append(counts)
        self.confusion.append(confusion)
        self.scores.append(float(image_score))
        self.labels.append(int(label))

    def extend(self, other: "ImageStatistics") -> "ImageStatistics":
        """Append ``other``'s images after this one's (e.g. torchrun ranks' shares in rank order = input order)."""
        if (other.n_thresholds, other.shift) != (self.n_thresholds, self.shift):
            raise InputError("image statistics with different thresholds or resolution cannot be joined")
        for mine, theirs in ((self.bins, other.bins), (self.counts, other.counts), (self.confusion, other.confusion),
                             (self.scores, other.scores), (self.labels, other.labels)):
            mine.extend(theirs)
        return self

    @property
    def nbytes(self) -> int:
        """Bytes held by the per-image statistics (the bound stated in the module docstring)."""
        return sum(b.nbytes + c.nbytes + f.nbytes for b, c, f in zip(self.bins, self.counts, self.confusion))

    # ------------------------------------------------------------------ matrices

    def histogram_matrices(self) -> tuple[sparse.csr_matrix, sparse.csr_matrix]:
        """(normal, anomalous) sparse (images × global bins) count matrices, bins in ascending score order."""
        if not self.bins:
            raise InputError("no images were added")
        all_ids = np.unique(np.concatenate(self.bins))
        rows = np.concatenate([np.full(b.size, i) for i, b in enumerate(self.bins)])
        cols = np.searchsorted(all_ids, np.concatenate(self.bins))
        shape = (len(self.bins), all_ids.size)
        normal = sparse.csr_matrix((np.concatenate([c[0] for c in self.counts]).astype(np.float64), (rows, cols)), shape)
        anomalous = sparse.csr_matrix((np.concatenate([c[1] for c in self.counts]).astype(np.float64), (rows, cols)), shape)
        return normal, anomalous

    def per_image_pixel_metrics(self) -> tuple[np.ndarray, np.ndarray]:
        """(pixel AUROC, pixel AUPR) of each image on its own (NaN where an image lacks a class)."""
        auroc, aupr = np.full(len(self), np.nan), np.full(len(self), np.nan)
        for i, counts in enumerate(self.counts):
            if counts[0].sum() and counts[1].sum():
                a, p = curve_metrics(counts[0][None].astype(np.float64), counts[1][None].astype(np.float64))
                auroc[i], aupr[i] = a[0], p[0]
        return auroc, aupr

    # ------------------------------------------------------------------ bootstrap

    def bootstrap(self, n_resamples: int, seed: int = 0, level: float = CI_LEVEL,
                  chunk: int = 64) -> dict[str, tuple[float, float]]:
        """Percentile intervals of pixel AUROC/AUPR, Dice at each threshold and image AUROC over resampled images.

        Keys: ``pixel_auroc``, ``pixel_aupr``, ``dice_<i>`` (i = threshold index), ``image_auroc``.
        """
        if n_resamples <= 0:
            return {}
        weights = bootstrap_weights(self.labels, n_resamples, seed)
        normal, anomalous = self.histogram_matrices()
        confusion = np.stack(self.confusion).astype(np.float64)  # (n, T, 3)
        labels = np.asarray(self.labels)
        image_ids, image_inverse = np.unique(np.asarray(self.scores, np.float64), return_inverse=True)
        onehot = sparse.csr_matrix((np.ones(len(self)), (np.arange(len(self)), image_inverse)), (len(self), image_ids.size))
        image_neg, image_pos = onehot.multiply((labels == 0)[:, None]).tocsr(), onehot.multiply((labels == 1)[:, None]).tocsr()
        values: dict[str, list[np.ndarray]] = {"pixel_auroc": [], "pixel_aupr": [], "image_auroc": []}
        for t in range(self.n_thresholds):
            values[f"dice_{t}"] = []
        for start in range(0, n_resamples, chunk):
            w = weights[start:start + chunk].astype(np.float64)
            auroc, aupr = curve_metrics(np.asarray((normal.T @ w.T).T), np.asarray((anomalous.T @ w.T).T))
            values["pixel_auroc"].append(auroc)
            values["pixel_aupr"].append(aupr)
            values["image_auroc"].append(curve_metrics(np.asarray((image_neg.T @ w.T).T),
                                                       np.asarray((image_pos.T @ w.T).T))[0])
            pooled = np.einsum("bn,ntk->btk", w, confusion)
            for t in range(self.n_thresholds):
                tp, fp, fn = pooled[:, t, 0], pooled[:, t, 1], pooled[:, t, 2]
                denominator = 2 * tp + fp + fn
                values[f"dice_{t}"].append(np.divide(2 * tp, denominator, out=np.full(tp.shape, np.nan),
                                                     where=denominator > 0))
        return {key: confidence_interval(np.concatenate(v), level) for key, v in values.items()}


def bootstrap_weights(labels: Sequence[int], n_resamples: int, seed: int = 0) -> np.ndarray:
    """(n_resamples, n_images) int32 multiplicities of a label-stratified bootstrap (seeded, reproducible).

    Row b is what resample b draws: for each label, as many images as it has, with replacement, among the
    images of that label, drawn with ``numpy.random.default_rng(seed)`` label by label in ascending order.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    weights = np.zeros((n_resamples, labels.size), np.int32)
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        draws = rng.integers(0, members.size, size=(n_resamples, members.size))
        for b in range(n_resamples):
            weights[b, members] += np.bincount(draws[b], minlength=members.size).astype(np.int32)
    return weights


def curve_metrics(normal: np.ndarray, anomalous: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise (AUROC, average precision) of counts per tied score group in ASCENDING score order; NaN if undefined.

    The same definitions as :mod:`normdino.evaluation.metrics` (ties count one half; AP = Σ ΔR·P).
    """
    neg = np.cumsum(normal[:, ::-1], axis=1)
    pos = np.cumsum(anomalous[:, ::-1], axis=1)
    n_neg, n_pos = neg[:, -1:], pos[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        fpr = np.concatenate([np.zeros_like(n_neg), neg], axis=1) / n_neg
        tpr = np.concatenate([np.zeros_like(n_pos), pos], axis=1) / n_pos
        auroc = np.sum(np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) * 0.5, axis=1)
        predicted = neg + pos
        precision = np.where(predicted > 0, pos / np.where(predicted > 0, predicted, 1), 1.0)
        recall = tpr
        aupr = np.sum(np.diff(recall, axis=1) * precision, axis=1)
    undefined = (n_neg[:, 0] == 0) | (n_pos[:, 0] == 0)
    auroc[undefined] = np.nan
    aupr[n_pos[:, 0] == 0] = np.nan
    return auroc, aupr


def confidence_interval(values: np.ndarray, level: float = CI_LEVEL) -> tuple[float, float]:
    """Percentile interval of the finite resampled values (NaN, NaN when there are none)."""
    finite = np.asarray(values, np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return (math.nan, math.nan)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return (float(low), float(high))


@dataclass(frozen=True)
class PermutationResult:
    """A paired permutation test: mean difference a − b, two-sided p-value, how many pairs and permutations."""

    statistic: float
    p_value: float
    n_pairs: int
    n_permutations: int


def paired_permutation_test(a: Sequence[float], b: Sequence[float], n_permutations: int = 10_000,
                            seed: int = 0) -> PermutationResult:
    """Two-sided paired permutation (sign-flip) test of mean(a − b) = 0 over the pairs where both are finite.

    Each permutation flips the sign of every difference with probability ½ (swapping the two methods on that
    image); p = (1 + #{|mean of flipped| ≥ |observed|}) / (1 + n_permutations), so identical methods give p = 1.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise InputError(f"a paired test needs one value of each method per image, got {a.size} and {b.size}")
    if n_permutations < 1:
        raise InputError(f"the number of permutations must be at least 1, got {n_permutations}")
    keep = np.isfinite(a) & np.isfinite(b)
    d = a[keep] - b[keep]
    if d.size == 0:
        return PermutationResult(math.nan, math.nan, 0, n_permutations)
    observed = abs(float(d.mean()))
    rng = np.random.default_rng(seed)
    exceed = 0
    for start in range(0, n_permutations, 1024):
        signs = rng.integers(0, 2, size=(min(1024, n_permutations - start), d.size)) * 2 - 1
        exceed += int(np.count_nonzero(np.abs(signs @ d) / d.size >= observed - 1e-12))
    return PermutationResult(float(d.mean()), (1 + exceed) / (1 + n_permutations), int(d.size), n_permutations)


def few_shot_summary(values: Sequence[float]) -> dict[str, float]:
    """max / mean / min over seeds (NaN values ignored), as the paper reports few-shot baselines."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"max": math.nan, "mean": math.nan, "min": math.nan}
    return {"max": float(v.max()), "mean": float(v.mean()), "min": float(v.min())}
