"""The volume settings a user gives for one run, merged over the ones a model recorded when it was fitted.

``fit`` records how its volumes were sliced and scaled (:func:`normdino.io.slicing.recorded_settings`);
``predict`` and ``evaluate`` take those unless the user gives a field again
(:func:`normdino.io.slicing.merge_slice_settings`, field by field). :class:`VolumeFlags` holds what the user
gave, as text where the command line gives text, and turns it into :class:`~normdino.io.slicing.SliceOptions`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from normdino.errors import NormdinoError
from normdino.io.slicing import SliceOptions, merge_slice_settings

INTENSITY_SETTINGS = ("axis", "normalization", "window", "percentiles")
"""The fields a model records and a later run inherits unless given again."""


@dataclass(frozen=True)
class VolumeFlags:
    """What the user set for slicing and scaling volumes in one run; None: not given (the model's or the default).

    ``axis``: axial, coronal, sagittal or an array axis ("0".."2"); ``slices``: a range such as "60:100";
    ``window``: "LOW,HIGH" in the volume's units (HU for CT); ``percentiles``: "LOW,HIGH" clipping percentiles;
    ``normalization``: percentile, window, dtype or none; ``volume_index``: the volume of a 4D NIfTI;
    ``series`` / ``modality``: which series of a DICOM folder or PACS export to take (SeriesDescription pattern,
    Modality; see :class:`normdino.io.dicom_tree.SeriesFilter`).
    """

    axis: str | int | None = None
    slices: str | None = None
    min_foreground: float = 0.0
    window: str | None = None
    percentiles: str | None = None
    normalization: str | None = None
    volume_index: int | None = None
    series: str | None = None
    modality: str | None = None

    def series_filter(self):
        """The DICOM series filter of these flags (an empty filter takes every series)."""
        from normdino.io.dicom_tree import SeriesFilter

        return SeriesFilter(description=self.series, modality=self.modality)

    def slice_options(self, model_settings: Mapping[str, Any] | None = None) -> SliceOptions:
        """The slice options of this run: these flags over ``model_settings`` (a model's ``volume_settings``;
        ``{}`` for a model fitted on 2D images only; None when fitting, with no model yet) over the defaults."""
        settings = merge_slice_settings(model_settings, {key: getattr(self, key) for key in INTENSITY_SETTINGS})
        try:
            percentiles = tuple(float(v) for v in str(settings["percentiles"]).split(","))
        except ValueError:
            raise NormdinoError(f"--percentiles takes LOW,HIGH, e.g. 0.5,99.5; got {settings['percentiles']!r}") from None
        axis = int(settings["axis"]) if str(settings["axis"]).isdigit() else settings["axis"]
        window = settings["window"]
        return SliceOptions(axis=axis, slices=self.slices, min_foreground=self.min_foreground,
                            normalization=settings["normalization"], percentiles=percentiles,
                            window=",".join(map(str, window)) if isinstance(window, (list, tuple)) else window,
                            volume_index=self.volume_index, fallback=settings["fallback"])
