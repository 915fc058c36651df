"""The DPMM method (Schulthess & Konukoglu, MICCAI 2025): a Dirichlet process mixture of healthy patch tokens.

Fit: batched EM over all training tokens (batches of 12 random whole images, 40 epochs), keeping the epoch
with the best mean log-likelihood on the healthy validation tokens. Score: 1 − max cosine to the means of the active
components (``cosine``, the paper's), or the Euclidean distance to the nearest mean, or minus the
log-density of the best component (``likelihood``), for the paper's ablation.
"""

from __future__ import annotations

import copy
import logging
import time

import torch
from tqdm.auto import tqdm

from normdino import distributed as dist
from normdino.errors import InputError, ModelFileError
from normdino.features.tokens import FeatureRequest, Tokens, TokenSet
from normdino.methods.base import NormativeMethod, Param
from normdino.methods.memory_bank import LAYER, SEED
from normdino.methods.mixture import COVARIANCE_TYPES, ActiveComponents, DirichletProcessMixture
from normdino.methods.registry import register
from normdino.methods.scoring import DISTANCES, SCORE_METHODS, negative_best_likelihood, score_tokens

logger = logging.getLogger(__name__)

_VAL_CHUNK = 16384
"""Validation rows scored at a time: 25 MB of float32 at D = 384 (65 536 rows held 100 MB, a peak that grew with the
validation set up to that size)."""


def _score_variant(variant: str) -> dict:
    if variant not in SCORE_METHODS:
        raise InputError(f"dpmm variants are the scores {', '.join('dpmm-' + s for s in SCORE_METHODS)}, got dpmm-{variant}")
    return {"score": variant}


def mean_log_likelihood(mixture: DirichletProcessMixture, tokens: TokenSet, device: torch.device | str,
                        position: int = -1) -> tuple[float, int]:
    """(sum of the mixture log-likelihood, count) over every token of one layer, scored in chunks on ``device``."""
    flat = tokens.flat_layer(position)
    total = 0.0
    for start in range(0, flat.shape[0], _VAL_CHUNK):
        chunk = torch.from_numpy(flat[start:start + _VAL_CHUNK].astype("float32")).to(device)
        total += float(mixture.score_samples(chunk).double().sum())
    return total, int(flat.shape[0])


