"""Dataset layouts for evaluation: the BMAD brain, liver and RESC layouts and a plain folder layout.

Every reader returns a :class:`Dataset`: training images (normal only) plus validation and test samples,
each with its label and, for anomalous images, its mask. Files are listed, never read, except that each
anomalous image's size is compared with its mask's from the PNG/JPEG header (cheap).

Layouts (``<split>`` is ``valid`` or ``test``; either may be missing):

* ``bmad-brain``  (BraTS2021_slice, lgg-flair): ``train/good[/img]``, ``<split>/good/img``,
  ``<split>/Ungood/img``, ``<split>/Ungood/label``.
* ``bmad-liver``: ``train/good[/img]``, ``<split>/img/{good,Ungood}``, ``<split>/label/Ungood``.
* ``bmad-resc``:  ``Train/train/good``, ``Val/val/{good,Ungood}``, ``Val/val_label/Ungood``,
  ``Test/test/{good,Ungood}``, ``Test/test_label/Ungood``.
* ``folders``: ``train/`` (normal training images, optional), ``normal/`` (healthy evaluation images),
  ``anomalous/`` and ``masks/``; see :func:`load_folders` for the accepted folder names.

A mask is matched to its image by file name, else by stem (any image extension), else by
``<stem>_mask`` / ``<stem>_label``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from normdino.io.reading import image_shape

from normdino.errors import InputError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
LAYOUTS = ("bmad-brain", "bmad-liver", "bmad-resc", "folders")

__all__ = ["Sample", "Dataset", "load_dataset", "load_folders", "detect_layout", "find_bmad", "BMAD_SETS", "LAYOUTS",
           "IMAGE_EXTENSIONS"]


@dataclass(frozen=True)
class Sample:
    """One evaluation image: its path, its mask's path (None = all normal) and its label (0 normal, 1 anomalous)."""

    image: Path
    mask: Path | None
    label: int


@dataclass
class Dataset:
    """Normal training images plus labelled validation and test samples (either split may be empty)."""

    name: str
    train: list[Path]
    valid: list[Sample] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)
    layout: str = ""

    @property
    def healthy_validation(self) -> list[Sample]:
        """Normal images on which FPR thresholds are set: those of ``valid``, else those of ``test``."""
        source = self.valid if any(s.label == 0 for s in self.valid) else self.test
        return [s for s in source if s.label == 0]

    @property
    def evaluation(self) -> list[Sample]:
        """Samples the metrics are computed on: ``test``, else ``valid`` (lgg-flair has only ``valid``)."""
        return self.test if self.test else self.valid

    def summary(self) -> dict[str, int]:
        """Image counts per split and label, for logs and reports."""
        counts = {"train": len(self.train)}
        for split in ("valid", "test"):
            samples = getattr(self, split)
            counts[f"{split}_normal"] = sum(s.label == 0 for s in samples)
            counts[f"{split}_anomalous"] = sum(s.label == 1 for s in samples)
        return counts


def _list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        Path(entry.path)
        for entry in os.scandir(folder)
        if entry.is_file() and not entry.name.startswith(".") and entry.name.lower().endswith(IMAGE_EXTENSIONS)
    )


