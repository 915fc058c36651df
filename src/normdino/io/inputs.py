"""What the user pointed at: folders, globs and files, sorted into 2D images and 3D volumes."""

from __future__ import annotations

import glob
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from normdino.errors import InputError
from normdino.io.reading import IMAGE_SUFFIXES

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class Inputs:
    """Image files and volumes (NIfTI files or DICOM series folders), each in a stable sorted order."""

    images: list[Path] = field(default_factory=list)
    volumes: list[Path] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.images or self.volumes)


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _is_dicom_series(path: Path) -> bool:
    from normdino.io.volumes import is_volume

    return path.is_dir() and is_volume(path)


def _classify_file(path: Path, inputs: Inputs) -> None:
    if _is_nifti(path):
        inputs.volumes.append(path)
    elif _is_image(path):
        inputs.images.append(path)
    elif path.suffix.lower() == ".dcm":
        raise InputError(f"{path} is a single DICOM file: pass the folder that holds the whole series")
    else:
        raise InputError(f"{path} is not a supported image or volume "
                         f"(images: {', '.join(IMAGE_SUFFIXES)}; volumes: .nii, .nii.gz, DICOM folders)")


def _classify_dir(path: Path, inputs: Inputs) -> None:
    if _is_dicom_series(path):
        inputs.volumes.append(path)
        return
    found = Inputs()
    for entry in sorted(path.iterdir()):
        if entry.is_file() and _is_nifti(entry):
            found.volumes.append(entry)
        elif entry.is_file() and _is_image(entry):
            found.images.append(entry)
        elif entry.is_dir() and _is_dicom_series(entry):
            found.volumes.append(entry)
    if not found:
        raise InputError(f"no images or volumes in {path} (looked for {', '.join(IMAGE_SUFFIXES)}, "
                         ".nii, .nii.gz and DICOM series folders)")
    inputs.images.extend(found.images)
    inputs.volumes.extend(found.volumes)


def resolve_inputs(arguments: Sequence[str | Path]) -> Inputs:
    """Expand folders (top level), globs and files into images and volumes; a clear error for anything else."""
    inputs = Inputs()
    for argument in arguments:
        text = str(argument)
        path = Path(text).expanduser()
        if path.exists():
            matches = [path]
        elif glob.has_magic(text):
            matches = [Path(m) for m in sorted(glob.glob(str(path)))]
            if not matches:
                raise InputError(f"no files match {text}")
        else:
            raise InputError(f"{text} does not exist")
        for match in matches:
            (_classify_dir if match.is_dir() else _classify_file)(match, inputs)
    if not inputs:
        raise InputError("no inputs were given")
    inputs.images = list(dict.fromkeys(inputs.images))
    inputs.volumes = list(dict.fromkeys(inputs.volumes))
    return inputs


def volume_slices(volumes: Iterable[Path], options) -> Iterator[np.ndarray]:
    """Every kept slice of every volume, normalised, one at a time."""
    from normdino.io.volumes import Volume

    for path in volumes:
        volume = Volume.open(path, volume_index=options.volume_index)
        for _, image in volume.iter_slices(options):
            yield image


def training_images(inputs: Inputs, options=None) -> list[Path] | Iterator[np.ndarray]:
    """What the detector fits on: the image files (cacheable), or a stream of images and volume slices."""
    if not inputs.volumes:
        return list(inputs.images)
    return itertools.chain((p for p in inputs.images), volume_slices(inputs.volumes, options))
