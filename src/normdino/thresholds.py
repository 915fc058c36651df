"""Thresholds at set false-positive rates from healthy scores: the one rule calibration (the detector, every
rank of a torchrun job) and evaluation share. Pure numpy, at the bottom of the package.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import numpy as np

from normdino.errors import InputError

ArrayOrList = Union[np.ndarray, Sequence[np.ndarray]]


def thresholds_at_fprs(normal_scores: ArrayOrList, fprs: Sequence[float] | np.ndarray) -> np.ndarray:
    """For each FPR, the threshold t with at most that fraction of the healthy scores strictly above t, as many as allowed.

    t is the (k+1)-th largest healthy score with k = floor(fpr · n), so "score > t" flags at most k of them.
    One sort serves every FPR. ``normal_scores``: one array or a list of arrays (e.g. one per image).
    """
    fprs = np.atleast_1d(np.asarray(fprs, dtype=np.float64))
    if np.any((fprs < 0) | (fprs >= 1)):
        raise InputError(f"fpr must be in [0, 1), got {fprs.tolist()}.")
    arrays = [normal_scores] if isinstance(normal_scores, np.ndarray) else list(normal_scores)
    s = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])
    if s.size == 0:
        raise InputError("No healthy validation scores were given; a threshold at a set FPR needs healthy images.")
    if not np.all(np.isfinite(s)):
        raise InputError("Healthy validation scores contain NaN or infinite values.")
    k = np.minimum(np.floor(fprs * s.size * (1 + 1e-12)).astype(np.int64), s.size - 1)
    positions = s.size - 1 - k
    if positions.size == 1:  # linear time for a single threshold
        return np.partition(s, positions[0])[positions]
    return np.sort(s)[positions]
