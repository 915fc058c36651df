"""Scoring: patch tokens -> patch anomaly map -> pixel anomaly map -> image score.

All functions are pure: they take tokens and prototypes (or a mixture) and return tensors/arrays.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

SCORE_METHODS = ("cosine", "euclidean", "likelihood")

_CHUNK = 65536  # tokens scored per matrix product: bounds memory at chunk x n_prototypes floats


def cosine_distance(tokens: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """1 - max cosine similarity of each token (..., D) to the prototypes (P, D): the paper's anomaly score."""
    flat = F.normalize(tokens.reshape(-1, tokens.shape[-1]).float(), dim=-1)
    protos = F.normalize(prototypes.float(), dim=-1)
    out = torch.empty(flat.shape[0], dtype=torch.float32)
    for start in range(0, flat.shape[0], _CHUNK):
        sims = flat[start:start + _CHUNK] @ protos.T
        out[start:start + _CHUNK] = 1.0 - sims.max(dim=1).values
    return out.reshape(tokens.shape[:-1])


def euclidean_distance(tokens: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of each token (..., D) to its nearest prototype (P, D)."""
    flat = tokens.reshape(-1, tokens.shape[-1]).float()
    protos = prototypes.float()
    proto_sq = (protos * protos).sum(dim=1)
    out = torch.empty(flat.shape[0], dtype=torch.float32)
    for start in range(0, flat.shape[0], _CHUNK):
        chunk = flat[start:start + _CHUNK]
        sq = (chunk * chunk).sum(dim=1, keepdim=True) - 2.0 * chunk @ protos.T + proto_sq
        out[start:start + _CHUNK] = sq.min(dim=1).values.clamp_min(0.0).sqrt()
    return out.reshape(tokens.shape[:-1])


def negative_best_likelihood(tokens: torch.Tensor, mixture) -> torch.Tensor:
    """Minus the log-density of the most likely active component (weight included): the ablation's likelihood score."""
    flat = tokens.reshape(-1, tokens.shape[-1]).float()
    active = mixture.active_
    log_weights = mixture.log_weights_.float()[active]
    out = torch.empty(flat.shape[0], dtype=torch.float32)
    for start in range(0, flat.shape[0], _CHUNK):
        log_prob = mixture.log_prob_components(flat[start:start + _CHUNK])[:, active].float()
        out[start:start + _CHUNK] = -(log_prob + log_weights).max(dim=1).values
    return out.reshape(tokens.shape[:-1])


def patch_scores(tokens: torch.Tensor, method: str, prototypes: torch.Tensor, mixture=None) -> torch.Tensor:
    """Anomaly score of every token (..., D) by the named method (see ``SCORE_METHODS``)."""
    if method == "cosine":
        return cosine_distance(tokens, prototypes)
    if method == "euclidean":
        return euclidean_distance(tokens, prototypes)
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
    return gaussian_filter(pixel_map, sigma=sigma, mode="nearest").astype(np.float32, copy=False)


def pixel_map(patch_map: torch.Tensor | np.ndarray, size: tuple[int, int], sigma: float = 0.0) -> np.ndarray:
    """Patch map -> pixel map at the original image size, optionally smoothed."""
    return smooth(upsample(patch_map, size), sigma)


def image_score(pixel_scores: np.ndarray, top_fraction: float = 0.01) -> float:
    """Mean of the top ``top_fraction`` of pixel scores (at least one pixel): the image-level anomaly score."""
    flat = np.asarray(pixel_scores, dtype=np.float32).ravel()
    k = max(1, int(round(top_fraction * flat.size)))
    return float(np.partition(flat, flat.size - k)[flat.size - k:].mean())


def threshold_for_fpr(normal_scores: np.ndarray, fpr: float) -> float:
    """Score above which a fraction ``fpr`` of healthy scores lies: the (1 - fpr) quantile."""
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"a false-positive rate must lie strictly between 0 and 1, got {fpr}")
    return float(np.quantile(np.asarray(normal_scores, dtype=np.float64).ravel(), 1.0 - fpr))
