"""Baseline scorers on patch tokens: the AnomalyDINO memory bank, a PatchCore-style greedy coreset, ablation scores.

All scorers take tokens of shape (..., D) and return one anomaly score per token (shape ``tokens.shape[:-1]``),
higher = more anomalous. Distances are computed chunk by chunk, so memory stays bounded by
``max_chunk_elements`` similarity entries (64 MiB at float32 by default) whatever the bank size.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F

from normdino.errors import InputError
from normdino.methods.scoring import DISTANCES, _as_tokens, nearest_prototype

logger = logging.getLogger(__name__)

__all__ = ["greedy_coreset", "MemoryBank", "Coreset"]


def _check_metric(metric: str) -> None:
    if metric not in DISTANCES:
        raise InputError(f"Unknown metric {metric!r}; choose one of {', '.join(DISTANCES)}.")


def _coreset_count(n: int | float, total: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, float, np.integer, np.floating)):
        raise InputError(f"Coreset size must be a count (int) or a fraction (float in (0, 1]), got {n!r}.")
    if isinstance(n, (float, np.floating)):
        if not 0 < n <= 1:
            raise InputError(f"A coreset fraction must be in (0, 1], got {n}.")
        return max(1, int(math.ceil(n * total)))
    if n < 1:
        raise InputError(f"A coreset count must be at least 1, got {n}.")
    return min(int(n), total)


def greedy_coreset(
    tokens: torch.Tensor | np.ndarray,
    n: int | float,
    seed: int = 0,
    projection_dim: int | None = 128,
    *,
    max_chunk_elements: int = 1 << 24,
) -> torch.Tensor:
    """Indices (in selection order) of a k-center greedy coreset of ``n`` tokens (count, or fraction if float).

    As PatchCore: distances are Euclidean, computed on a random Gaussian projection to ``projection_dim``
    dimensions (Johnson–Lindenstrauss; None or ≥ D = no projection); the first centre is a seeded random
    token and each next one is the token farthest from all centres chosen so far (a 2-approximation of the
    optimal covering radius). Each step is one matrix-vector product over all tokens: O(N · n · d) time.
    """
    x = _as_tokens(tokens)
    if x.ndim != 2 or x.shape[0] == 0:
        raise InputError(f"tokens must have shape (N, D) with N > 0, got {tuple(x.shape)}.")
    total, dim = x.shape
    count = _coreset_count(n, total)
    generator = torch.Generator().manual_seed(seed)
    if projection_dim is not None and projection_dim < dim:
        projection = torch.randn(dim, projection_dim, generator=generator) / math.sqrt(projection_dim)
        rows = max(1, max_chunk_elements // dim)
        features = torch.empty(total, projection_dim)
        for r in range(0, total, rows):
            features[r:r + rows] = x[r:r + rows].float() @ projection
    else:
        features = x.float()
    squared_norms = (features * features).sum(1)
    first = int(torch.randint(total, (1,), generator=generator))
    selected = [first]
    with torch.no_grad():
        min_dist = (squared_norms + squared_norms[first] - 2.0 * (features @ features[first])).clamp_min_(0.0)
        min_dist[first] = -1.0  # never pick a centre twice
        for _ in range(count - 1):
            nxt = int(torch.argmax(min_dist))
            selected.append(nxt)
            torch.minimum(min_dist, (squared_norms + squared_norms[nxt] - 2.0 * (features @ features[nxt])).clamp_min_(0.0), out=min_dist)
            min_dist[nxt] = -1.0
    return torch.tensor(selected, dtype=torch.long)


class MemoryBank:
    """AnomalyDINO: keep every training token; score = distance to the nearest one (1 − max cosine by default).

    1-shot AnomalyDINO is the same bank fitted on the tokens of one normal image.
    """

    def __init__(self, metric: str = "cosine", dtype: torch.dtype = torch.float32, max_chunk_elements: int = 1 << 24) -> None:
        self.metric = metric
        self.dtype = dtype
        self.max_chunk_elements = max_chunk_elements

    def _prepare(self, tokens: torch.Tensor | np.ndarray) -> torch.Tensor:
        _check_metric(self.metric)
        x = _as_tokens(tokens)
        x = x.reshape(-1, x.shape[-1])
        if x.shape[0] == 0:
            raise InputError("Cannot fit a memory bank on zero tokens; pass the tokens of at least one normal image.")
        if self.metric == "cosine":  # normalise once here, in row chunks, so neither fit nor scoring holds a second copy
            out = torch.empty(x.shape, dtype=self.dtype)
            rows = max(1, self.max_chunk_elements // x.shape[1])
            for r in range(0, x.shape[0], rows):
                out[r:r + rows] = F.normalize(x[r:r + rows].float(), dim=1)
            return out
        return x.to(self.dtype)

    def fit(self, tokens: torch.Tensor | np.ndarray) -> "MemoryBank":
        """Store all tokens (shape (..., D)) as the bank."""
        self.bank_ = self._prepare(tokens)
        return self

    @property
    def n_prototypes_(self) -> int:
        """Number of tokens in the bank."""
        return int(self.bank_.shape[0])

    def _check_fitted(self) -> None:
        if not hasattr(self, "bank_"):
            raise InputError(f"This {type(self).__name__} is not fitted yet; call fit() with normal tokens first.")

    def nearest(self, tokens: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(distance, index into ``bank_``) of the nearest bank token, per token."""
        self._check_fitted()
        return nearest_prototype(tokens, self.bank_, self.metric, max_chunk_elements=self.max_chunk_elements)

    def score(self, tokens: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Anomaly score per token, shape ``tokens.shape[:-1]``."""
        return self.nearest(tokens)[0]


class Coreset(MemoryBank):
    """PatchCore-style bank: a greedy k-center subset of the training tokens (``n`` = count, or fraction if float)."""

    def __init__(
        self,
        n: int | float = 0.1,
        metric: str = "cosine",
        projection_dim: int | None = 128,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        max_chunk_elements: int = 1 << 24,
    ) -> None:
        super().__init__(metric=metric, dtype=dtype, max_chunk_elements=max_chunk_elements)
        self.n = n
        self.projection_dim = projection_dim
        self.seed = seed

    def fit(self, tokens: torch.Tensor | np.ndarray) -> "Coreset":
        """Select the coreset among the (normalised, for cosine) tokens and keep it as the bank; ``indices_`` are the picks."""
        prepared = self._prepare(tokens)
        self.indices_ = greedy_coreset(
            prepared, self.n, seed=self.seed, projection_dim=self.projection_dim, max_chunk_elements=self.max_chunk_elements
        )
        self.bank_ = prepared[self.indices_].clone()
        logger.info("Coreset: kept %d of %d tokens", self.n_prototypes_, prepared.shape[0])
        return self
