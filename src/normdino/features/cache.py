"""Token cache: the backbone runs once per data set; later fits read float16 tokens from a memory-mapped .npy.

A cache file is keyed by ``backbone.identifier`` (model, weights, resolution, layers, normalisation,
precision, preprocessing) and the SHA-256 of every image file's bytes in order, so renaming files
keeps it valid while any change of content, order or setting computes a new one. Files are written
atomically; stale ones are never deleted automatically (delete the folder to reclaim space).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from normdino.errors import InputError
from normdino.files import atomic_path, atomic_write_text

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, with an InputError naming a file that cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as err:
        raise InputError(f"Image {path} cannot be read ({err.strerror or err}).") from err
    return digest.hexdigest()


def cache_key(identifier: str, file_hashes: Sequence[str], all_layers: bool = False) -> str:
    """Hex key of one cache entry: backbone settings + ordered content hashes."""
    payload = json.dumps(
        {"format": CACHE_FORMAT, "backbone": identifier, "all_layers": bool(all_layers), "files": list(file_hashes)}
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def cache_path(cache_dir: Path, key: str) -> Path:
    """Where the tokens of ``key`` live inside ``cache_dir``."""
    return Path(cache_dir) / f"tokens-{key[:40]}.npy"


def extract_tokens(
    backbone,
    paths: Sequence[Path],
    cache_dir: Path | None = None,
    batch_size: int = 8,
    progress: bool = True,
    all_layers: bool = False,
    num_workers: int = 0,
) -> np.ndarray:
    """(N, h, w, D) float16 patch tokens of the images (last requested layer; (N, L, h, w, D) with ``all_layers``).

    With ``cache_dir`` the result is a read-only memory map of the cache file, reused when nothing changed.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise InputError("No images were given to extract tokens from.")
    grid_h, grid_w = backbone.grid_shape()
    layer_axis = (len(backbone.layers),) if all_layers else ()
    shape = (len(paths), *layer_axis, grid_h, grid_w, backbone.embed_dim)
    if cache_dir is None:
        tokens = np.empty(shape, dtype=np.float16)
        _fill(tokens, backbone, paths, batch_size, progress, all_layers, num_workers)
        return tokens

    hashes = [file_sha256(p) for p in paths]
    target = cache_path(Path(cache_dir), cache_key(backbone.identifier, hashes, all_layers))
    cached = _open_cached(target, shape)
    if cached is not None:
        logger.info("Reusing cached tokens %s", target)
        return cached
    logger.info("Computing tokens of %d images into %s", len(paths), target)
    with atomic_path(target) as tmp:
        tokens = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
        _fill(tokens, backbone, paths, batch_size, progress, all_layers, num_workers)
        tokens.flush()
        del tokens
    meta = {
        "format": CACHE_FORMAT, "backbone": backbone.identifier, "shape": list(shape), "dtype": "float16",
        "all_layers": bool(all_layers), "files": [{"path": str(p), "sha256": h} for p, h in zip(paths, hashes)],
    }
    atomic_write_text(target.with_suffix(".json"), json.dumps(meta, indent=1))
    return np.load(target, mmap_mode="r")


def _fill(tokens: np.ndarray, backbone, paths, batch_size, progress, all_layers, num_workers) -> None:
    """Write the backbone's tokens batch by batch into a preallocated float16 array (never the whole float32 set)."""
    for start, out in backbone.iter_encoded(paths, batch_size=batch_size, progress=progress, num_workers=num_workers):
        batch = out.patch_tokens if all_layers else out.patch_tokens[:, -1]
        tokens[start : start + len(batch)] = batch.half().numpy()


def _open_cached(target: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The cached memory map when it exists and has the expected shape and dtype, else None."""
    if not target.is_file():
        return None
    try:
        cached = np.load(target, mmap_mode="r")
    except (OSError, ValueError) as err:
        logger.warning("Ignoring unreadable token cache %s (%s); recomputing", target, err)
        return None
    if cached.shape != shape or cached.dtype != np.float16:
        logger.warning("Ignoring token cache %s of shape %s (expected %s); recomputing", target, cached.shape, shape)
        return None
    return cached
