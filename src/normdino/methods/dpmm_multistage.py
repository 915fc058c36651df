"""dpmm-multistage: the DPMM method on several backbone stages at once, fused like HiMatch (beyond both papers).

One Dirichlet process mixture per stage (the ``dpmm`` method on that stage's tokens, with its validation
epoch selection), each giving a map 1 − max cosine to its active component means; the stage maps are combined
by HiMatch's fusion rules (:mod:`normdino.methods.himatch`): inverse healthy variance per stage
(``uncertainty``, default), per grid position (``pixel``) or the plain mean (``mean``). The healthy statistics
come from ``reliability_images`` seeded training images scored in-sample (a mixture of ~10⁵–10⁶ tokens barely
remembers one image, and the weights only compare stages with each other). Default stages 3 6 9 12, as HiMatch.
"""

from __future__ import annotations

import logging
import time

import torch

from normdino.errors import InputError, ModelFileError
from normdino.features.tokens import FeatureRequest, Tokens, TokenSet, pick_layers
from normdino.methods.base import NormativeMethod
from normdino.methods.dpmm import DPMM
from normdino.methods.himatch import (
    FUSION_PARAM, LAYERS_PARAM, RELIABILITY_PARAM, fuse, fused_score_range, fusion_statistics, fusion_weights,
    reliability_sample,
)
from normdino.methods.registry import register

logger = logging.getLogger(__name__)

_SHARED = ("n_components", "covariance_type", "epochs", "batch_images", "update_rate", "alpha", "weight_threshold", "seed")
_STAT_KEYS = ("stage_mean", "stage_std", "pixel_mean", "pixel_std")
_BATCH = 16


