"""Synthetic head-like phantoms (FLAIR-ish axial slices) with optional inserted lesions, for the demo and tests.

Healthy anatomy varies from slice to slice (head shape, size, position, rotation, ventricles, gyri, contrast,
noise, bias field), so a normative model has something to learn; lesions are textured blobs in the brain
parenchyma that no healthy slice contains, and their mask is exactly the set of pixels they change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from normdino.errors import InputError
from normdino.files import atomic_path

logger = logging.getLogger(__name__)

#: Smallest intensity change inside a lesion: at least 20 grey levels once written as 8-bit PNG.
MIN_LESION_CONTRAST = 0.08


@dataclass(frozen=True)
class Phantom:
    """A phantom slice and its ground truth: ``image`` with lesions, ``healthy`` the same slice without them."""

    image: np.ndarray  # float32 (size, size) in [0, 1]
    mask: np.ndarray  # uint8 0/1, the lesion pixels (exactly where image != healthy)
    brain: np.ndarray  # bool, brain parenchyma without CSF (where lesions may go)
    healthy: np.ndarray  # float32, the slice before lesions were inserted


def _smooth_field(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field with correlation length ``scale`` (in pixels)."""
    white = rng.standard_normal((size, size))
    field = ndimage.gaussian_filter(white, sigma=max(scale, 0.5), mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-12)


