"""Reading 2D images from disk into float arrays in [0, 1], and finding them in folders and globs.

Intensity rule ("dtype", recorded in model files as ``volume_settings["image_intensity"]``): an integer
image is scaled by the full range of its data type — 8-bit (and 1-bit) value / 255, 16-bit value / 65535 —
and a float image must already hold values in [0, 1]. Signed integer images (32-bit TIFFs) are refused: by
their type's range every pixel lands near 0.5; a 16-bit image holding only 8-bit values gets a warning. The rule is
fixed per file type, never fitted to the image, so a healthy pixel gets the same value whether or not the
image holds a lesion (per-image min-max or percentiles would dim healthy tissue next to a bright lesion),
and it is exactly what volumes get with ``normalization="dtype"`` (unsigned voxels), so a model fitted on
PNG slices can score volumes on the same scale. The price: 12-bit data in a 16-bit file comes out dark
(at most 4095/65535) — consistently so for training and prediction; export with a fixed window to 8 bit
for more contrast. Non-finite pixels of a float image count as 0; an image with no finite pixel is refused.
Images smaller than one DINO patch (16 px) on a side are read, with a warning that their maps say little.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import stat
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from normdino.errors import InputError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
IMAGE_INTENSITY = "dtype"  # the 2D intensity rule above; models record it, volumes match it
MIN_IMAGE_SIDE = 16  # one patch of DINOv3 (DINOv2: 14); smaller images get a warning
#: Images (and volume slices) larger than this are refused before any work, in fit and predict alike
#: (``--max-megapixels``); PIL's own decompression-bomb check never speaks first.
MAX_MEGAPIXELS = 64.0

_GLOB_CHARS = set("*?[")
_EIGHT_BIT_MODES = {"L", "P", "RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr", "LAB", "HSV", "La", "RGBa", "RGBX"}


def read_image(path: str | Path, max_megapixels: float | None = None) -> np.ndarray:
    """Read one image as float32 in [0, 1]: (H, W) for gray, (H, W, 3) for colour; alpha is dropped.

    ``max_megapixels``: refuse a larger image from its header, before decoding it (None: no limit of ours).
    """
    path = Path(path)
    _check_regular_file(path)
    try:
        with _opened(path, max_megapixels) as image:
            check_megapixels(path, (image.height, image.width), max_megapixels)
            if getattr(image, "n_frames", 1) > 1:
                logger.warning("%s has %d frames; only the first is used", path, image.n_frames)
            image.load()
            array = _to_float(image, path)
    except InputError:
        raise
    except UnidentifiedImageError as err:
        raise InputError(
            f"{path} is not an image normdino can read (supported: {', '.join(IMAGE_SUFFIXES)}; "
            "convert volumes and other formats to 2D slices first)."
        ) from err
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise InputError(f"Image {path} is corrupt or truncated and cannot be decoded ({err}).") from err
    warn_if_tiny(array.shape[:2], str(path))
    return array


def check_megapixels(name: str | Path, shape: tuple[int, ...], max_megapixels: float | None,
                     bytes_per_pixel: int | None = None) -> None:
    """InputError when an image or slice of ``shape`` (H, W, ...) is above ``max_megapixels`` (None: no limit);
    ``bytes_per_pixel``, if given, says in the sentence how much memory it would take."""
    megapixels = int(shape[0]) * int(shape[1]) / 1e6
    if max_megapixels is None or megapixels <= max_megapixels:
        return
    need = ""
    if bytes_per_pixel:
        mb = bytes_per_pixel * megapixels
        need = (f": normdino needs about {bytes_per_pixel} bytes per pixel "
                f"({f'{mb / 1000:.1f} GB' if mb >= 1000 else f'{mb:.3g} MB'} for it)")
    raise InputError(f"{name} is {int(shape[1])}x{int(shape[0])} ({megapixels:.3g} megapixels), above the limit of "
                     f"{max_megapixels:g} megapixels{need}; downscale it, or raise --max-megapixels if the memory "
                     "allows")


def _pil_limit_megapixels() -> float:
    """Where PIL refuses to open an image as a decompression bomb (twice its warning size)."""
    return 2 * (Image.MAX_IMAGE_PIXELS or float("inf")) / 1e6


@contextlib.contextmanager
def _opened(path: Path, max_megapixels: float | None):
    """``Image.open`` whose decompression-bomb warning stays silent (our limit speaks instead) and whose
    decompression-bomb error becomes the sentence of our megapixel limit."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError:
        pil = _pil_limit_megapixels()
        above = f", above the limit of {max_megapixels:g} megapixels" if max_megapixels and max_megapixels < pil else ""
        raise InputError(f"{path} is larger than {pil:.0f} megapixels{above} (the image reader refuses such sizes "
                         "as decompression bombs); downscale it") from None
    with image:
        yield image


def _check_regular_file(path: Path) -> None:
    """Refuse a missing path, a folder, or anything that is not a regular file (a FIFO would block forever)."""
    if Path(path).is_dir():
        raise InputError(f"Image {path} is a folder, not an image file.")
    why = not_a_regular_file(path)
    if why:
        raise InputError(f"Image {path} {why}.")


