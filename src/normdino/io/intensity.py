"""Intensity rules: how a volume's real voxel values become [0, 1] pixel values.

"percentile" clips to the volume's own percentiles (MRI), "window" to a fixed LOW,HIGH (e.g. Hounsfield
units for CT), "dtype" divides by the largest value of an unsigned type (uint8 -> /255, like an 8-bit
PNG), "none" keeps raw values. The per-volume statistics behind "percentile" live on
:class:`normdino.io.volumes.Volume`.
"""

from __future__ import annotations

import numpy as np

from normdino.errors import InputError

NORMALIZATIONS = ("percentile", "window", "dtype", "none")


def parse_window(text: str) -> tuple[float, float]:
    """Parse an intensity window "LOW,HIGH" (e.g. "-200,250" Hounsfield units)."""
    parts = str(text).replace(" ", "").split(",")
    try:
        low, high = (float(p) for p in parts)
    except ValueError as err:
        raise InputError(f"--window {text!r} is not LOW,HIGH: write two numbers, e.g. -200,250.") from err
    if not low < high:
        raise InputError(f"--window {text!r} needs LOW < HIGH, e.g. -200,250.")
    return low, high


def normalise(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip to [low, high] and scale to [0, 1] in float32 (all zeros when high <= low); NaN -> 0."""
    if not high > low:
        return np.zeros(values.shape, dtype=np.float32)
    out = values.astype(np.float32)  # divide (not multiply by the inverse): uint8 / 255 equals an 8-bit PNG's values
    out -= np.float32(low)
    out /= np.float32(high - low)
    np.clip(out, 0.0, 1.0, out=out)
    np.nan_to_num(out, copy=False, nan=0.0)
    return out
