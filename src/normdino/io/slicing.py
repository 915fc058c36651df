"""Slice selection: which 2D slices a volume becomes, and the settings a model keeps to slice and scale alike.

:class:`SliceOptions` gathers the axis, slice range, foreground rule and intensity rule;
:func:`merge_slice_settings` decides how predict/evaluate slice volumes from a model's stored settings
and the user's; :func:`recorded_settings` is what a model stores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from normdino.errors import InputError
from normdino.io.intensity import NORMALIZATIONS, parse_window

AXIS_NAMES = ("axial", "coronal", "sagittal")


def parse_slice_range(text: str) -> slice:
    """Parse a slice range such as "60:100", ":100", "60:" or "60:100:2" (Python slice rules)."""
    parts = str(text).strip().split(":")
    if len(parts) not in (2, 3):
        raise InputError(f"--slices {text!r} is not a range: write START:STOP, e.g. 60:100.")
    try:
        values = [int(p) if p.strip() else None for p in parts]
    except ValueError as err:
        raise InputError(f"--slices {text!r} is not a range of integers: write START:STOP, e.g. 60:100.") from err
    if len(values) == 3 and values[2] == 0:
        raise InputError(f"--slices {text!r} has a step of 0: use a positive step.")
    return slice(*values)


@dataclass
class SliceOptions:
    """How a volume becomes 2D slices: axis, slice range, foreground rule, intensity normalisation.

    normalization: "percentile" clips to the volume's ``percentiles`` and scales to [0, 1] (MRI);
    "window" clips to ``window`` (e.g. HU for CT) and scales to [0, 1]; "dtype" divides by the
    largest value of an unsigned integer data type (uint8 -> /255, same values as 8-bit PNG
    slices); "none" keeps raw values.  Default: "window" when ``window`` is set, else "percentile".
    A pixel is foreground when its normalised value exceeds ``foreground_threshold`` ("none":
    that fraction of the volume's min..max range); slices with a smaller foreground fraction than
    ``min_foreground`` are skipped.  ``eight_bit`` rounds to multiples of 1/255 like an 8-bit export.
    ``fallback``: with "dtype", the normalization used (after a loud warning) for a volume whose voxels
    have no type range (signed, float or scaled); None refuses such a volume.
    """

    axis: str | int = "axial"
    slices: slice | None = None
    min_foreground: float = 0.0
    normalization: str | None = None
    percentiles: tuple[float, float] = (0.5, 99.5)
    window: tuple[float, float] | None = None
    volume_index: int | None = None
    foreground_threshold: float = 0.05
    eight_bit: bool = False
    fallback: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.slices, str):
            self.slices = parse_slice_range(self.slices)
        if isinstance(self.window, str):
            self.window = parse_window(self.window)
        if self.normalization is None:
            self.normalization = "window" if self.window is not None else "percentile"
        if self.normalization not in NORMALIZATIONS:
            raise InputError(f"Unknown normalization {self.normalization!r}: use one of {', '.join(NORMALIZATIONS)}.")
        if self.normalization == "window":
            if self.window is None:
                raise InputError("normalization 'window' needs a window, e.g. --window -200,250.")
            low, high = (float(v) for v in self.window)
            if not low < high:
                raise InputError(f"--window {self.window} needs LOW < HIGH, e.g. -200,250.")
            self.window = (low, high)
        elif self.window is not None:
            raise InputError(f"A window was given but normalization is {self.normalization!r}: drop one of them.")
        if self.fallback not in (None, "percentile"):
            raise InputError(f"fallback {self.fallback!r} must be None or 'percentile'.")
        low_p, high_p = (float(p) for p in self.percentiles)
        if not 0.0 <= low_p < high_p <= 100.0:
            raise InputError(f"percentiles {self.percentiles} must satisfy 0 <= low < high <= 100.")
        self.percentiles = (low_p, high_p)
        if not 0.0 <= self.min_foreground <= 1.0:
            raise InputError(f"min_foreground {self.min_foreground} must be a fraction between 0 and 1.")
        if not 0.0 <= self.foreground_threshold < 1.0:
            raise InputError(f"foreground_threshold {self.foreground_threshold} must be in [0, 1).")
        if self.volume_index is not None and self.volume_index < 0:
            raise InputError(f"--volume-index {self.volume_index} must be 0 or more.")
        if self.slices is not None and self.slices.step is not None and self.slices.step <= 0:
            raise InputError(f"--slices step {self.slices.step} must be positive.")


SETTING_KEYS = ("axis", "normalization", "window", "percentiles")
_DEFAULT_SETTINGS = {"axis": "axial", "normalization": None, "window": None, "percentiles": "0.5,99.5"}


def merge_slice_settings(stored: Mapping[str, Any] | None, given: Mapping[str, Any]) -> dict[str, Any]:
    """How predict/evaluate slice and scale volumes: the model's settings, overridden field by field by the user's.

    ``stored``: the model's ``volume_settings`` (None when no model is involved, as in fit); ``given``: what
    the user set (None = not given). A model fitted on 2D images only (no stored normalization) scores
    volumes with "dtype" scaling, the 2D images' rule, falling back to percentiles with a loud warning
    where a volume's voxels have no type range. The intensity fields go together: a user's ``window``
    alone means normalization "window", ``percentiles`` alone means "percentile", and a stored window is
    dropped when the normalization given is not "window". The axis is independent of them.
    Returns axis, normalization, window, percentiles and fallback (for :class:`SliceOptions`).
    """
    settings: dict[str, Any] = {**_DEFAULT_SETTINGS, "fallback": None}
    given = {key: value for key, value in given.items() if key in SETTING_KEYS and value is not None}
    if stored is not None:
        settings.update({key: stored[key] for key in SETTING_KEYS if stored.get(key) is not None})
        if stored.get("normalization") is None:  # fitted on 2D images: scale volumes as those were scaled
            settings.update(normalization="dtype", window=None, fallback="percentile")
    if given.keys() & {"normalization", "window", "percentiles"}:
        settings["fallback"] = None
        if "normalization" not in given:
            settings["normalization"] = "window" if "window" in given else "percentile"
        if "window" not in given and given.get("normalization", settings["normalization"]) != "window":
            settings["window"] = None
    settings.update(given)
    return settings


def recorded_settings(options: SliceOptions | None) -> dict[str, Any]:
    """The JSON-able ``volume_settings`` a model keeps: the 2D intensity rule, and how volumes were sliced and
    scaled if it was fitted on volumes (``options``; None for 2D images only). :func:`merge_slice_settings` reads it."""
    from normdino.io.reading import IMAGE_INTENSITY

    if options is None:
        return {"image_intensity": IMAGE_INTENSITY}
    return {"axis": options.axis, "normalization": options.normalization,
            "window": list(options.window) if options.window is not None else None,
            "percentiles": ",".join(map(str, options.percentiles)), "image_intensity": IMAGE_INTENSITY}