def not_a_regular_file(path: str | Path) -> str | None:
    """Why ``path`` is no regular file (the end of a sentence that starts with the path), or None if it is one.

    Asks with stat/lstat only, so a FIFO is never opened (opening one for reading blocks forever).
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        if os.path.islink(path):
            if err.errno == errno.ELOOP:
                return "is a symbolic link that loops (it never reaches a file)"
            return "is a dangling symbolic link (its target does not exist)"
        return "does not exist"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    if stat.S_ISFIFO(mode):
        return "is not a regular file but a FIFO (a named pipe; reading it could block forever)"
    return "is not a regular file (a socket or device?)"


def warn_if_tiny(shape: tuple[int, ...], name: str) -> bool:
    """Warn when an image (or a volume's slices) is smaller than one DINO patch on a side; True if it is."""
    height, width = int(shape[0]), int(shape[1])
    if min(height, width) >= MIN_IMAGE_SIDE:
        return False
    logger.warning("%s is %dx%d pixels, smaller than one DINO patch (%d px): its anomaly map is upsampled "
                   "from one or a few tokens and says little about it.", name, height, width, MIN_IMAGE_SIDE)
    return True


def _to_float(image: Image.Image, path: Path) -> np.ndarray:
    """Convert a decoded PIL image to float32 in [0, 1] by the module's intensity rule."""
    mode = image.mode
    if mode == "1":
        return np.asarray(image, dtype=np.float32)
    if mode in ("L", "LA", "La"):
        return _scale_8bit(np.asarray(image.convert("L")))
    if mode in _EIGHT_BIT_MODES:
        return _scale_8bit(np.asarray(image.convert("RGB")))
    if mode.startswith("I") or mode == "F":
        array = np.asarray(image)
        if image.format == "PNG" and array.dtype == np.int32:  # older Pillow: 16-bit PNG decoded as mode "I"
            array = array.astype(np.uint16)
        if array.dtype.kind == "i":
            raise InputError(
                f"{path} stores {8 * array.dtype.itemsize}-bit signed integers (values {int(array.min())} to "
                f"{int(array.max())}), which the 2D intensity rule cannot fit (scaled by that type's range every pixel "
                "lands near 0.5): save it as 8- or 16-bit unsigned integers with a fixed window, or as floats in [0, 1].")
        if array.dtype.kind == "u":
            _warn_if_dark(array, path)
            return scale_by_dtype(array)
        return unit_float(array, str(path))
    raise InputError(f"Image {path} has the unsupported pixel mode {mode!r}.")


def _warn_if_dark(array: np.ndarray, path: Path) -> None:
    """One warning for 8-bit values in a 16-bit (or wider) file: by its type's range it reads nearly black."""
    if array.dtype.itemsize > 1 and array.size and int(array.max()) <= 255:
        top = np.iinfo(array.dtype).max
        logger.warning("%s is a %d-bit image whose values all lie in 0..%d, so by its type's range (value / %d) it "
                       "reads nearly black (at most %.4f) and its scores say little; if it holds 8-bit data, save it "
                       "as an 8-bit image.", path, 8 * array.dtype.itemsize, int(array.max()), top,
                       int(array.max()) / top)


def _scale_8bit(array: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0, 1] keeping the absolute scale."""
    return array.astype(np.float32) / np.float32(255.0)


def scale_by_dtype(array: np.ndarray) -> np.ndarray:
    """Integer array -> float32 in [0, 1] over its data type's full range (uint16: value / 65535)."""
    info = np.iinfo(array.dtype)
    return ((array.astype(np.float64) - info.min) / (float(info.max) - info.min)).astype(np.float32)


def unit_float(array: np.ndarray, name: str) -> np.ndarray:
    """A float image as float32 in [0, 1]: non-finite pixels -> 0; no finite pixel or values outside [0, 1] -> error."""
    values = np.asarray(array, dtype=np.float32)
    finite = np.isfinite(values)
    if not finite.any():
        raise InputError(f"{name} holds no finite pixel value (all NaN or infinite): there is nothing to score.")
    low, high = float(values[finite].min()), float(values[finite].max())
    if low < 0.0 or high > 1.0:
        raise InputError(f"{name} is a float image with values from {low:g} to {high:g}; float images must hold "
                         "values in [0, 1]: rescale it with a fixed window, or save it as 8- or 16-bit integers.")
    return np.where(finite, values, np.float32(0.0))


def image_shape(path: str | Path, max_megapixels: float | None = None,
                bytes_per_pixel: int | None = None) -> tuple[int, int]:
    """(H, W) of an image file from its header alone, without decoding the pixels; InputError above
    ``max_megapixels`` (None: no limit of ours), PIL's decompression-bomb limit included."""
    _check_regular_file(Path(path))
    try:
        with _opened(Path(path), max_megapixels) as image:
            shape = image.height, image.width
    except InputError:
        raise
    except (OSError, ValueError, SyntaxError) as error:
        raise InputError(f"Cannot read the image header of {path}: {error}; replace or remove the file.") from None
    check_megapixels(path, shape, max_megapixels, bytes_per_pixel)
    return shape


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
