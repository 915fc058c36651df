"""AnomalyDINO (Damm et al., WACV 2025): keep the training tokens; score = distance to the nearest one.

``anomalydino`` keeps every training token; ``anomalydino-Nshot`` keeps the tokens of N seeded training
images (``anomalydino-1shot`` is the paper's few-shot setting). For the cosine metric the bank is
L2-normalised once at fit time, in chunks straight from the float16 token store: one float32 copy, never
two, and never re-normalised per query.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import torch

from normdino.errors import InputError, ModelFileError
from normdino.features.tokens import FeatureRequest, Tokens, TokenSet
from normdino.methods.base import NormativeMethod, Param, require
from normdino.methods.registry import register
from normdino.methods.scoring import DISTANCES, nearest_prototype, normalized_rows

logger = logging.getLogger(__name__)

LAYER = Param("layer", int, "backbone layer whose patch tokens the method uses (hidden_states index; -1 = last)")
METRIC = Param("metric", str, "distance between tokens", choices=DISTANCES)
SEED = Param("seed", int, "random seed (few-shot image choice, coreset start, mixture initialisation)")


def bank_rows(tokens: np.ndarray, metric: str, device: torch.device | str) -> torch.Tensor:
    """(N, D) float32 bank on ``device`` from (N, D) float16 rows: normalised for cosine, copied once either way."""
    if metric == "cosine":
        return normalized_rows(tokens, device)
    out = torch.empty(tokens.shape, dtype=torch.float32, device=device)
    step = max(1, (1 << 24) // max(1, tokens.shape[1]))
    for start in range(0, tokens.shape[0], step):
        out[start:start + step] = torch.from_numpy(np.array(tokens[start:start + step], dtype=np.float32)).to(device)
    return out


def _shots(variant: str) -> dict:
    match = re.fullmatch(r"(\d+)shot", variant)
    if not match or int(match.group(1)) < 1:
        raise InputError(f"anomalydino variants are anomalydino-Nshot with N ≥ 1 (e.g. anomalydino-1shot), got {variant!r}")
    return {"shots": int(match.group(1))}


@register("anomalydino", variants=_shots, examples=("anomalydino", "anomalydino-1shot"))
class MemoryBank(NormativeMethod):
    """AnomalyDINO memory bank: every training token (``shots=0``) or those of ``shots`` seeded images."""

    PARAMS = (
        Param("shots", int, "AnomalyDINO: number of training images in the bank (0 = all)", minimum=0),
        METRIC, LAYER, SEED,
    )

    def __init__(self, shots: int = 0, metric: str = "cosine", layer: int = -1, seed: int = 0) -> None:
        self.shots = shots
        self.metric = metric
        self.layer = layer
        self.seed = seed

    def feature_request(self) -> FeatureRequest:
        return FeatureRequest(layers=(self.layer,))

    def chosen_images(self, n_images: int) -> np.ndarray:
        """Indices of the training images kept in the bank (all, or ``shots`` seeded ones in file order)."""
        if not self.shots or self.shots >= n_images:
            return np.arange(n_images)
        return np.sort(np.random.default_rng(self.seed).choice(n_images, self.shots, replace=False))

    def fit(self, train: TokenSet, val: TokenSet | None = None) -> "MemoryBank":
        """Keep the (normalised) tokens of the chosen training images as the bank."""
        self.check_params()
        device = getattr(self, "device", "cpu")
        chosen = self.chosen_images(len(train))
        layer = train.patches[:, -1] if len(chosen) == len(train) else train.patches[chosen, -1]
        self.bank_ = bank_rows(layer.reshape(-1, layer.shape[-1]), self.metric, device)
        self.fit_info_ = {"n_bank_images": int(len(chosen)), "n_prototypes": self.n_prototypes}
        logger.info("%s: %d tokens of %d images in the bank", self.name or "anomalydino", self.n_prototypes, len(chosen))
        return self

    @property
    def n_prototypes(self) -> int:
        return int(self.bank_.shape[0]) if hasattr(self, "bank_") else 0

    def nearest(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(distance, bank index) of the nearest bank token, per token (..., D)."""
        self.check_fitted("bank_")
        return nearest_prototype(tokens, self.bank_, self.metric, prototypes_normalized=self.metric == "cosine")

    def patch_scores(self, tokens: Tokens) -> torch.Tensor:
        return self.nearest(tokens.layer(-1))[0]

    def state_dict(self) -> dict[str, torch.Tensor]:
        self.check_fitted("bank_")
        return {"bank": self.bank_.cpu().contiguous()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], info: dict | None = None) -> "MemoryBank":
        require(tensors, ("bank",), self.name or "memory bank")
        bank = tensors["bank"]
        if bank.ndim != 2 or bank.shape[0] == 0 or bank.shape[1] < 2:
            raise ModelFileError(f"the memory bank has shape {tuple(bank.shape)}, expected (N, D) with N ≥ 1")
        if self.metric == "cosine":
            norms = bank.float().norm(dim=1)
            if not bool(((norms - 1).abs() < 1e-3).all()):
                raise ModelFileError("the cosine memory bank holds rows that are not unit vectors; the file is corrupt")
        self.bank_ = bank.float().to(getattr(self, "device", "cpu"))
        self.fit_info_ = dict(info or {})
        return self


