"""Fit a normative model on healthy images or volumes and write its model file, in one process or under torchrun.

Without validation inputs the detector holds out healthy images itself (by patient where file names say which)
for model selection and the thresholds. Under torchrun each rank embeds its contiguous share of the inputs
(:func:`normdino.torchrun.my_share`) and rank 0 writes the one model file after the last collective.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from normdino.errors import OutputError
from normdino.files import check_writable_file
from normdino.io.inputs import Inputs, resolve_inputs, training_images, warn_unusable
from normdino.io.reading import IMAGE_SUFFIXES, MAX_MEGAPIXELS, image_shape
from normdino.io.volume_flags import VolumeFlags
from normdino.io.slicing import recorded_settings
from normdino.torchrun import is_main_rank, my_share

if TYPE_CHECKING:
    from normdino.detector import AnomalyDetector

log = logging.getLogger(__name__)


def check_fit_output(output: Path, train: Inputs, val: Inputs | None) -> None:
    """Before any work: the model file can be written, and it is not one of the inputs (it would replace it)."""
    check_writable_file(output, "model file")
    target = output.resolve()
    inputs = [*train.images, *train.volumes, *((val.images + val.volumes) if val else [])]
    if any(Path(p).resolve() == target for p in inputs):
        raise OutputError(f"-o {output} is one of the training or validation inputs; writing the model there would "
                          "destroy it: give another file name, e.g. model.normdino")
    if output.exists() and output.name.lower().endswith((*IMAGE_SUFFIXES, ".nii", ".nii.gz", ".dcm")):
        raise OutputError(f"-o {output} is an existing image or volume; a model would replace it: give another file "
                          "name, e.g. model.normdino")


def warn_if_validation_overlaps(train: Inputs, val: Inputs | None) -> None:
    """Validation images that are also training images make the calibrated false-positive rates optimistic."""
    if val is None:
        return
    training = {Path(p).resolve() for p in [*train.images, *train.volumes]}
    validation = [*val.images, *val.volumes]
    shared = sum(Path(p).resolve() in training for p in validation)
    if shared:
        log.warning("%d of the %d validation inputs are also training inputs: thresholds calibrated on them give "
                    "optimistic (too low) false-positive rates; use healthy images the model is not fitted on",
                    shared, len(validation))


def save_model(detector: AnomalyDetector, output: str | os.PathLike) -> None:
    """Save the model; a full disk or a vanished folder is one sentence, not a serializer traceback."""
    try:
        detector.save(output)
    except OSError as err:
        raise OutputError(f"cannot write the model file {output}: {err.strerror or err}") from None
    except Exception as err:  # safetensors reports I/O failures as its own SafetensorError
        if type(err).__name__ != "SafetensorError":
            raise
        raise OutputError(f"cannot write the model file {output}: {err}") from None


def fit_to_file(normal: Sequence[str | os.PathLike], output: str | os.PathLike, *,
                val: Sequence[str | os.PathLike] | None = None, volume_flags: VolumeFlags | None = None,
                max_megapixels: float | None = None, **detector_params: Any) -> AnomalyDetector:
    """Fit an :class:`~normdino.detector.AnomalyDetector` on the healthy ``normal`` inputs and write ``output``.

    ``normal`` and ``val``: folders, globs, image files, NIfTI files or DICOM series (``val`` None: the detector
    holds out part of ``normal``); ``volume_flags``: how volumes are sliced and scaled (recorded in the model
    for predict); ``max_megapixels``: images and volume slices larger than this are refused (default 64, as
    predict); ``detector_params``: the detector's and the method's settings (method, backbone, device,
    cache_dir, epochs, ...). Everything that can be checked (inputs, output, cache folder) is checked first.
    Returns the fitted detector (on every rank of a torchrun job; only rank 0 writes the file).
    """
    from normdino.detector import AnomalyDetector

    series_filter = (volume_flags or VolumeFlags()).series_filter()
    train = resolve_inputs(normal, series_filter)
    validation = resolve_inputs(val, series_filter) if val else None
    check_fit_output(Path(output), train, validation)
    for inputs in (train, validation):
        if inputs is not None:
            warn_unusable(inputs)
    max_megapixels = max_megapixels or MAX_MEGAPIXELS
    for path in [*train.images, *(validation.images if validation else [])]:  # one limit for fit and predict
        image_shape(path, max_megapixels)
    warn_if_validation_overlaps(train, validation)
    if isinstance(detector_params.get("cache_dir"), (str, os.PathLike)):  # True: the default folder
        from normdino.features.cache_folder import check_cache_dir

        check_cache_dir(detector_params["cache_dir"])
    has_volumes = train.volumes or (validation and validation.volumes)
    options = (volume_flags or VolumeFlags()).slice_options() if has_volumes else None
    detector = AnomalyDetector(volume_settings=recorded_settings(options), **detector_params)
    detector.fit(training_images(my_share(train), options, max_megapixels=max_megapixels),  # torchrun: my share
                 training_images(my_share(validation), options, max_megapixels=max_megapixels) if validation else None)
    if is_main_rank():  # one model file, written by rank 0 after the last collective
        save_model(detector, output)
    summary = detector.training_summary_
    log.info("wrote %s: %s with %d prototypes from %d training images", output, detector.method_name,
             summary["n_prototypes"], summary["n_train_images"])
    return detector
