"""What the user pointed at: folders, globs and files, sorted into 2D images and 3D volumes.

The CLI and the Python API accept the same things (:func:`expand_images`): a folder, a glob, a file,
a ``Path``, or a list mixing them; arrays and generators of arrays pass through untouched. Every path
is checked before any work starts, so a typo costs no backbone load. In folders (top level only),
hidden and AppleDouble files (``.x.png``, ``._a.png``) are skipped; anything that is not a regular
file or folder (a FIFO, a socket, a device) is refused and never opened, since reading one can block forever.
"""

from __future__ import annotations

import glob
import itertools
import logging
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from normdino.errors import InputError
from normdino.io.reading import IMAGE_SUFFIXES, MAX_MEGAPIXELS, check_megapixels, not_a_regular_file

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class Inputs:
    """Image files and volumes (NIfTI files or DICOM series folders), each in a stable sorted order.

    ``unusable`` also lists what a PACS export holds besides image volumes (structured reports, localizers...),
    as (``<folder>#<SeriesInstanceUID>``, why), so predict writes a ``skipped`` row for each.
    """

    images: list[Path] = field(default_factory=list)
    volumes: list[Path] = field(default_factory=list)
    #: entries of input folders named like images or volumes that are no regular file (a FIFO, a dangling or
    #: looping link): (path, why); fit warns and predict writes a ``skipped`` row for each, never opening them
    unusable: list[tuple[Path, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.images or self.volumes)


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _is_hidden(path: Path) -> bool:
    """Dot files, including macOS AppleDouble companions (``._name.png``) that only look like images."""
    return path.name.startswith(".")


def _is_dicom_series(path: Path) -> bool:
    from normdino.io.volumes import is_volume

    return path.is_dir() and is_volume(path)


def _kind(path: Path) -> str:
    """"file", "dir" or "other" (FIFO, socket, device, dangling link), from one stat call that opens nothing."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "other"
    return "file" if stat.S_ISREG(mode) else "dir" if stat.S_ISDIR(mode) else "other"


def _classify_file(path: Path, inputs: Inputs) -> None:
    if _kind(path) != "file":
        raise InputError(f"{path} is not a regular file (a FIFO, socket or device?): pass image files, "
                         "volumes or folders")
    if _is_nifti(path):
        inputs.volumes.append(path)
    elif _is_image(path):
        inputs.images.append(path)
    elif path.suffix.lower() == ".dcm":
        raise InputError(f"{path} is a single DICOM file: pass the folder that holds the whole series")
    else:
        raise InputError(f"{path} is not a supported image or volume "
                         f"(images: {', '.join(IMAGE_SUFFIXES)}; volumes: .nii, .nii.gz, DICOM folders)")


def _classify_dir(path: Path, inputs: Inputs, series_filter=None) -> None:
    if _is_dicom_series(path) or (path / "DICOMDIR").is_file():
        _add_dicom_tree(path, inputs, series_filter)
        return
    found = Inputs()
    for entry in sorted(path.iterdir()):
        if _is_hidden(entry):
            continue
        kind = _kind(entry)
        if kind == "file" and _is_nifti(entry):
            found.volumes.append(entry)
        elif kind == "file" and _is_image(entry):
            found.images.append(entry)
        elif kind == "dir" and _is_dicom_series(entry):
            _add_dicom_tree(entry, found, series_filter)
        elif kind == "other" and (_is_image(entry) or _is_nifti(entry)):
            found.unusable.append((entry, not_a_regular_file(entry) or "cannot be read"))
    if not found and not found.unusable:  # nothing at the top: a PACS export's nested folders, maybe
        _add_dicom_tree(path, found, series_filter, required=False)
    if not found and not found.unusable:
        raise InputError(f"no images or volumes in {path} (looked for {', '.join(IMAGE_SUFFIXES)}, "
                         ".nii, .nii.gz and DICOM series, in nested folders too)")
    inputs.images.extend(found.images)
    inputs.volumes.extend(found.volumes)
    inputs.unusable.extend(found.unusable)


def _add_dicom_tree(path: Path, inputs: Inputs, series_filter=None, required: bool = True) -> None:
    """The DICOM series under ``path`` (nested folders, any file names) as volumes, filtered; others as skipped.

    A folder that holds exactly one series, all of it directly, stays that folder (outputs named after it);
    otherwise each series is named ``<folder>#<SeriesInstanceUID>`` (see io.dicom_tree).
    """
    from normdino.io.dicom import dicom_files
    from normdino.io.dicom_tree import find_series

    every = find_series(path)
    if not every:
        if required:
            raise InputError(f"no readable DICOM series in {path}")
        return
    wanted = [s for s in every if not series_filter or series_filter.matches(s)]
    if not wanted:
        found = "; ".join(f"{s.modality or '?'} '{s.description}'" for s in every[:8])
        raise InputError(f"none of the {len(every)} DICOM series in {path} matches "
                         f"{_describe_filter(series_filter)} (found: {found}{', ...' if len(every) > 8 else ''})")
    if len(wanted) < len(every):
        logger.info("%s: %d of %d DICOM series match %s", path, len(wanted), len(every), _describe_filter(series_filter))
    images = [s for s in wanted if s.not_image is None]
    for series in wanted:
        if series.not_image is not None:
            inputs.unusable.append((series.path, f"is {series.not_image}, not an image volume ({series.label()} "
                                                 f"in {series.folder})"))
    direct = set(dicom_files(path))
    if len(every) == 1 and images and set(images[0].files) == direct:
        inputs.volumes.append(path)
    else:
        inputs.volumes.extend(s.path for s in images)


def _describe_filter(series_filter) -> str:
    parts = []
    if series_filter is not None and series_filter.description is not None:
        parts.append(f"--series {series_filter.description!r}")
    if series_filter is not None and series_filter.modality is not None:
        parts.append(f"--modality {series_filter.modality}")
    return " ".join(parts) or "the filter"


def _matches(text: str) -> list[Path] | None:
    """The paths one argument stands for (itself, or its glob matches without hidden names); None if nothing."""
    path = Path(text).expanduser()
    if os.path.lexists(path):
        return [path]
    if glob.has_magic(text):
        wants_hidden = path.name.startswith(".")  # a pattern such as ".x*" asks for hidden names
        matches = [Path(m) for m in sorted(glob.glob(str(path))) if wants_hidden or not _is_hidden(Path(m))]
        return matches or None
    return None


def resolve_inputs(arguments: Sequence[str | os.PathLike], series_filter=None) -> Inputs:
    """Expand folders (top level), globs and files into images and volumes; a clear error for anything else.

    All arguments are checked before any is classified, and every missing one is named in one error.
    A folder of DICOM files, or a PACS export (nested folders, with or without DICOMDIR), gives one volume
    per series; ``series_filter`` (an io.dicom_tree.SeriesFilter) picks which.
    """
    if isinstance(arguments, (str, os.PathLike)):
        arguments = [arguments]
    expanded = [(str(argument), _matches(str(argument))) for argument in arguments]
    missing = [text for text, matches in expanded if matches is None]
    if missing:
        what = "matches no file" if len(missing) == 1 and glob.has_magic(missing[0]) else "does not exist"
        if len(missing) == 1:
            raise InputError(f"{missing[0]} {what}")
        raise InputError(f"{len(missing)} inputs do not exist or match nothing: {', '.join(missing)}")
    inputs = Inputs()
    for _, matches in expanded:
        for match in matches:
            if _kind(match) == "dir":
                _classify_dir(match, inputs, series_filter)
            else:
                _classify_file(match, inputs)
    if not inputs:
        if inputs.unusable:
            path, why = inputs.unusable[0]
            raise InputError(f"no input can be read: {path} {why}"
                             + (f" (and {len(inputs.unusable) - 1} more such entries)" if len(inputs.unusable) > 1 else ""))
        raise InputError("no inputs were given")
    inputs.images = list(dict.fromkeys(inputs.images))
    inputs.volumes = list(dict.fromkeys(inputs.volumes))
    return inputs


def warn_unusable(inputs: Inputs) -> None:
    """One warning per folder entry that is skipped because it is no regular file (fit has no rows to say it in)."""
    for path, why in inputs.unusable:
        logger.warning("skipped %s: it %s", path, why)


def volume_slices(volumes: Iterable[Path], options, sources: list[str] | None = None,
                  max_megapixels: float | None = MAX_MEGAPIXELS) -> Iterator[np.ndarray]:
    """Every kept slice of every volume, normalised, one at a time.

    When ``sources`` is given, the volume path of each slice is appended to it as the slice is yielded,
    so after the stream is consumed ``sources[i]`` names the volume of the i-th slice. A volume whose
    slices are above ``max_megapixels`` is refused before its first slice is read.
    """
    from normdino.io.slicing import SliceOptions
    from normdino.io.volumes import Volume

    options = options if options is not None else SliceOptions()
    for path in volumes:
        with Volume.open(path, volume_index=options.volume_index) as volume:
            check_megapixels(f"the slices of {path}", volume.slice_shape(options.axis), max_megapixels)
            for _, image in volume.iter_slices(options):
                if sources is not None:
                    sources.append(str(path))
                yield image


def training_images(inputs: Inputs, options=None, sources: list[str] | None = None,
                    max_megapixels: float | None = MAX_MEGAPIXELS) -> list[Path] | Iterator[np.ndarray]:
    """What the detector fits on: the image files (cacheable), or a stream of images and volume slices.

    ``sources`` (optional, filled in the order images are produced): the file or volume each image comes
    from, one entry per image, so held-out validation can be split by source and never separate the
    slices of one volume. For a file list it is filled at once; for a stream, as the stream is consumed.
    """
    if not inputs.volumes:
        if sources is not None:
            sources.extend(str(p) for p in inputs.images)
        return list(inputs.images)
    return itertools.chain(_with_sources(inputs.images, sources),
                           volume_slices(inputs.volumes, options, sources, max_megapixels))


def _source_name(image, position: int) -> str:
    """A path names itself; an array is its own source, named by its position in the input."""
    return str(image) if isinstance(image, (str, os.PathLike)) else f"<array {position}>"


def _with_sources(images: Iterable, sources: list[str] | None) -> Iterator:
    """Yield ``images`` unchanged, appending each one's source name to ``sources`` (if given) as it goes."""
    for position, image in enumerate(images):
        if sources is not None:
            sources.append(_source_name(image, position))
        yield image


def expand_images(images, options=None, sources: list[str] | None = None,
                  settings: dict | None = None) -> list[Path] | Iterator[np.ndarray]:
    """What the Python API's fit/predict take, made into what the detector iterates over.

    ``images``: a folder, glob or file (``str`` or ``Path``), a list of them (mixed freely), a single
    array, or a list/generator of arrays (passed through as they are). Paths are expanded and checked
    at once, before any model is loaded: a missing path, an unsupported file or a FIFO is one
    :class:`InputError`. Image files only give a list of paths (cacheable); with volumes, a stream of
    the images and then the volumes' slices cut as ``options`` (a ``SliceOptions``) say.
    ``sources`` as in :func:`training_images`; each passed-through array is its own source.
    ``settings`` (optional dict) is filled with what the model should record as ``volume_settings``
    (io.slicing.recorded_settings): the 2D rule, plus the slicing ``options`` when volumes were found.
    """
    from normdino.io.slicing import SliceOptions, recorded_settings

    if isinstance(images, (str, os.PathLike)):
        images = [images]
    if isinstance(images, (list, tuple)) and images and all(isinstance(item, (str, os.PathLike)) for item in images):
        inputs = resolve_inputs(images)
        warn_unusable(inputs)
        if inputs.volumes and options is None:
            options = SliceOptions()
        if settings is not None:
            settings.update(recorded_settings(options if inputs.volumes else None))
        return training_images(inputs, options, sources)
    if settings is not None:
        settings.update(recorded_settings(None))
    if isinstance(images, np.ndarray):
        if images.ndim in (2, 3) and not (images.ndim == 3 and images.shape[2] not in (1, 3, 4)):
            images = [images]  # one (H, W) or (H, W, C) image; otherwise a stack of images along axis 0
        return list(_with_sources(images, sources))
    if isinstance(images, (list, tuple)):
        paths = [item for item in images if isinstance(item, (str, os.PathLike))]
        resolved = resolve_inputs(paths) if paths else Inputs()  # check every path now
        if resolved.volumes:
            raise InputError("a list mixing arrays with volumes is not supported: pass the volumes' paths "
                             "on their own, or their slices as arrays")
        expanded: list = []
        for item in images:
            expanded.extend(resolve_inputs([item]).images if isinstance(item, (str, os.PathLike)) else [item])
        return list(_with_sources(expanded, sources))
    return _with_sources(images, sources)


_SLICE_SUFFIX = re.compile(r"^(?P<group>.+?)[_\-](?:slice[_\-]?)?\d+$", re.IGNORECASE)


def group_key(path: str | Path) -> str:
    """The volume / patient an image file belongs to: its stem without a trailing ``_<slice number>``.

    ``TCGA_CS_4942_19970222_12.png`` (lgg-flair, TCGA_<site>_<patient>_<date>_<slice>) -> ``TCGA_CS_4942_19970222``;
    ``BraTS2021_00012_slice_60.png`` -> ``BraTS2021_00012``; a name without a slice number is its own group.
    Volume slices named ``scan.nii.gz#z=12`` (token-set sources) group by ``scan.nii.gz``.
    """
    text = str(path)
    if "#" in text:
        return text.split("#", 1)[0]
    name = Path(text).name
    for ext in (".nii.gz", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".nii"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    match = _SLICE_SUFFIX.match(name)
    return match.group("group") if match else name


def held_out_groups(sources: Sequence[str], min_groups: int = 4) -> list[str]:
    """The unit a held-out split must keep whole, per image: its volume, or the patient of a ``<patient>_<slice>``
    image file in its folder when that names at least ``min_groups`` patients (else each file is its own unit).

    Slices of one patient are near copies: calibrating on slices whose neighbours were trained on makes the
    false-positive rate optimistic. Independent images named ``img_001.png`` ... fall back to one unit each.
    """
    keys = [str(Path(s).parent / group_key(s)) for s in sources]
    return keys if len(set(keys)) >= min_groups else list(sources)
