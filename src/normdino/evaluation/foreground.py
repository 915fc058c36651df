"""Foreground (body / head) masks for foreground-aware evaluation and calibration.

Background air is easy to call normal, so an FPR threshold set over whole healthy images looks stricter
than it is inside the organ, and pixel AUROC is inflated by thousands of trivially normal pixels. With a
foreground, thresholds are set on healthy *foreground* pixels and metrics count foreground pixels only;
``evaluate``/``bench``/``reproduce`` report both the whole-image and the foreground numbers.

``--foreground auto`` uses :func:`auto_foreground`, an intensity rule for slices whose background is dark
(MRI, CT, windowed to [0, 1]):

1. smooth the gray image with a Gaussian of σ = 1 px (speckle noise);
2. foreground = pixels above ``fraction`` (default 10 %) of the image's 99th-percentile intensity, and at
   least ``floor`` (0.02 of the full range);
3. fill holes (dark skull, ventricles and lesions inside the head stay foreground);
4. keep connected components of at least 1 % of the image (drops specks and labels burnt into corners);
5. when this leaves less than 1 % of the image (e.g. an all-dark slice), the whole image is foreground.

``--foreground MASK_DIR``: a folder of masks named as the images (or ``<stem>.png``, ``<stem>_mask``,
``<stem>_foreground``); non-zero = foreground. ``--foreground none`` turns it off.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from normdino.errors import InputError

log = logging.getLogger(__name__)

__all__ = ["auto_foreground", "Foreground", "foreground_from_option"]


def auto_foreground(image: np.ndarray, fraction: float = 0.10, floor: float = 0.02, sigma: float = 1.0,
                    min_component: float = 0.01) -> np.ndarray:
    """Boolean (H, W) foreground of a slice by the documented intensity rule (see the module docstring)."""
    gray = np.asarray(image, np.float32)
    if gray.ndim == 3:
        gray = gray.mean(axis=-1)
    if gray.ndim != 2:
        raise InputError(f"a foreground needs a 2-D image, got shape {gray.shape}")
    smooth = ndimage.gaussian_filter(gray, sigma) if sigma > 0 else gray
    high = float(np.percentile(smooth, 99))
    mask = smooth > max(floor, fraction * high)
    mask = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(mask)
    if n:
        sizes = np.bincount(labels.ravel())
        keep = sizes >= min_component * mask.size
        keep[0] = False
        mask = keep[labels]
    if mask.sum() < min_component * mask.size:
        return np.ones(gray.shape, bool)
    return mask


class Foreground:
    """Foreground masks of image files: by the automatic rule, or read from a folder of masks."""

    def __init__(self, mode: str = "auto", mask_dir: str | os.PathLike | None = None) -> None:
        if mode not in ("auto", "folder"):
            raise InputError(f"unknown foreground mode {mode!r}")
        self.mode = mode
        self.mask_dir = Path(mask_dir) if mask_dir is not None else None
        self._cache: dict[Path, tuple[tuple[int, ...], np.ndarray]] = {}  # path -> (shape, packed bits): 1 bit/pixel
        if mode == "folder" and (self.mask_dir is None or not self.mask_dir.is_dir()):
            raise InputError(f"--foreground {mask_dir}: not a folder of foreground masks (or use auto / none)")

    @property
    def description(self) -> str:
        if self.mode == "auto":
            return "auto (smoothed intensity > 10 % of the 99th percentile, holes filled, components >= 1 %)"
        return f"masks from {self.mask_dir}"

    def mask_for(self, image_path: Path, image: np.ndarray | None = None) -> np.ndarray:
        """The boolean foreground of one image file (``image``: its pixels when already read).

        Masks are remembered packed (1 bit per pixel), so every method of a table reuses them.
        """
        from normdino.io.reading import read_image

        key = Path(image_path)
        if key in self._cache:
            shape, packed = self._cache[key]
            return np.unpackbits(packed, count=int(np.prod(shape))).reshape(shape).astype(bool)
        if self.mode == "auto":
            mask = auto_foreground(read_image(key) if image is None else image)
        else:
            mask = read_image(self._mask_path(key))
            mask = (mask if mask.ndim == 2 else mask.max(axis=-1)) > 0
        self._cache[key] = (mask.shape, np.packbits(mask))
        return mask

    def _mask_path(self, image_path: Path) -> Path:
        for name in (image_path.name, image_path.stem + ".png", image_path.stem + "_mask.png",
                     image_path.stem + "_foreground.png"):
            if (self.mask_dir / name).is_file():
                return self.mask_dir / name
        raise InputError(f"no foreground mask for {image_path.name} in {self.mask_dir} "
                         "(expected the same file name, <stem>.png, <stem>_mask.png or <stem>_foreground.png)")


def foreground_from_option(option: str | None) -> Foreground | None:
    """``--foreground auto|none|MASK_DIR`` as a :class:`Foreground` (None for none)."""
    if option is None or option == "none":
        return None
    if option == "auto":
        return Foreground("auto")
    return Foreground("folder", option)