def _polar(size: int, cx: float, cy: float, angle: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rotated coordinates (u, v) in units of half the image size, and the polar angle, around (cx, cy)."""
    coords = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    y, x = np.meshgrid(coords, coords, indexing="ij")
    x, y = x - cx, y - cy
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * x + s * y, -s * x + c * y
    return u, v, np.arctan2(v, u)


def _harmonics(rng: np.random.Generator, theta: np.ndarray, orders: range, amplitude: float) -> np.ndarray:
    """A random smooth periodic function of the angle: sum of a few harmonics with decaying amplitudes."""
    out = np.zeros_like(theta)
    for n in orders:
        out += amplitude / n * rng.standard_normal() * np.cos(n * theta + rng.uniform(0, 2 * np.pi))
    return out


def _healthy_slice(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one healthy slice; returns (image, brain parenchyma mask, white-matter mask)."""
    cx, cy = rng.normal(0.0, 0.03, size=2)
    angle = rng.normal(0.0, 0.12)
    level = rng.uniform(0.0, 1.0)  # axial level: 0 = through the ventricles, 1 = high convexity
    head_a = rng.uniform(0.70, 0.80) * (1.0 - 0.12 * level)  # left-right semi-axis
    head_b = rng.uniform(0.84, 0.93) * (1.0 - 0.10 * level)  # anterior-posterior semi-axis
    u, v, theta = _polar(size, cx, cy, angle)
    rho_head = np.hypot(u / head_a, v / head_b) / (1.0 + _harmonics(rng, theta, range(2, 6), 0.035))

    scalp = rng.uniform(0.050, 0.075)
    skull = rng.uniform(0.045, 0.070)
    csf_rim = rng.uniform(0.010, 0.025)
    brain_edge = 1.0 - scalp - skull - csf_rim
    px = 2.0 / size  # one pixel in normalised units
    gyri = _smooth_field(rng, size, scale=size / 40)
    sulci = _smooth_field(rng, size, scale=size / 32)
    rho_brain = rho_head / brain_edge
    # Cortex: an undulating band of grey matter; sulci: zero-level lines of a random field cutting into it.
    wm_edge = rng.uniform(0.74, 0.82) + 0.05 * gyri
    brain = rho_brain < 1.0
    sulcus = brain & (rho_brain > wm_edge - 0.04) & (np.abs(sulci) < 0.09 + 0.6 * px)
    wm = brain & (rho_brain < wm_edge) & ~sulcus

    # Lateral ventricles: two mirrored curved horns ")(" beside the midline, smaller high up.
    vent_scale = rng.uniform(0.6, 1.3) * max(0.0, 1.0 - 1.3 * level)
    ventricles = np.zeros((size, size), dtype=bool)
    if vent_scale > 0.15:
        width, length = 0.05 * vent_scale + px, 0.26 * vent_scale + 2 * px
        sep = rng.uniform(0.04, 0.07) * vent_scale + px
        curve = rng.uniform(0.8, 2.0)
        shift = rng.normal(-0.03, 0.03)
        for side in (-1.0, 1.0):
            dv = v - shift
            du = u - side * (sep + width + curve * dv**2)
            ventricles |= (du / width) ** 2 + (dv / length) ** 2 < 1.0
    # Falx: the thin interhemispheric fissure, only in front of and behind the ventricles.
    falx = brain & (np.abs(u) < 0.6 * px) & (np.abs(v) > 0.45 * head_b)

    contrast = rng.uniform(0.85, 1.15)
    gm_level, wm_level = 0.52 * contrast, rng.uniform(0.36, 0.42) * contrast
    image = np.zeros((size, size))
    image[rho_head < 1.0] = rng.uniform(0.55, 0.80)  # scalp and subcutaneous fat (bright)
    image[rho_head < 1.0 - scalp] = rng.uniform(0.04, 0.10)  # skull (dark)
    image[rho_head < 1.0 - scalp - skull] = rng.uniform(0.10, 0.16)  # subarachnoid CSF (dark in FLAIR)
    texture = 1.0 + 0.05 * _smooth_field(rng, size, scale=size / 64)
    image[brain] = gm_level * texture[brain]
    image[wm] = wm_level * texture[wm]
    csf_level = rng.uniform(0.08, 0.14)
    image[sulcus | ventricles | falx] = csf_level
    image = ndimage.gaussian_filter(image, sigma=0.7 * size / 128)  # partial volume at edges

    # Smooth multiplicative bias field (coil sensitivity) and Rician-like noise.
    bias = 1.0 + rng.uniform(0.04, 0.12) * _smooth_field(rng, size, scale=size / 4)
    sigma = rng.uniform(0.012, 0.03)
    noisy = np.hypot(
        image * bias + sigma * rng.standard_normal((size, size)), sigma * rng.standard_normal((size, size))
    )
    parenchyma = brain & ~(sulcus | ventricles | falx) & (rho_brain < 0.97)
    parenchyma = ndimage.binary_erosion(parenchyma)  # away from the blurred CSF edges
    return np.clip(noisy, 0.0, 1.0), parenchyma, wm & ~ventricles


def _insert_lesions(
    rng: np.random.Generator, image: np.ndarray, allowed: np.ndarray, seeds: np.ndarray, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """Add ``count`` textured blobs centred on ``seeds`` pixels and clipped to ``allowed``; returns (image, mask)."""
    size = image.shape[0]
    out = image.copy()
    mask = np.zeros(image.shape, dtype=bool)
    candidates = np.argwhere(seeds)
    if count > 0 and len(candidates) == 0:
        raise InputError("make_phantom: this phantom has no white matter to place a lesion in; use a larger size.")
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    for _ in range(count):
        cy, cx = candidates[rng.integers(len(candidates))]
        radius = rng.uniform(0.035, 0.11) * size
        aspect = rng.uniform(0.6, 1.0)
        angle = rng.uniform(0, np.pi)
        c, s = np.cos(angle), np.sin(angle)
        du, dv = xx - cx, yy - cy
        eu, ev = (c * du + s * dv) / radius, (-s * du + c * dv) / (radius * aspect)
        r = np.hypot(eu, ev)
        r_edge = 1.0 + _harmonics(rng, np.arctan2(ev, eu), range(2, 7), 0.35)
        blob = (r < r_edge) & allowed
        blob[cy, cx] = True  # the centre is always inside, so no lesion is empty
        # Intensity change: strongest in the middle, never below MIN_LESION_CONTRAST, textured (heterogeneous tumour).
        profile = np.clip(1.0 - r / np.maximum(r_edge, 1e-6), 0.0, 1.0) ** 0.5
        texture = 0.5 + 0.5 * np.tanh(_smooth_field(rng, size, scale=max(radius / 4, 1.0)))
        bright = rng.random() < 0.75
        amplitude = rng.uniform(0.25, 0.45) if bright else rng.uniform(0.12, 0.2)
        delta = MIN_LESION_CONTRAST + (amplitude - MIN_LESION_CONTRAST) * profile * (0.4 + 0.6 * texture)
        # Relative to the healthy slice, so where lesions overlap the later one wins and the contrast holds.
        if bright:
            out[blob] = np.minimum(image[blob] + delta[blob], 1.0)
        else:
            out[blob] = np.maximum(image[blob] - delta[blob], 0.0)
        mask |= blob
    return out, mask


def phantom(rng: np.random.Generator, size: int = 128, lesions: int = 0) -> Phantom:
    """A phantom slice with its lesion mask, brain mask and lesion-free version (same draws as ``make_phantom``)."""
    if size < 32:
        raise InputError(f"make_phantom: size={size} is too small; use size >= 32.")
    if lesions < 0:
        raise InputError(f"make_phantom: lesions={lesions} must be >= 0.")
    healthy, brain, wm = _healthy_slice(rng, size)
    # Lesions grow into any parenchyma but start in white matter away from the brain edge.
    seeds = ndimage.binary_erosion(wm & brain, iterations=max(1, size // 32))
    if not seeds.any():
        seeds = wm & brain
    image, mask = _insert_lesions(rng, healthy, brain, seeds, lesions)
    # Lesion pixels that were already saturated cannot change; keep the mask equal to the changed pixels.
    mask &= image != healthy
    return Phantom(image.astype(np.float32), mask.astype(np.uint8), brain, healthy.astype(np.float32))


def make_phantom(rng: np.random.Generator, size: int = 128, lesions: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A head-like slice (float32 (size, size) in [0, 1]) with ``lesions`` inserted blobs and their mask (uint8 0/1)."""
    p = phantom(rng, size=size, lesions=lesions)
    return p.image, p.mask


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def _write_png(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def write_phantom_dataset(
    root: str | Path,
    n_train: int = 40,
    n_valid: int = 16,
    n_test_normal: int = 8,
    n_test_anomalous: int = 16,
    size: int = 128,
    seed: int = 0,
) -> Path:
    """Write a phantom data set in the BMAD brain layout (8-bit PNGs, masks 0/255) under ``root``; returns ``root``.

    ``n_valid`` healthy and ``n_valid`` lesioned validation slices are written. Each split draws from its own
    child of ``SeedSequence(seed)``, so the files depend only on the seed and the counts of that split.
    """
    root = Path(root)
    counts = {
        "n_train": n_train,
        "n_valid": n_valid,
        "n_test_normal": n_test_normal,
        "n_test_anomalous": n_test_anomalous,
    }
    for name, value in counts.items():
        if value < 0:
            raise InputError(f"write_phantom_dataset: {name}={value} must be >= 0.")
    plan = [
        ("train", root / "train" / "good", None, n_train, False),
        ("valid_good", root / "valid" / "good" / "img", None, n_valid, False),
        ("valid_ungood", root / "valid" / "Ungood" / "img", root / "valid" / "Ungood" / "label", n_valid, True),
        ("test_good", root / "test" / "good" / "img", None, n_test_normal, False),
        ("test_ungood", root / "test" / "Ungood" / "img", root / "test" / "Ungood" / "label", n_test_anomalous, True),
    ]
    children = np.random.SeedSequence(seed).spawn(len(plan))
    for (split, img_dir, label_dir, count, anomalous), child in zip(plan, children, strict=True):
        rng = np.random.default_rng(child)
        img_dir.mkdir(parents=True, exist_ok=True)
        if label_dir is not None:
            label_dir.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            lesions = int(rng.integers(1, 4)) if anomalous else 0
            image, mask = make_phantom(rng, size=size, lesions=lesions)
            name = f"{split}_{i:04d}.png"
            _write_png(img_dir / name, _to_uint8(image))
            if label_dir is not None:
                _write_png(label_dir / name, mask * np.uint8(255))
    logger.info("wrote phantom data set to %s", root)
    return root
