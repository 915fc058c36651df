"""Scoring: patch tokens -> patch anomaly map -> pixel anomaly map -> image score.

All functions are pure: they take tokens and prototypes (or a mixture) and return tensors/arrays.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from normdino.errors import InputError

SCORE_METHODS = ("cosine", "euclidean", "likelihood")
DISTANCES = ("cosine", "euclidean")

_CHUNK = 65536  # tokens scored per call of the mixture: bounds memory at chunk x K floats


def _as_tokens(tokens: torch.Tensor | np.ndarray, name: str = "tokens") -> torch.Tensor:
    t = torch.as_tensor(tokens)
    if t.ndim < 1 or t.shape[-1] == 0:
        raise InputError(f"{name} must have shape (..., D) with D > 0, got {tuple(t.shape)}.")
    return t if t.is_floating_point() else t.float()


def nearest_prototype(
    tokens: torch.Tensor | np.ndarray,
    prototypes: torch.Tensor | np.ndarray,
    metric: str = "cosine",
    *,
    prototypes_normalized: bool = False,
    max_chunk_elements: int = 1 << 24,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance to the nearest prototype and its index, per token, computed on the tokens' device.

    cosine: 1 − max cosine similarity (tokens, and prototypes unless ``prototypes_normalized``, are
    L2-normalised chunk by chunk); euclidean: min ‖x − p‖ via ‖x‖² + ‖p‖² − 2 x·p. Float32 over
    prototype chunks. Tokens and prototypes must be on one device: nothing is moved behind the caller's back.
    """
    if metric not in DISTANCES:
        raise InputError(f"Unknown metric {metric!r}; choose one of {', '.join(DISTANCES)}.")
    x = _as_tokens(tokens)
    protos = _as_tokens(prototypes, "prototypes")
    if protos.ndim != 2 or protos.shape[0] == 0:
        raise InputError(f"prototypes must have shape (K, D) with K > 0, got {tuple(protos.shape)}.")
    if x.shape[-1] != protos.shape[1]:
        raise InputError(f"tokens have dimension {x.shape[-1]} but prototypes have {protos.shape[1]}; use the same backbone for both.")
    if x.device != protos.device:
        raise InputError(f"tokens are on {x.device} but prototypes on {protos.device}; move the method with .to(device).")
    batch_shape = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1]).float()
    m, k = x.shape[0], protos.shape[0]
    if metric == "cosine":
        x = F.normalize(x, dim=1)
    query_chunk = max(1, min(m, 4096))
    proto_chunk = max(1, min(k, max_chunk_elements // query_chunk))
    best = torch.full((m,), -math.inf if metric == "cosine" else math.inf, device=x.device)
    best_index = torch.zeros(m, dtype=torch.long, device=x.device)
    with torch.no_grad():
        for q0 in range(0, m, query_chunk):
            q = x[q0:q0 + query_chunk]
            q_sq = (q * q).sum(1, keepdim=True) if metric == "euclidean" else None
            best_q, index_q = best[q0:q0 + query_chunk], best_index[q0:q0 + query_chunk]
            for p0 in range(0, k, proto_chunk):
                p = protos[p0:p0 + proto_chunk].float()
                if metric == "cosine":
                    values, idx = (q @ (p if prototypes_normalized else F.normalize(p, dim=1)).T).max(dim=1)
                    better = values > best_q
                else:
                    d2 = q_sq + (p * p).sum(1) - 2.0 * (q @ p.T)
                    values, idx = d2.min(dim=1)
                    better = values < best_q
                # torch.where, not boolean indexing: no data-dependent shapes, no host synchronisation on a GPU
                best_q.copy_(torch.where(better, values, best_q))
                index_q.copy_(torch.where(better, idx + p0, index_q))
    distance = 1.0 - best if metric == "cosine" else best.clamp_min(0.0).sqrt()
    return distance.reshape(batch_shape), best_index.reshape(batch_shape)


def score_tokens(
    tokens: torch.Tensor | np.ndarray,
    prototypes: torch.Tensor | np.ndarray,
    metric: str = "cosine",
    *,
    max_chunk_elements: int = 1 << 24,
) -> torch.Tensor:
    """Anomaly score per token = distance to the nearest prototype (see :func:`nearest_prototype`)."""
    return nearest_prototype(tokens, prototypes, metric, max_chunk_elements=max_chunk_elements)[0]


def normalized_rows(rows: np.ndarray | torch.Tensor, device: torch.device | str = "cpu",
                    max_chunk_elements: int = 1 << 24) -> torch.Tensor:
    """(N, D) float32 L2-normalised copy of ``rows`` (e.g. a float16 memory map) on ``device``, one chunk at a time.

    The only copy made: no intermediate float32 copy of the whole input.
    """
    n, d = rows.shape
    out = torch.empty((n, d), dtype=torch.float32, device=device)
    step = max(1, max_chunk_elements // max(1, d))
    for start in range(0, n, step):
        part = rows[start:start + step]
        chunk = torch.from_numpy(np.array(part, dtype=np.float32)) if isinstance(part, np.ndarray) else part
        out[start:start + step] = F.normalize(chunk.to(device=device, dtype=torch.float32), dim=1)
    return out


def negative_best_likelihood(tokens: torch.Tensor, mixture) -> torch.Tensor:
    """Minus the log-density of the most likely active component (weight included): the ablation's likelihood score."""
    flat = tokens.reshape(-1, tokens.shape[-1]).float()
    active = mixture.active_
    log_weights = mixture.log_weights_.float()[active]
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
    for start in range(0, flat.shape[0], _CHUNK):
        log_prob = mixture.log_prob_components(flat[start:start + _CHUNK])[:, active].float()
        out[start:start + _CHUNK] = -(log_prob + log_weights).max(dim=1).values
    return out.reshape(tokens.shape[:-1])


def patch_scores(tokens: torch.Tensor, method: str, prototypes: torch.Tensor, mixture=None) -> torch.Tensor:
    """Anomaly score of every token (..., D) by the named method (see ``SCORE_METHODS``)."""
    if method in DISTANCES:
        return score_tokens(tokens, prototypes, method)
    if method == "likelihood":
        if mixture is None:
            raise ValueError("the likelihood score needs the fitted mixture")
        return negative_best_likelihood(tokens, mixture)
    raise ValueError(f"unknown score method {method!r}; choose one of {', '.join(SCORE_METHODS)}")


def upsample(patch_map: torch.Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of an (h, w) patch map to the image size (H, W), as float32."""
    grid = torch.as_tensor(patch_map, dtype=torch.float32)[None, None]
    return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def smooth(pixel_map: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of a pixel map (sigma in pixels of the original image; 0 leaves it unchanged)."""
    if sigma <= 0:
        return pixel_map
    from scipy.ndimage import gaussian_filter  # only when smoothing: scipy.ndimage costs ~0.3 s at start-up

    return gaussian_filter(pixel_map, sigma=sigma, mode="nearest").astype(np.float32, copy=False)


def pixel_map(patch_map: torch.Tensor | np.ndarray, size: tuple[int, int], sigma: float = 0.0) -> np.ndarray:
    """Patch map -> pixel map at the original image size, optionally smoothed."""
    return smooth(upsample(patch_map, size), sigma)


def batch_pixel_maps(patch_maps: torch.Tensor, shapes: list[tuple[int, int]], sigma: float = 0.0) -> list[np.ndarray]:
    """Pixel maps of a batch of (B, h, w) patch maps, upsampled where the maps are (on a GPU: on the device).

    Images of one size are upsampled in one call and cross to the host once, instead of one call per image
    holding Python's lock; each map is bit for bit :func:`pixel_map`'s (bilinear interpolation computes every
    pixel from its own four neighbours, whatever the batch). Images of several sizes go one by one.
    """
    maps = patch_maps.float()
    if len(shapes) > 1 and len({tuple(s) for s in shapes}) == 1:
        size = tuple(int(v) for v in shapes[0])
        with torch.no_grad():
            upsampled = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        return [smooth(plane, sigma) for plane in upsampled.cpu().numpy()]
    return [pixel_map(plane.cpu(), tuple(shape), sigma) for plane, shape in zip(maps, shapes)]


def pixel_maps(patch_scores: Callable, tokens, sigma: float = 0.0, device: torch.device | str = "cpu",
               chunk: int = 32) -> Iterator[np.ndarray]:
    """Pixel map of each image of a token set, scoring ``chunk`` images at a time on ``device`` (bounded memory).

    ``tokens`` is a :class:`normdino.features.tokens.TokenSet`; ``patch_scores`` maps its float32
    :class:`Tokens` batches to (B, h, w) scores. The one chunked loop for calibration and evaluation.
    """
    for start in range(0, len(tokens), chunk):
        maps = patch_scores(tokens.batch(start, start + chunk, device)).float().cpu()
        for patch_map, shape in zip(maps, tokens.shapes[start:start + chunk]):
            yield pixel_map(patch_map, shape, sigma)


def image_score(pixel_scores: np.ndarray, top_fraction: float = 0.01) -> float:
    """Mean of the top ``top_fraction`` of pixel scores (at least one pixel): the image-level anomaly score."""
    flat = np.asarray(pixel_scores, dtype=np.float32).ravel()
    k = max(1, int(round(top_fraction * flat.size)))
    return float(np.partition(flat, flat.size - k)[flat.size - k:].mean())