def greedy_coreset(features: torch.Tensor, count: int, seed: int = 0, projection_dim: int | None = 128,
                   max_chunk_elements: int = 1 << 24) -> torch.Tensor:
    """Indices (in selection order) of a k-center greedy coreset of ``count`` rows, on the rows' device.

    As PatchCore: Euclidean distances on a seeded Gaussian random projection to ``projection_dim``
    dimensions (None or ≥ D: none); the first centre is a seeded random row and each next one the row
    farthest from all chosen so far (a 2-approximation of the optimal covering radius). O(N · count · d).
    """
    total, dim = features.shape
    device = features.device
    generator = torch.Generator().manual_seed(seed)
    if projection_dim is not None and projection_dim < dim:
        projection = (torch.randn(dim, projection_dim, generator=generator) / projection_dim ** 0.5).to(device)
        projected = torch.empty(total, projection_dim, device=device)
        rows = max(1, max_chunk_elements // dim)
        for r in range(0, total, rows):
            projected[r:r + rows] = features[r:r + rows].float() @ projection
    else:
        projected = features.float()
    squared = (projected * projected).sum(1)
    first = int(torch.randint(total, (1,), generator=generator))
    selected = [first]
    with torch.no_grad():
        min_dist = (squared + squared[first] - 2.0 * (projected @ projected[first])).clamp_min_(0.0)
        min_dist[first] = -1.0  # never pick a centre twice
        for _ in range(count - 1):
            nxt = int(torch.argmax(min_dist))
            selected.append(nxt)
            torch.minimum(min_dist, (squared + squared[nxt] - 2.0 * (projected @ projected[nxt])).clamp_min_(0.0), out=min_dist)
            min_dist[nxt] = -1.0
    return torch.tensor(selected, dtype=torch.long, device=device)


def coreset_count(size: str, total: int) -> int:
    """Rows to keep for a coreset size written as a count ("1024") or a percentage ("10%")."""
    text = str(size).strip()
    try:
        if text.endswith("%"):
            fraction = float(text[:-1]) / 100
            if not 0 < fraction <= 1:
                raise ValueError(text)
            return max(1, int(np.ceil(fraction * total)))
        count = int(text)
        if count < 1:
            raise ValueError(text)
        return min(count, total)
    except ValueError:
        raise InputError(f"a coreset size is a count ≥ 1 (e.g. 1024) or a percentage in (0, 100] (e.g. 10%), got {size!r}") from None


def _coreset_size(variant: str) -> dict:
    coreset_count(variant, 1)  # validates the text
    return {"coreset_size": variant}


@register("patchcore", variants=_coreset_size, examples=("patchcore-10%", "patchcore-1024", "patchcore-150"))
class Coreset(MemoryBank):
    """PatchCore-style bank: a greedy k-center subset of all training tokens (count or percentage)."""

    PARAMS = (
        Param("coreset_size", str, "PatchCore: tokens kept, a count (1024) or a percentage (10%)"),
        Param("projection_dim", int, "PatchCore: random projection dimension for the greedy selection", minimum=1),
        METRIC, LAYER, SEED,
    )

    def __init__(self, coreset_size: str = "10%", projection_dim: int = 128, metric: str = "cosine",
                 layer: int = -1, seed: int = 0) -> None:
        self.coreset_size = coreset_size
        self.projection_dim = projection_dim
        self.metric = metric
        self.layer = layer
        self.seed = seed
        self.shots = 0

    def get_params(self) -> dict:
        return {p.name: getattr(self, p.name) for p in self.PARAMS}

    def fit(self, train: TokenSet, val: TokenSet | None = None) -> "Coreset":
        """Select the coreset among the (normalised, for cosine) training tokens and keep it as the bank."""
        self.check_params()
        super().fit(train, val)
        count = coreset_count(self.coreset_size, self.bank_.shape[0])
        self.indices_ = greedy_coreset(self.bank_, count, self.seed, self.projection_dim)
        total = self.bank_.shape[0]
        self.bank_ = self.bank_[self.indices_].clone()
        self.fit_info_ = {"n_train_tokens": int(total), "n_prototypes": self.n_prototypes}
        logger.info("%s: kept %d of %d tokens", self.name or "patchcore", self.n_prototypes, total)
        return self