@register("dpmm-multistage", examples=("dpmm-multistage",))
class DPMMMultistage(NormativeMethod):
    """One DPMM per stage, 1 − max cosine to its prototypes per stage, stage maps fused by healthy reliability."""

    PARAMS = tuple(p for p in DPMM.PARAMS if p.name in _SHARED) + (LAYERS_PARAM, FUSION_PARAM, RELIABILITY_PARAM)

    def __init__(self, n_components: int = 500, covariance_type: str = "diag", epochs: int = 40, batch_images: int = 12,
                 update_rate: float = 0.2, alpha: float = 2.0, weight_threshold: float = 1e-6, seed: int = 0,
                 layers: tuple[int, ...] = (3, 6, 9, 12), fusion: str = "uncertainty", reliability_images: int = 64) -> None:
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.epochs = epochs
        self.batch_images = batch_images
        self.update_rate = update_rate
        self.alpha = alpha
        self.weight_threshold = weight_threshold
        self.seed = seed
        self.layers = tuple(layers) if isinstance(layers, (list, tuple)) else (layers,)
        self.fusion = fusion
        self.reliability_images = reliability_images

    def feature_request(self) -> FeatureRequest:
        return FeatureRequest(layers=tuple(self.layers))

    def _stage_model(self) -> DPMM:
        model = DPMM(**{name: getattr(self, name) for name in _SHARED}, score="cosine", layer=-1)
        model.name = "dpmm"
        if hasattr(self, "device"):
            model.to(self.device)
        return model

    def fit(self, train: TokenSet, val: TokenSet | None = None) -> "DPMMMultistage":
        """Fit one DPMM per stage (validation epoch selection per stage), then the healthy fusion statistics."""
        self.check_params()
        if train.n_layers != len(self.layers):
            raise InputError(f"dpmm-multistage asked for {len(self.layers)} layers but the training tokens hold {train.n_layers}")
        start = time.perf_counter()
        self.stages_ = []
        for position in range(len(self.layers)):
            logger.info("dpmm-multistage: stage %d of %d (layer %s)", position + 1, len(self.layers), self.layers[position])
            stage_val = None if val is None else pick_layers(val, [position])
            self.stages_.append(self._stage_model().fit(pick_layers(train, [position]), stage_val))
        sample = reliability_sample(len(train), self.reliability_images, self.seed)
        device = getattr(self, "device", "cpu")
        maps = [self._stage_maps(train.subset(sample[s:s + _BATCH]).batch(0, _BATCH, device))
                for s in range(0, len(sample), _BATCH)]
        stats = fusion_statistics(torch.cat(maps))
        for key, value in stats.items():
            setattr(self, key + "_", value)
        self.fit_info_ = {
            "stages": [stage.fit_info() for stage in self.stages_],
            "reliability_images": int(len(sample)),
            "stage_weights": [round(float(v), 6) for v in fusion_weights(stats, "uncertainty")],
            "stage_healthy_std": [round(float(v), 6) for v in stats["stage_std"]],
            "fit_seconds": round(time.perf_counter() - start, 3),
        }
        return self

    def _stage_maps(self, tokens: Tokens) -> torch.Tensor:
        """(B, L, h, w): each stage's DPMM map."""
        if tokens.patches.shape[1] != len(self.stages_):
            raise InputError(f"dpmm-multistage expects {len(self.stages_)} layers per token batch, got {tokens.patches.shape[1]}")
        return torch.stack([stage.patch_scores(Tokens(tokens.patches[:, i:i + 1])) for i, stage in enumerate(self.stages_)], 1)

    def patch_scores(self, tokens: Tokens) -> torch.Tensor:
        self.check_fitted("stages_")
        with torch.no_grad():
            return fuse(self._stage_maps(tokens), {k: getattr(self, k + "_") for k in _STAT_KEYS}, self.fusion)

    @property
    def score_range(self) -> tuple[float, float] | None:
        return fused_score_range(self.fusion)

    @property
    def n_prototypes(self) -> int:
        return sum(stage.n_prototypes for stage in getattr(self, "stages_", []))

    def to(self, device: torch.device | str) -> "DPMMMultistage":
        self.device = device
        for stage in getattr(self, "stages_", []):
            stage.to(device)
        for key in _STAT_KEYS:
            if hasattr(self, key + "_"):
                setattr(self, key + "_", getattr(self, key + "_").to(device))
        return self

    def _statistics_bytes(self) -> int:
        return sum(getattr(self, k + "_").numel() * getattr(self, k + "_").element_size() for k in _STAT_KEYS)

    def scoring_bytes(self) -> int:
        """Each stage's scoring state plus the per-stage fusion statistics."""
        self.check_fitted("stages_")
        return sum(stage.scoring_bytes() for stage in self.stages_) + self._statistics_bytes()

    def state_bytes(self) -> int:
        self.check_fitted("stages_")
        return sum(stage.state_bytes() for stage in self.stages_) + self._statistics_bytes()

    def release_fit_state(self) -> "DPMMMultistage":
        """Every stage keeps only what it scores with (see :meth:`DPMM.release_fit_state`)."""
        self.check_fitted("stages_")
        for stage in self.stages_:
            stage.release_fit_state()
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        self.check_fitted("stages_")
        tensors = {f"stage{i}.{k}": v for i, stage in enumerate(self.stages_) for k, v in stage.state_dict().items()}
        tensors.update({k: getattr(self, k + "_").detach().cpu().contiguous() for k in _STAT_KEYS})
        return tensors

    def load_state_dict(self, tensors: dict[str, torch.Tensor], info: dict | None = None) -> "DPMMMultistage":
        n_layers = len(self.layers)
        missing = [k for k in _STAT_KEYS if k not in tensors]
        if missing:
            raise ModelFileError(f"the dpmm-multistage state is missing tensors {', '.join(missing)}")
        stages_info = (info or {}).get("stages") or [None] * n_layers
        stages = []
        for i in range(n_layers):
            prefix = f"stage{i}."
            part = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
            if not part:
                raise ModelFileError(f"the dpmm-multistage state has no mixture for stage {i + 1} of {n_layers}")
            stages.append(self._stage_model().load_state_dict(part, stages_info[i] if i < len(stages_info) else None))
        if any(k.startswith(f"stage{n_layers}.") for k in tensors):
            raise ModelFileError(f"the dpmm-multistage state holds more than the {n_layers} stages of its parameters")
        for key in _STAT_KEYS:
            value = tensors[key].detach().cpu().float()
            expected_ndim = 1 if key.startswith("stage") else 3
            if value.ndim != expected_ndim or value.shape[0] != n_layers or not bool(torch.isfinite(value).all()):
                raise ModelFileError(f"the dpmm-multistage state tensor {key} has shape {tuple(value.shape)} or non-finite "
                                     f"values; expected {n_layers} finite stage values")
            if key.endswith("std") and bool((value < 0).any()):
                raise ModelFileError("the dpmm-multistage state holds negative standard deviations; the file is corrupt")
            setattr(self, key + "_", value)
        self.stages_ = stages
        self.fit_info_ = dict(info or {})
        if hasattr(self, "device"):
            self.to(self.device)
        return self