def _first_dir(root: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (root / name).is_dir():
            return root / name
    return None


def _find_mask(image: Path, mask_dir: Path, masks_by_stem: dict[str, Path]) -> Path | None:
    exact = mask_dir / image.name
    if exact.is_file():
        return exact
    for stem in (image.stem, f"{image.stem}_mask", f"{image.stem}_label"):
        if stem in masks_by_stem:
            return masks_by_stem[stem]
    return None


def _anomalous_samples(images: list[Path], mask_dir: Path | None, check_sizes: bool) -> list[Sample]:
    """Pair each anomalous image with its mask; InputError naming the file when a mask is missing or the sizes differ."""
    if not images:
        return []
    masks = _list_images(mask_dir) if mask_dir is not None else []
    masks_by_stem = {m.stem: m for m in masks}
    samples = []
    for image in images:
        mask = _find_mask(image, mask_dir, masks_by_stem) if mask_dir is not None else None
        if mask is None:
            where = mask_dir if mask_dir is not None else "(no mask folder)"
            raise InputError(
                f"Anomalous image {image} has no mask in {where}; add a mask with the same file name or remove the image."
            )
        if check_sizes:
            (image_h, image_w), (mask_h, mask_w) = image_shape(image), image_shape(mask)
            if (image_h, image_w) != (mask_h, mask_w):
                raise InputError(
                    f"Image {image} is {image_w}x{image_h} but its mask {mask} is "
                    f"{mask_w}x{mask_h}; they must have the same size."
                )
        samples.append(Sample(image=image, mask=mask, label=1))
    return samples


def _split(normal_dir: Path | None, anomalous_dir: Path | None, mask_dir: Path | None, check_sizes: bool) -> list[Sample]:
    normal = [Sample(image=p, mask=None, label=0) for p in _list_images(normal_dir)] if normal_dir else []
    anomalous = _list_images(anomalous_dir) if anomalous_dir else []
    return normal + _anomalous_samples(anomalous, mask_dir, check_sizes)


def _train_images(good: Path) -> list[Path]:
    """Training images in ``good`` or, as in BMAD's own archives, ``good/img``."""
    return _list_images(good) or _list_images(good / "img")


def _load_bmad_brain(root: Path, check_sizes: bool) -> Dataset:
    splits = {
        split: _split(root / split / "good" / "img", root / split / "Ungood" / "img", root / split / "Ungood" / "label", check_sizes)
        for split in ("valid", "test")
    }
    return Dataset(root.name, _train_images(root / "train" / "good"), splits["valid"], splits["test"], "bmad-brain")


def _load_bmad_liver(root: Path, check_sizes: bool) -> Dataset:
    splits = {
        split: _split(root / split / "img" / "good", root / split / "img" / "Ungood", root / split / "label" / "Ungood", check_sizes)
        for split in ("valid", "test")
    }
    return Dataset(root.name, _train_images(root / "train" / "good"), splits["valid"], splits["test"], "bmad-liver")


def _load_bmad_resc(root: Path, check_sizes: bool) -> Dataset:
    def split(upper: str, lower: str) -> list[Sample]:
        base = root / upper
        return _split(base / lower / "good", base / lower / "Ungood", base / f"{lower}_label" / "Ungood", check_sizes)

    return Dataset(root.name, _train_images(root / "Train" / "train" / "good"), split("Val", "val"), split("Test", "test"), "bmad-resc")


_TRAIN_NAMES = ("train", "Train", "training")
_NORMAL_NAMES = ("normal", "good", "healthy", "Normal")
_ANOMALOUS_NAMES = ("anomalous", "Ungood", "abnormal", "anomaly", "Anomalous")
_MASK_NAMES = ("masks", "mask", "labels", "label", "ground_truth", "Masks")


def load_folders(
    normal_dir: str | os.PathLike | None,
    anomalous_dir: str | os.PathLike | None = None,
    mask_dir: str | os.PathLike | None = None,
    train_dir: str | os.PathLike | None = None,
    *,
    name: str = "folders",
    check_sizes: bool = True,
) -> Dataset:
    """Plain folders: ``train_dir`` = normal training images; ``normal_dir`` + ``anomalous_dir`` (masks in ``mask_dir``) = test set.

    Without ``train_dir`` the training list is empty (enough for ``evaluate`` on an already fitted model).
    The test set's normal images also serve as the healthy images for FPR thresholds (``Dataset.healthy_validation``).
    """
    paths = {k: Path(v) if v is not None else None for k, v in
             {"normal_dir": normal_dir, "anomalous_dir": anomalous_dir, "mask_dir": mask_dir, "train_dir": train_dir}.items()}
    for argument, path in paths.items():
        if path is not None and not path.is_dir():
            raise InputError(f"{argument} {path} is not a folder; pass an existing folder of images.")
    if paths["anomalous_dir"] is not None and paths["mask_dir"] is None and _list_images(paths["anomalous_dir"]):
        raise InputError(f"Anomalous images in {paths['anomalous_dir']} need masks; pass mask_dir (a folder of masks with matching names).")
    train = _list_images(paths["train_dir"]) if paths["train_dir"] else []
    test = _split(paths["normal_dir"], paths["anomalous_dir"], paths["mask_dir"], check_sizes)
    return Dataset(name, train, [], test, "folders")


def _load_folders_root(root: Path, check_sizes: bool) -> Dataset:
    anomalous = _first_dir(root, _ANOMALOUS_NAMES)
    return load_folders(
        _first_dir(root, _NORMAL_NAMES), anomalous, _first_dir(root, _MASK_NAMES), _first_dir(root, _TRAIN_NAMES),
        name=root.name, check_sizes=check_sizes,
    )


def detect_layout(root: str | os.PathLike) -> str:
    """The layout of ``root`` from its folder names; InputError if none fits."""
    root = Path(root)
    if (root / "Train" / "train").is_dir() or (root / "Val" / "val").is_dir() or (root / "Test" / "test").is_dir():
        return "bmad-resc"
    for split in ("valid", "test"):
        if (root / split / "good" / "img").is_dir() or (root / split / "Ungood" / "img").is_dir():
            return "bmad-brain"
        if (root / split / "img").is_dir():
            return "bmad-liver"
    if _first_dir(root, _NORMAL_NAMES + _ANOMALOUS_NAMES) is not None:
        return "folders"
    if (root / "train" / "good").is_dir():
        return "bmad-brain"
    raise InputError(
        f"Cannot tell the layout of {root}; expected a BMAD layout (train/good, valid|test/...) or folders "
        "normal/, anomalous/, masks/ — pass --layout explicitly."
    )


_LOADERS = {
    "bmad-brain": _load_bmad_brain,
    "bmad-liver": _load_bmad_liver,
    "bmad-resc": _load_bmad_resc,
    "folders": _load_folders_root,
}


def load_dataset(root: str | os.PathLike, layout: str = "auto", *, check_sizes: bool = True) -> Dataset:
    """Read a data set laid out as ``layout`` (one of :data:`LAYOUTS` or "auto") under ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"Data root {root} is not a folder; pass the folder that holds the data set.")
    if layout == "auto":
        layout = detect_layout(root)
        logger.info("Detected layout %s for %s", layout, root)
    loader = _LOADERS.get(layout)
    if loader is None:
        raise InputError(f"Unknown layout {layout!r}; choose one of {', '.join(('auto',) + LAYOUTS)}.")
    dataset = loader(root, check_sizes)
    if not dataset.train and not dataset.valid and not dataset.test:
        raise InputError(f"No images found under {root} in the {layout} layout; check the folder names (see --layout).")
    logger.info("Loaded %s (%s): %s", dataset.name, layout, dataset.summary())
    return dataset


# ---------------------------------------------------------------------- the three BMAD sets under one root

#: BMAD short name -> (folder-name prefixes seen in the wild, lower case; layout)
BMAD_SETS = {
    "brats": (("brats2021_slice", "brats"), "bmad-brain"),
    "liver": (("liver", "hist_diy"), "bmad-liver"),
    "resc": (("resc",), "bmad-resc"),
}


def _has_layout(folder: Path, layout: str) -> bool:
    try:
        return detect_layout(folder) == layout and bool(_LOADERS[layout](folder, False).train)
    except InputError:
        return False


def _bmad_candidates(root: Path, prefixes: tuple[str, ...]) -> list[Path]:
    """``root`` itself, then its sub-folders whose lower-case name starts with a prefix, then their ``hist_DIY``."""
    children = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    named = [p for p in children if p.name.lower().startswith(prefixes)]
    nested = [q for p in named for q in sorted(p.iterdir()) if q.is_dir() and q.name.lower() == "hist_diy"]
    return [root] * root.name.lower().startswith(prefixes) + named + nested


def find_bmad(root: str | os.PathLike, names: tuple[str, ...] = tuple(BMAD_SETS)) -> dict[str, tuple[Path, str]]:
    """Where each named BMAD set (brats, liver, resc) lies under ``root``: name -> (folder, layout).

    Accepted: ``BraTS2021_slice/`` (brain layout), ``Liver/`` or its ``hist_DIY/`` variant (``Liver/hist_DIY/``
    or ``hist_DIY/`` beside it; the plain folder wins when both hold the layout) and ``RESC/``; the first
    candidate that holds the set's layout with training images is taken. InputError names what is missing.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"BMAD root {root} is not a folder; pass the folder that holds BraTS2021_slice, Liver, RESC.")
    found, missing = {}, []
    for name in names:
        if name not in BMAD_SETS:
            raise InputError(f"unknown BMAD set {name!r}; choose from {', '.join(BMAD_SETS)}")
        prefixes, layout = BMAD_SETS[name]
        folder = next((c for c in _bmad_candidates(root, prefixes) if _has_layout(c, layout)), None)
        if folder is None:
            missing.append(name)
        else:
            found[name] = (folder, layout)
            logger.info("BMAD %s: %s (%s)", name, folder, layout)
    if missing:
        raise InputError(f"no {', '.join(missing)} data set under {root} in its BMAD layout (expected e.g. "
                         "BraTS2021_slice/train/good, Liver/train/good or Liver/hist_DIY/..., RESC/Train/train/good); "
                         "choose the sets present with --datasets")
    return found
