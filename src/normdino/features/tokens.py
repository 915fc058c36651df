"""Token containers shared by every method: a batch on a device, and a (memory-mapped) set of many images.

Axis L holds the layers a method asked for, in the order it asked (see :class:`FeatureRequest`), so a
method indexes layers by position and never needs to know how the backbone numbers its blocks.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

from normdino.errors import InputError


@dataclass(frozen=True)
class FeatureRequest:
    """What a method needs from one backbone forward pass.

    ``layers`` are ``hidden_states`` indices as in ``transformers`` (0 = embeddings, n = last block; negative
    counts from the end, so -1 is the last block, after the final norm); ``cls`` asks for the CLS tokens too.
    """

    layers: tuple[int, ...] = (-1,)
    cls: bool = False

    def __post_init__(self) -> None:
        if not self.layers:
            raise InputError("a method must request at least one layer")
        object.__setattr__(self, "layers", tuple(int(layer) for layer in self.layers))


@dataclass
class Tokens:
    """Tokens of a batch of B images: patch grids (B, L, h, w, D) and, when requested, CLS tokens (B, L, D)."""

    patches: torch.Tensor
    cls: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.patches.ndim == 4:  # (B, h, w, D): one layer
            self.patches = self.patches[:, None]
        if self.patches.ndim != 5:
            raise InputError(f"patch tokens must have shape (B, L, h, w, D), got {tuple(self.patches.shape)}")
        if self.cls is not None and self.cls.ndim == 2:
            self.cls = self.cls[:, None]

    def __len__(self) -> int:
        return int(self.patches.shape[0])

    @property
    def device(self) -> torch.device:
        return self.patches.device

    @property
    def grid_shape(self) -> tuple[int, int]:
        return int(self.patches.shape[2]), int(self.patches.shape[3])

    def layer(self, position: int = -1) -> torch.Tensor:
        """(B, h, w, D) patch tokens of one requested layer, by position in the request."""
        return self.patches[:, position]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = torch.float32) -> "Tokens":
        """A copy on ``device`` (float32 unless ``dtype`` says otherwise)."""
        cls = None if self.cls is None else self.cls.to(device=device, dtype=dtype)
        return Tokens(self.patches.to(device=device, dtype=dtype), cls)


@dataclass
class TokenSet:
    """Float16 tokens of N images (often a read-only memory map of the token cache), with sizes and sources.

    ``patches`` is (N, L, h, w, D); ``cls`` is (N, L, D) or None; ``shapes`` holds each image's (H, W);
    ``sources`` names the file or volume each image came from, so splits never separate slices of one volume.
    """

    patches: np.ndarray
    shapes: list[tuple[int, int]]
    cls: np.ndarray | None = None
    sources: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.patches.ndim == 4:
            self.patches = self.patches[:, None]
        if self.patches.ndim != 5:
            raise InputError(f"a token set must have shape (N, L, h, w, D), got {tuple(self.patches.shape)}")
        if self.cls is not None and self.cls.ndim == 2:
            self.cls = self.cls[:, None]
        if len(self.shapes) != len(self.patches):
            raise InputError(f"{len(self.patches)} token grids but {len(self.shapes)} image sizes")
        if not self.sources:
            self.sources = [str(i) for i in range(len(self.patches))]

    def __len__(self) -> int:
        return int(self.patches.shape[0])

    @property
    def grid_shape(self) -> tuple[int, int]:
        return int(self.patches.shape[2]), int(self.patches.shape[3])

    @property
    def dim(self) -> int:
        return int(self.patches.shape[-1])

    @property
    def n_layers(self) -> int:
        return int(self.patches.shape[1])

    def subset(self, indices: Sequence[int] | np.ndarray) -> "TokenSet":
        """The images at ``indices`` (copied into memory)."""
        idx = np.asarray(indices, dtype=np.int64)
        cls = None if self.cls is None else self.cls[idx]
        return TokenSet(self.patches[idx], [self.shapes[i] for i in idx], cls, [self.sources[i] for i in idx])

    def batch(self, start: int, stop: int, device: torch.device | str = "cpu") -> Tokens:
        """Images ``start:stop`` as float32 :class:`Tokens` on ``device``."""
        with warnings.catch_warnings():  # read-only memory maps: torch warns, but nobody writes to them
            warnings.simplefilter("ignore", UserWarning)
            patches = torch.from_numpy(np.ascontiguousarray(self.patches[start:stop]))
            cls = None if self.cls is None else torch.from_numpy(np.ascontiguousarray(self.cls[start:stop]))
        return Tokens(patches, cls).to(device)

    def batches(self, size: int, device: torch.device | str = "cpu") -> Iterator[Tokens]:
        """Consecutive batches of at most ``size`` images as float32 tokens on ``device``."""
        for start in range(0, len(self), size):
            yield self.batch(start, start + size, device)

    def flat_layer(self, position: int = -1) -> np.ndarray:
        """(N·h·w, D) float16 tokens of one layer (a view where the memory layout allows it)."""
        layer = self.patches[:, position]
        return layer.reshape(-1, layer.shape[-1])


def pick_layers(tokens: TokenSet, positions: Sequence[int]) -> TokenSet:
    """A token set restricted to some layer positions (a view of the same memory where possible)."""
    positions = list(positions)
    cls = None if tokens.cls is None else tokens.cls[:, positions]
    return TokenSet(tokens.patches[:, positions], tokens.shapes, cls, tokens.sources)
