"""A fitted method as the evaluation sees it (:class:`Scorer`), and its pixel maps over a token set.

Below both the protocol (which fits and times scorers) and the assessment (which turns their maps into
metrics), so neither imports the other's internals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from normdino.features.tokens import Tokens, TokenSet
from normdino.methods import scoring


@dataclass
class Scorer:
    """A fitted method as the protocol sees it: its tokens' layer positions, and its patch scores."""

    name: str
    method: object  # a fitted normdino.methods.NormativeMethod
    positions: list[int]  # which layers of the shared tokens the method reads (in its request's order)
    fit_seconds: float = 0.0

    @property
    def n_prototypes(self) -> int:
        return int(self.method.n_prototypes)

    @property
    def scoring_state_mb(self) -> float:
        """Memory of what scoring reads (prototypes, bank; the DPMM's active means): the paper's comparison."""
        method = self.method
        return (method.scoring_bytes() if hasattr(method, "scoring_bytes") else method.state_bytes()) / 2**20

    @property
    def saved_state_mb(self) -> float:
        """The method's tensors in a model file (the DPMM's EM state of all its components included)."""
        return self.method.state_bytes() / 2**20

    def patch_maps(self, tokens: Tokens) -> torch.Tensor:
        """(B, h, w) patch scores of shared tokens (the method's own layers picked out)."""
        cls = None if tokens.cls is None else tokens.cls[:, self.positions]
        return self.method.patch_scores(Tokens(tokens.patches[:, self.positions], cls))


def scorer_pixel_maps(scorer: Scorer, tokens: TokenSet, sigma: float, device: torch.device | str = "cpu",
                      chunk: int = 32):
    """Pixel map of each image of a token set (scored ``chunk`` images at a time on ``device``)."""
    return scoring.pixel_maps(scorer.patch_maps, tokens, sigma, device, chunk)