@register("dpmm", variants=_score_variant, examples=("dpmm", "dpmm-euclidean", "dpmm-likelihood"))
class DPMM(NormativeMethod):
    """Dirichlet process mixture over L2-normalised patch tokens of one layer; prototypes = active component means."""

    PARAMS = (
        Param("n_components", int, "DPMM: truncation K of the Dirichlet process mixture", flag="--components", minimum=1),
        Param("covariance_type", str, "DPMM: covariance of each component", flag="--covariance", choices=COVARIANCE_TYPES),
        Param("epochs", int, "DPMM: EM epochs over the training tokens", minimum=1),
        Param("batch_images", int, "DPMM: images per EM batch (the paper: 12)", minimum=1),
        Param("update_rate", float, "DPMM: EMA rate rho of the batched EM statistics", minimum=1e-9),
        Param("alpha", float, "DPMM: initial concentration alpha", minimum=1e-9),
        Param("weight_threshold", float, "DPMM: components with weight above this are prototypes", minimum=0.0),
        Param("score", str, "DPMM: anomaly score of a token", choices=SCORE_METHODS),
        LAYER, SEED,
    )
    #: under torchrun each rank fits on its own share: one all-reduce of the EM statistics per step (distributed.fit_method)
    fits_shards = True

    def __init__(self, n_components: int = 500, covariance_type: str = "diag", epochs: int = 40, batch_images: int = 12,
                 update_rate: float = 0.2, alpha: float = 2.0, weight_threshold: float = 1e-6, score: str = "cosine",
                 layer: int = -1, seed: int = 0) -> None:
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.epochs = epochs
        self.batch_images = batch_images
        self.update_rate = update_rate
        self.alpha = alpha
        self.weight_threshold = weight_threshold
        self.score = score
        self.layer = layer
        self.seed = seed

    def feature_request(self) -> FeatureRequest:
        return FeatureRequest(layers=(self.layer,))

    def _mixture(self) -> DirichletProcessMixture:
        return DirichletProcessMixture(
            n_components=self.n_components, covariance_type=self.covariance_type, update_rate=self.update_rate,
            alpha=self.alpha, weight_threshold=self.weight_threshold, seed=self.seed,
            device=getattr(self, "device", None))

    def fit(self, train: TokenSet, val: TokenSet | None = None, progress: bool = False) -> "DPMM":
        """Batched EM over the training tokens; keep the epoch with the best validation log-likelihood.

        Without ``val`` the last epoch is kept. ``progress`` shows one bar over the epochs.
        """
        self.check_params()
        device = getattr(self, "device", "cpu")
        h, w = train.grid_shape
        mixture = self._mixture()
        history: list[float] = []
        best: dict = {}
        bar = tqdm(total=self.epochs, desc="DPMM EM", unit="epoch", disable=not progress or not dist.is_main())

        read_seconds: list[float] = []

        def keep_best(epoch: int, model: DirichletProcessMixture) -> bool:
            bar.update(1)
            read_seconds.append(round(model.read_seconds_, 4))
            if val is None:
                return False
            total, count = mean_log_likelihood(model, val, device)
            # under torchrun: summed over every rank's validation share, so all ranks keep the same epoch
            loglik = dist.global_mean(total, count) if dist.is_distributed() else total / max(1, count)
            history.append(loglik)
            bar.set_postfix(val_loglik=f"{loglik:.2f}", active=int(model.active_.sum()))
            logger.info("epoch %d: mean validation log-likelihood %.4f", epoch + 1, loglik)
            if not best or loglik > best["loglik"]:
                best.update(loglik=loglik, epoch=epoch, model=copy.deepcopy(model))
            return False

        started = time.perf_counter()
        try:
            # each batch is batch_images whole images, each read from the token store in one piece
            mixture.fit(train.flat_layer(-1), epochs=self.epochs, batch_size=self.batch_images * h * w,
                        shuffle=True, callback=keep_best, distributed=dist.is_distributed(), block_rows=h * w)
        finally:
            bar.close()
        self.mixture_ = best.get("model", mixture)
        self.released_ = False
        self._set_prototypes()
        best_epoch = int(best.get("epoch", self.epochs - 1))
        self.fit_info_ = {"best_epoch": best_epoch + 1, "val_log_likelihood": history,
                          "em_seconds": round(time.perf_counter() - started, 3), "em_read_seconds": read_seconds,
                          "n_prototypes": self.n_prototypes,
                          "n_train_tokens": int(dist.global_sum(len(train) * h * w))}
        logger.info("DPMM: %d prototypes (best epoch %d)", self.n_prototypes, best_epoch + 1)
        return self

    def _set_prototypes(self) -> None:
        """What scoring reads: the active means; for the likelihood score the active components (one copy of the means)."""
        if self.score in DISTANCES:
            self.prototypes_ = self.mixture_.prototypes().float()
            self.__dict__.pop("scoring_mixture_", None)
        else:
            self.scoring_mixture_ = ActiveComponents(self.mixture_)
            self.prototypes_ = self.scoring_mixture_.means_.float()

    @property
    def n_prototypes(self) -> int:
        return int(self.prototypes_.shape[0]) if hasattr(self, "prototypes_") else 0

    def patch_scores(self, tokens: Tokens) -> torch.Tensor:
        self.check_fitted("prototypes_")
        layer = tokens.layer(-1)
        if self.score in DISTANCES:
            return score_tokens(layer, self.prototypes_, self.score)
        return negative_best_likelihood(layer, self.scoring_mixture_)

    def to(self, device: torch.device | str) -> "DPMM":
        self.device = device
        if hasattr(self, "mixture_"):
            self.mixture_.to(device)
        if hasattr(self, "scoring_mixture_"):
            self.scoring_mixture_.to(device)
            self.prototypes_ = self.scoring_mixture_.means_.float()  # one copy of the active means
        elif hasattr(self, "prototypes_"):
            self.prototypes_ = self.prototypes_.to(device)
        return self

    def scoring_state(self) -> dict[str, torch.Tensor]:
        """The tensors scoring reads: the active means (cosine, Euclidean), or for the likelihood score the active
        components' means, covariances and log weights."""
        self.check_fitted("prototypes_")
        if self.score in DISTANCES:
            return {"prototypes": self.prototypes_}
        active = self.scoring_mixture_
        return {"means": active.means_, "covariances": active.covariances_, "log_weights": active.log_weights_}

    def scoring_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.scoring_state().values())

    def state_bytes(self) -> int:
        if getattr(self, "released_", False):
            return self.saved_bytes_
        return super().state_bytes()

    def release_fit_state(self) -> "DPMM":
        """Keep what scoring reads (see :meth:`scoring_state`); drop the EM state of all ``n_components``
        components (means, variances, sticks and three running statistics)."""
        self.check_fitted("prototypes_")
        if not getattr(self, "released_", False):
            self.saved_bytes_ = self.state_bytes()
            del self.mixture_
            self.released_ = True
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        if getattr(self, "released_", False):
            raise InputError("this DPMM was loaded to predict and keeps only what scoring reads; load the model with "
                             "keep_fit_state=True to save it or continue its fit")
        self.check_fitted("mixture_")
        tensors = {f"mixture.{k}": v for k, v in self.mixture_.to_tensors().items()}
        tensors["prototypes"] = self.prototypes_.cpu().contiguous()
        return tensors

    def load_state_dict(self, tensors: dict[str, torch.Tensor], info: dict | None = None) -> "DPMM":
        mixture_tensors = {k.removeprefix("mixture."): v for k, v in tensors.items() if k.startswith("mixture.")}
        config = self._mixture().get_config()
        mixture = DirichletProcessMixture.from_tensors(mixture_tensors, config)
        sticks = mixture.sticks_
        if bool(((sticks < 0) | (sticks > 1)).any()):
            raise ModelFileError("the mixture's stick-breaking ratios lie outside [0, 1]; the file is corrupt")
        if bool((mixture.covariances_ <= 0).any()) and self.covariance_type != "full":
            raise ModelFileError("the mixture holds non-positive variances; the file is corrupt")
        if bool((mixture.stat_count_ < 0).any()):
            raise ModelFileError("the mixture holds negative component counts; the file is corrupt")
        self.mixture_ = mixture
        self.released_ = False
        self._set_prototypes()
        if self.n_prototypes == 0:
            raise ModelFileError("the mixture has no active component; the file is corrupt")
        if "prototypes" in tensors and not torch.equal(tensors["prototypes"].float(), self.prototypes_):
            raise ModelFileError("the stored prototypes do not match the stored mixture; the file is corrupt")
        self.fit_info_ = dict(info or {})
        device = getattr(self, "device", None)
        if device is not None:
            self.to(device)
        return self
