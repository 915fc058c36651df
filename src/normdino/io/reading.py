"""Reading 2D images from disk into float arrays in [0, 1], and finding them in folders and globs.

Intensity rule: 8-bit (and 1-bit) images keep their absolute scale (value / 255). Every other
depth — 16-bit, 32-bit integer, float — is rescaled per image with min–max to [0, 1], because
high-bit-depth medical exports rarely use their type's full range (12-bit CT/MRI in a 16-bit PNG)
and their intensities are arbitrary units; a constant image becomes all zeros.
"""

from __future__ import annotations

import glob
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from normdino.errors import InputError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

_GLOB_CHARS = set("*?[")
_EIGHT_BIT_MODES = {"L", "P", "RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr", "LAB", "HSV", "La", "RGBa", "RGBX"}


def read_image(path: str | Path) -> np.ndarray:
    """Read one image as float32 in [0, 1]: (H, W) for gray, (H, W, 3) for colour; alpha is dropped."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not an image file" if path.is_dir() else "does not exist"
        raise InputError(f"Image {path} {what}.")
    try:
        with Image.open(path) as image:
            if getattr(image, "n_frames", 1) > 1:
                logger.warning("%s has %d frames; only the first is used", path, image.n_frames)
            image.load()
            return _to_float(image)
    except InputError:
        raise
    except UnidentifiedImageError as err:
        raise InputError(
            f"{path} is not an image normdino can read (supported: {', '.join(IMAGE_SUFFIXES)}; "
            "convert volumes and other formats to 2D slices first)."
        ) from err
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise InputError(f"Image {path} is corrupt or truncated and cannot be decoded ({err}).") from err


def _to_float(image: Image.Image) -> np.ndarray:
    """Convert a decoded PIL image to float32 in [0, 1] by the module's intensity rule."""
    mode = image.mode
    if mode == "1":
        return np.asarray(image, dtype=np.float32)
    if mode in ("L", "LA", "La"):
        return _scale_8bit(np.asarray(image.convert("L")))
    if mode in _EIGHT_BIT_MODES:
        return _scale_8bit(np.asarray(image.convert("RGB")))
    if mode.startswith("I") or mode == "F":
        return _min_max(np.asarray(image))
    raise InputError(f"Image {image.filename or '<memory>'} has the unsupported pixel mode {mode!r}.")


def _scale_8bit(array: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0, 1] keeping the absolute scale."""
    return array.astype(np.float32) / np.float32(255.0)


def _min_max(array: np.ndarray) -> np.ndarray:
    """Rescale any numeric array to [0, 1] with its own min and max (non-finite values become the min)."""
    values = array.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, dtype=np.float32)
    low, high = values[finite].min(), values[finite].max()
    values = np.where(finite, values, low)
    if high <= low:
        return np.zeros(values.shape, dtype=np.float32)
    return ((values - low) / (high - low)).astype(np.float32)


def image_shape(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image file from its header alone, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.height, image.width
    except (OSError, ValueError) as error:
        raise InputError(f"Cannot read the image header of {path}: {error}; replace or remove the file.") from None


def find_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Expand files, folders (top level only, sorted) and glob patterns into a list of image paths.

    Hidden files (".name") are skipped in folders and globs; duplicates keep their first position.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    found: list[Path] = []
    seen: set[Path] = set()
    for item in inputs:
        for path in _expand(str(item)):
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                found.append(path)
    if not found:
        raise InputError("No input images were given.")
    return found


def _expand(item: str) -> list[Path]:
    """The image paths that one command-line style input stands for."""
    path = Path(item).expanduser()
    looked_for = ", ".join(IMAGE_SUFFIXES)
    if path.is_file():
        return [path]
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.is_file() and _is_image_name(p))
        if images:
            return images
        hint = ""
        if any(p.is_dir() for p in path.iterdir()):
            hint = f"; folders are not searched recursively: pass its subfolders or a glob such as '{path}/**/*.png'"
        raise InputError(f"No images in {path} (looked for {looked_for}){hint}.")
    if _GLOB_CHARS & set(item):
        matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
        images = [p for p in matches if p.is_file() and _is_image_name(p)]
        if not images:
            raise InputError(f"The pattern {item!r} matches no images (looked for {looked_for}).")
        return images
    raise InputError(f"Input path {path} does not exist.")


def _is_image_name(path: Path) -> bool:
    """True for visible files with a known image suffix (case-insensitive)."""
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES
