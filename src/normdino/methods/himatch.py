"""HiMatch-AD: training-free retrieval of healthy references, multi-stage matching maps, uncertainty-weighted fusion.

A documented reading of the abstract of Huo, Hong, Zhou, Chen, Zhang (2026), "DINOv3-driven Hierarchical
Matching for Training-free Medical Anomaly Detection" (no code is public). The method is meant with the
DINOv3 ViT-S/16 backbone (``dinov3_vits16``); any DINOv2/DINOv3 ViT works. Every choice the abstract
leaves open is written here (and in the README, section "HiMatch"):

Stages
    ``layers`` are ``hidden_states`` indices of one forward pass, listed shallow to deep; default
    ``(3, 6, 9, 12)``: four evenly spaced blocks of a 12-block ViT (S/16, B/16). For a 24-block ViT-L
    pass ``--layers 6 12 18 24``. Every stage goes through the backbone's final LayerNorm and is
    L2-normalised. The *last* listed layer is the retrieval stage (its CLS token and patch descriptor).

Fit (training-free: nothing is optimised, no gradient is taken)
    For each healthy reference image r: its CLS token c_r (retrieval stage), a compact patch descriptor
    d_r (``descriptor="mean"``: the L2-normalised mean of its patch tokens, one vector; ``"centroids"``:
    ``RETRIEVAL_CENTROIDS`` spherical k-means centroids of its patch tokens), and, per stage l, its
    ``clusters`` spherical k-means centroids B_{r,l} (``cluster_scope="image"``: clustered once per image at
    fit; ``clusters=0`` keeps every patch token). With ``cluster_scope="retrieved"`` every patch token is
    kept and the union of the k retrieved references' tokens is clustered into k·``clusters`` centroids at
    query time (measured slower and not better: see README). k-means is deterministic: farthest-point
    initialisation from the patch nearest the image's mean direction, then ``KMEANS_ITERS`` Lloyd steps on
    cosine similarity (empty clusters keep their centre).

Dual-branch retrieval
    For a query q and every reference r: CLS cosine a_qr = <c_q, c_r>; patch similarity p_qr = <d_q, d_r>
    (mean descriptor) or the symmetric chamfer similarity of the two centroid sets
    ½(mean_i max_j <u_i, v_j> + mean_j max_i <u_i, v_j>). Each branch is standardised over the references the
    query may retrieve (z-score across the allowed r for that query; at fit an excluded reference never enters
    it), so their scales do not decide the mix, and combined as
    s_qr = λ·z(a)_qr + (1 − λ)·z(p)_qr with λ = ``cls_weight`` (``retrieval="cls"``: λ = 1, ``"patch"``: λ = 0).
    The top ``retrieve_k`` allowed references by s (ties: lower index first) are retrieved; a query with fewer
    allowed references gets them all.

Hierarchical maps
    For stage l and query patch x: m_l(x) = 1 − max over the retrieved references' centroids b at stage l
    of cos(x, b).

Uncertainty-based fusion (reliability from healthy data only)
    At fit, ``reliability_images`` seeded training images are scored leave-one-out (their own image and
    every reference of the same patient or volume, grouped as the held-out calibration split groups them
    (:func:`normdino.io.inputs.held_out_groups`), are excluded from retrieval);
    their maps give per stage the mean mu_l and standard deviation sigma_l of the healthy patch scores,
    and per grid position mu_l(p), sigma_l(p). Rules (``fusion``):

    * ``"uncertainty"`` (default): F(x) = sum_l w_l m_l(x), w_l = sigma_l^-2 / sum_j sigma_j^-2
      (inverse-variance weighting: a stage whose healthy scores spread widely is trusted less);
    * ``"pixel"``: F(p) = sum_l w_l(p) (m_l(p) − mu_l(p)), w_l(p) = sigma_l(p)^-2 / sum_j sigma_j(p)^-2
      (per grid position; assumes roughly aligned images such as brain slices);
    * ``"mean"``: F = (1/L) sum_l m_l (the ablation).

    Variances are floored at ``VARIANCE_FLOOR``. Calibration (thresholds), pixel maps and volumes are the
    detector's job.

Memory
    The state is float16: N·L·C·D (banks) + N·D (CLS) + N·R·D (descriptors) values. For 1338 training
    images, ViT-S/16 at 448 px (28×28 grid), 4 stages, C = 32, D = 384: 131.5 MB of banks + 1.0 MB CLS
    + 1.0 MB mean descriptors (8.2 MB with 8 centroids), ~134 MB in all, against 3.2 GB for keeping every
    token of the four stages. Scoring gathers k·C centroids per stage and query: small.

Measured (``benchmarks/bench_himatch.py``: synthetic tokens with planted anomalies, and lgg-flair tokens of a
RANDOM-weight dinov3_vits16, whose quality is not DINOv3's; docs/speed.md "HiMatch and its ablations" has
the tables, measured after the leave-one-out fix)
    * clusters per image vs per retrieved set at k = 3: the retrieved set scored higher (synthetic pixel AUROC
      0.975 vs 0.896; lgg 0.862 vs 0.852) but took 37-220x the scoring time and keeps every token; keeping
      every token without clustering (``clusters=0``, k = 10) scored 1.000 synthetic, 0.850 lgg; per image
      is the default.
    * k-means per image vs a DPMM per stage (``dpmm-multistage``): see the table in docs/speed.md.
    * fusion: the plain mean was as good as or better than inverse-variance weighting on both token sets:
      a stage whose matches are uniformly poor has *small* healthy spread and so gets a large weight; the
      spread of 1 − max cosine is not a reliability there. ``uncertainty`` stays the default as the paper's
      idea; check it with real DINOv3 weights before relying on it.
    * descriptor: on lgg the 8-centroid descriptor scored 0.836 against 0.844 for the mean-pooled one (synthetic
      not re-measured after the leave-one-out fix); the mean is the default.
"""

from __future__ import annotations

import logging
import math
import time
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from normdino.errors import InputError, ModelFileError
from normdino.features.tokens import FeatureRequest, Tokens, TokenSet
from normdino.io.inputs import held_out_groups
from normdino.methods.base import NormativeMethod, Param, require
from normdino.methods.memory_bank import SEED
from normdino.methods.registry import register

logger = logging.getLogger(__name__)

__all__ = [
    "HiMatchMethod", "spherical_kmeans", "retrieval_scores", "retrieve", "stage_maps",
    "fusion_statistics", "fusion_weights", "fuse", "FUSIONS", "LAYERS_PARAM", "FUSION_PARAM",
    "RELIABILITY_PARAM", "reliability_sample", "leave_one_out_mask", "fused_score_range",
]

KMEANS_ITERS = 10
"""Lloyd iterations of the per-image spherical k-means."""
RETRIEVAL_CENTROIDS = 8
"""Centroids per image of the ``descriptor="centroids"`` retrieval descriptor."""
VARIANCE_FLOOR = 1e-12
"""Added to every variance before it is inverted in the fusion weights."""
FUSIONS = ("uncertainty", "pixel", "mean")
_FIT_BATCH = 32  # images per k-means / scoring batch at fit
_STAT_KEYS = ("stage_mean", "stage_std", "pixel_mean", "pixel_std")

LAYERS_PARAM = Param("layers", int, "backbone layers (hidden_states indices, shallow to deep) used as stages; "
                     "default 3 6 9 12 = four evenly spaced blocks of a 12-block ViT", nargs="+")
FUSION_PARAM = Param("fusion", str, "how stage maps are combined: uncertainty (inverse healthy variance per stage), "
                     "pixel (per grid position, centred), mean (plain average)", choices=FUSIONS)
RELIABILITY_PARAM = Param("reliability_images", int, "healthy training images scored to estimate each stage's "
                          "reliability for the fusion", minimum=1)


# ---------------------------------------------------------------------------------------------- pure pieces
def spherical_kmeans(x: torch.Tensor, k: int, iters: int = KMEANS_ITERS) -> torch.Tensor:
    """(B, k, D) unit centroids of each of B sets of unit vectors (B, P, D); deterministic; k ≥ P returns x."""
    b, p, d = x.shape
    if k >= p:
        return x.clone()
    rows = torch.arange(b, device=x.device)
    first = (x @ F.normalize(x.mean(1), dim=-1)[:, :, None])[:, :, 0].argmax(1)
    centres = torch.empty(b, k, d, dtype=x.dtype, device=x.device)
    centres[:, 0] = x[rows, first]
    nearest = (x @ centres[:, 0, :, None])[:, :, 0]
    for j in range(1, k):  # farthest point: the patch least similar to every centre so far
        pick = nearest.argmin(1)
        centres[:, j] = x[rows, pick]
        nearest = torch.maximum(nearest, (x @ centres[:, j, :, None])[:, :, 0])
    for _ in range(iters):
        assign = torch.bmm(x, centres.transpose(1, 2)).argmax(2)  # (B, P)
        onehot = F.one_hot(assign, k).to(x.dtype)  # (B, P, k)
        sums = torch.bmm(onehot.transpose(1, 2), x)  # (B, k, D)
        counts = onehot.sum(1)[:, :, None]
        centres = torch.where(counts > 0, F.normalize(sums, dim=-1), centres)
    return centres


def _standardise(s: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """z-score of each row over its allowed references (all when ``allowed`` is None); a constant row becomes zeros.

    Excluded entries get the row's statistics too but never enter them, so a left-out query does not shift its
    own standardisation (a true leave-one-out).
    """
    if allowed is None:
        centred = s - s.mean(1, keepdim=True)
        return centred / (centred.pow(2).mean(1, keepdim=True).sqrt() + 1e-12)
    weight = allowed.to(s.dtype)
    count = weight.sum(1, keepdim=True).clamp(min=1.0)
    centred = s - (s * weight).sum(1, keepdim=True) / count
    return centred / ((centred.pow(2) * weight).sum(1, keepdim=True) / count).sqrt().add(1e-12)


def retrieval_scores(
    query_cls: torch.Tensor, query_desc: torch.Tensor, ref_cls: torch.Tensor, ref_desc: torch.Tensor, cls_weight: float,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, N) dual-branch scores s = λ z(CLS cosine) + (1 − λ) z(patch similarity), z over the allowed references.

    Descriptors are (·, R, D) unit vectors: R = 1 compares them by cosine, R > 1 by symmetric chamfer similarity.
    ``exclude`` (B, N) marks references a query may not retrieve: they do not enter its z-scores and score −inf.
    """
    allowed = None if exclude is None else ~exclude
    parts = []
    if cls_weight > 0:
        parts.append(cls_weight * _standardise(query_cls @ ref_cls.T, allowed))
    if cls_weight < 1:
        if query_desc.shape[1] == 1:
            patch = query_desc[:, 0] @ ref_desc[:, 0].T
        else:
            sims = torch.einsum("brd,nsd->bnrs", query_desc, ref_desc)
            patch = 0.5 * (sims.max(3).values.mean(2) + sims.max(2).values.mean(2))
        parts.append((1.0 - cls_weight) * _standardise(patch, allowed))
    scores = parts[0] if len(parts) == 1 else parts[0] + parts[1]
    return scores if exclude is None else scores.masked_fill(exclude, -math.inf)


def retrieve(scores: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """(B, k) indices of the k highest scores per row (ties: lower index first), never an excluded one.

    A row with fewer than k allowed references gets them all, then −1 (no reference) in the remaining places.
    """
    if exclude is not None:
        scores = scores.masked_fill(exclude, -math.inf)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    if exclude is not None:
        allowed = (~exclude).sum(1, keepdim=True)
        order = order.masked_fill(torch.arange(order.shape[1], device=order.device)[None] >= allowed, -1)
    return order


def stage_maps(patches: torch.Tensor, banks: torch.Tensor, refs: torch.Tensor, recluster: int = 0) -> torch.Tensor:
    """(B, L, h, w) maps 1 − max cosine of each query patch to its retrieved references' bank vectors, per stage.

    ``patches`` (B, L, h, w, D) unit vectors, ``banks`` (N, L, C, D) unit vectors (any float dtype), ``refs``
    (B, k) reference indices, −1 for none (as :func:`retrieve` pads; at least one per row); ``recluster`` > 0
    clusters the gathered vectors of the real references into that many first.
    """
    b, n_layers, h, w, d = patches.shape
    valid = refs >= 0
    if not bool(valid.all()):  # rows with fewer references: each on its own, on its real references only
        out = torch.empty(b, n_layers, h, w, dtype=torch.float32, device=patches.device)
        for row in range(b):
            kept = refs[row:row + 1, valid[row]]
            out[row:row + 1] = stage_maps(patches[row:row + 1], banks, kept, recluster)
        return out
    out = torch.empty(b, n_layers, h, w, dtype=torch.float32, device=patches.device)
    for layer in range(n_layers):
        gathered = banks[refs, layer].reshape(b, -1, d).float()
        if recluster:
            gathered = spherical_kmeans(gathered, recluster)
        x = patches[:, layer].reshape(b, h * w, d).float()
        out[:, layer] = (1.0 - torch.bmm(x, gathered.transpose(1, 2)).max(2).values).reshape(b, h, w)
    return out


def fusion_statistics(maps: torch.Tensor) -> dict[str, torch.Tensor]:
    """Healthy-map statistics per stage (L,) and per stage and grid position (L, h, w) from (M, L, h, w) maps."""
    maps = maps.double()
    per_stage = maps.transpose(0, 1).reshape(maps.shape[1], -1)
    return {
        "stage_mean": per_stage.mean(1).float(),
        "stage_std": per_stage.std(1, unbiased=False).float(),
        "pixel_mean": maps.mean(0).float(),
        "pixel_std": maps.std(0, unbiased=False).float(),
    }


def fusion_weights(stats: dict[str, torch.Tensor], rule: str) -> torch.Tensor:
    """Stage weights: (L,) for "mean" (1/L) and "uncertainty" (σ_l⁻² normalised), (L, h, w) for "pixel"."""
    if rule == "mean":
        n = stats["stage_std"].shape[0]
        return torch.full((n,), 1.0 / n, device=stats["stage_std"].device)
    if rule not in FUSIONS:
        raise InputError(f"unknown fusion rule {rule!r}; choose one of {', '.join(FUSIONS)}")
    std = stats["pixel_std"] if rule == "pixel" else stats["stage_std"]
    inverse = 1.0 / (std.double() ** 2 + VARIANCE_FLOOR)
    return (inverse / inverse.sum(0, keepdim=True)).float()


def fuse(maps: torch.Tensor, stats: dict[str, torch.Tensor], rule: str) -> torch.Tensor:
    """(B, h, w) fused map of (B, L, h, w) stage maps under ``rule`` (see the module docstring)."""
    weights = fusion_weights(stats, rule).to(maps.device)
    if rule == "pixel":
        return (weights[None] * (maps - stats["pixel_mean"].to(maps.device)[None])).sum(1)
    return (weights[None, :, None, None] * maps).sum(1)


def fused_score_range(rule: str) -> tuple[float, float] | None:
    """Where fused scores live a priori: weighted means of 1 − cosine in [0, 1] in practice; None for "pixel",
    whose centred scores (m − mu(p)) take either sign (the detector records the range they took at calibration)."""
    return None if rule == "pixel" else (0.0, 1.0)


def reliability_sample(n: int, count: int, seed: int) -> np.ndarray:
    """Sorted indices of min(n, count) images drawn without replacement by a seeded generator."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(n)[: min(n, count)])


def leave_one_out_mask(sources: list[str], query_index: np.ndarray) -> torch.Tensor:
    """(B, N) True where reference j may not be retrieved for query ``query_index[b]``: the query itself and every
    image of its patient or volume, by the grouping the held-out calibration split uses
    (:func:`normdino.io.inputs.held_out_groups`). A row never excludes everything: when every reference shares
    the query's group, only the query itself is excluded (a single reference is kept for itself).
    """
    groups = np.asarray(held_out_groups(list(sources)), dtype=object)
    query_index = np.asarray(query_index, dtype=np.int64)
    mask = np.stack([groups == groups[i] for i in query_index]) if len(query_index) else np.zeros((0, len(groups)), bool)
    mask[np.arange(len(query_index)), query_index] = True
    for row in np.flatnonzero(mask.all(1)):
        mask[row] = False
        if len(groups) > 1:
            mask[row, query_index[row]] = True
    return torch.from_numpy(mask.astype(bool))


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


# ---------------------------------------------------------------------------------------------- the method
@register("himatch", examples=("himatch",))
class HiMatchMethod(NormativeMethod):
    """HiMatch-AD (training-free): retrieve healthy references, match per stage, fuse by reliability. See module doc."""

    #: the backbone this method is meant with (the CLI may use it when --backbone is not given)
    DEFAULT_BACKBONE: ClassVar[str] = "dinov3_vits16"

    PARAMS = (
        LAYERS_PARAM,
        Param("retrieve_k", int, "healthy references retrieved per query", minimum=1),
        Param("retrieval", str, "retrieval branches: dual (CLS and patch), cls (CLS only), patch (patch only)",
              choices=("dual", "cls", "patch")),
        Param("cls_weight", float, "weight of the CLS branch in dual retrieval (0..1; patch branch gets the rest)",
              minimum=0.0),
        Param("descriptor", str, "patch descriptor for retrieval: mean (mean-pooled tokens) or centroids "
              f"({RETRIEVAL_CENTROIDS} k-means centroids per image)", choices=("mean", "centroids")),
        Param("clusters", int, "k-means centroids per reference image and stage (0 = keep every patch token)",
              minimum=0),
        Param("cluster_scope", str, "cluster each reference image at fit (image) or the retrieved set per query "
              "(retrieved; keeps every token)", choices=("image", "retrieved")),
        FUSION_PARAM,
        RELIABILITY_PARAM,
        SEED,
    )

    def __init__(
        self,
        layers: tuple[int, ...] = (3, 6, 9, 12),
        retrieve_k: int = 10,
        retrieval: str = "dual",
        cls_weight: float = 0.5,
        descriptor: str = "mean",
        clusters: int = 32,
        cluster_scope: str = "image",
        fusion: str = "uncertainty",
        reliability_images: int = 64,
        seed: int = 0,
    ) -> None:
        self.layers = tuple(layers) if isinstance(layers, (list, tuple)) else (layers,)
        self.retrieve_k = retrieve_k
        self.retrieval = retrieval
        self.cls_weight = cls_weight
        self.descriptor = descriptor
        self.clusters = clusters
        self.cluster_scope = cluster_scope
        self.fusion = fusion
        self.reliability_images = reliability_images
        self.seed = seed

    # ------------------------------------------------------------------ interface
    def feature_request(self) -> FeatureRequest:
        return FeatureRequest(layers=tuple(self.layers), cls=True)

    def check_params(self) -> None:
        super().check_params()
        if not 0.0 <= self.cls_weight <= 1.0:
            raise InputError(f"{self.name or 'himatch'}: cls_weight must be between 0 and 1, got {self.cls_weight!r}")

    @property
    def branch_weight(self) -> float:
        """λ of the retrieval score: 1 for CLS-only, 0 for patch-only, ``cls_weight`` for dual."""
        return {"cls": 1.0, "patch": 0.0}.get(self.retrieval, float(self.cls_weight))

    @property
    def keeps_all_tokens(self) -> bool:
        return self.clusters == 0 or self.cluster_scope == "retrieved"

    def _describe(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, R, D) retrieval descriptors of (B, h, w, D) patch tokens of the retrieval stage."""
        x = _unit(patches.reshape(patches.shape[0], -1, patches.shape[-1]))
        if self.descriptor == "mean":
            return F.normalize(x.mean(1), dim=-1)[:, None]
        return spherical_kmeans(x, RETRIEVAL_CENTROIDS)

    def _bank(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, L, C, D) bank vectors of (B, L, h, w, D) tokens: per-image centroids, or every token."""
        b, n_layers, h, w, d = patches.shape
        x = _unit(patches.reshape(b, n_layers, h * w, d))
        if self.keeps_all_tokens:
            return x
        return torch.stack([spherical_kmeans(x[:, layer], self.clusters) for layer in range(n_layers)], 1)

    def fit(self, train: TokenSet, val: TokenSet | None = None) -> "HiMatchMethod":
        """Keep CLS tokens, descriptors and per-stage banks of the healthy images; estimate stage reliabilities.

        ``val`` is not used: nothing is selected, and the reliabilities come from leave-one-out maps of ``train``.
        """
        self.check_params()
        start = time.perf_counter()
        n = len(train)
        if n == 0:
            raise InputError("himatch needs at least one healthy training image")
        if train.n_layers != len(self.layers):
            raise InputError(f"himatch asked for {len(self.layers)} layers but the training tokens hold {train.n_layers}")
        if train.cls is None:
            raise InputError("himatch needs CLS tokens: extract the training tokens with FeatureRequest(cls=True)")
        device = getattr(self, "device", "cpu")
        cls, desc, banks = [], [], []
        with torch.no_grad():
            for batch in train.batches(_FIT_BATCH, device):
                cls.append(_unit(batch.cls[:, -1]).half())
                desc.append(self._describe(batch.patches[:, -1]).half())
                banks.append(self._bank(batch.patches).half())
        self.cls_ = torch.cat(cls)
        self.descriptors_ = torch.cat(desc)
        self.banks_ = torch.cat(banks)
        self.grid_ = torch.tensor(train.grid_shape, dtype=torch.int64, device=device)
        self.sources_ = list(train.sources)
        sample = reliability_sample(n, self.reliability_images, self.seed)
        maps = []
        with torch.no_grad():
            for s0 in range(0, len(sample), _FIT_BATCH):
                idx = sample[s0:s0 + _FIT_BATCH]
                tokens = train.subset(idx).batch(0, len(idx), device)
                exclude = leave_one_out_mask(self.sources_, idx)
                maps.append(self._stage_maps(tokens, exclude))
        stats = fusion_statistics(torch.cat(maps))
        for key, value in stats.items():
            setattr(self, key + "_", value)
        self.fit_info_ = {
            "n_references": n,
            "reliability_images": int(len(sample)),
            "bank_vectors_per_image": int(self.banks_.shape[2]),
            "stage_weights": [round(float(v), 6) for v in fusion_weights(stats, "uncertainty")],
            "stage_healthy_std": [round(float(v), 6) for v in stats["stage_std"]],
            "state_bytes": self.state_bytes(),
            "fit_seconds": round(time.perf_counter() - start, 3),
        }
        logger.info("himatch: %d references, %d bank vectors per image and stage, %.1f MB state, weights %s",
                    n, self.banks_.shape[2], self.fit_info_["state_bytes"] / 2**20, self.fit_info_["stage_weights"])
        return self

    def retrieve_references(self, tokens: Tokens, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """(B, k) indices of the healthy references retrieved for each image of the batch, best first."""
        self.check_fitted("banks_")
        device = self.banks_.device
        if tokens.device != device:
            raise InputError(f"tokens are on {tokens.device} but the himatch state is on {device}; call method.to(device)")
        if tokens.cls is None:
            raise InputError("himatch needs CLS tokens: extract the tokens with FeatureRequest(cls=True)")
        if tokens.patches.shape[1] != self.banks_.shape[1]:
            raise InputError(f"himatch expects {self.banks_.shape[1]} layers per token batch, got {tokens.patches.shape[1]}")
        exclude = None if exclude is None else exclude.to(device)
        with torch.no_grad():
            scores = retrieval_scores(_unit(tokens.cls[:, -1]), self._describe(tokens.patches[:, -1]),
                                      self.cls_.float(), self.descriptors_.float(), self.branch_weight, exclude)
            return retrieve(scores, min(self.retrieve_k, self.banks_.shape[0]), exclude)

    def _stage_maps(self, tokens: Tokens, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, h, w) stage maps of a batch against its retrieved references."""
        refs = self.retrieve_references(tokens, exclude)
        recluster = self.retrieve_k * self.clusters if self.cluster_scope == "retrieved" and self.clusters else 0
        return stage_maps(_unit(tokens.patches), self.banks_, refs, recluster)

    def patch_scores(self, tokens: Tokens) -> torch.Tensor:
        self.check_fitted("banks_")
        if tuple(tokens.grid_shape) != tuple(int(v) for v in self.grid_):
            if self.fusion == "pixel":
                raise InputError(f"pixel fusion was fitted on a {tuple(self.grid_.tolist())} token grid, got {tokens.grid_shape}; "
                                 "use the image size of the fit")
        with torch.no_grad():
            return fuse(self._stage_maps(tokens), self._stats(), self.fusion)

    def to(self, device: torch.device | str) -> "HiMatchMethod":
        """Keep the state on ``device`` (and fit there from now on)."""
        self.device = device
        return super().to(device)

    def _stats(self) -> dict[str, torch.Tensor]:
        return {key: getattr(self, key + "_") for key in _STAT_KEYS}

    @property
    def score_range(self) -> tuple[float, float] | None:
        return fused_score_range(self.fusion)

    @property
    def n_prototypes(self) -> int:
        if not hasattr(self, "banks_"):
            return 0
        return int(min(self.retrieve_k, self.banks_.shape[0]) * (self.clusters or self.banks_.shape[2]))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        self.check_fitted("banks_")
        tensors = {"cls": self.cls_, "descriptors": self.descriptors_, "banks": self.banks_, "grid": self.grid_,
                   **self._stats()}
        return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], info: dict | None = None) -> "HiMatchMethod":
        try:
            self.check_params()
        except InputError as exc:
            raise ModelFileError(f"the himatch model's saved parameters are invalid: {exc}") from exc
        names = ("cls", "descriptors", "banks", "grid", *_STAT_KEYS)
        require(tensors, names, "himatch")
        t = {k: tensors[k].detach().to("cpu") for k in names}
        banks = t["banks"]
        if banks.ndim != 4 or banks.shape[0] == 0:
            raise ModelFileError(f"the himatch banks have shape {tuple(banks.shape)}, expected (N, L, C, D) with N > 0")
        n, n_layers, c, d = banks.shape
        grid = tuple(int(v) for v in t["grid"].reshape(-1)) if t["grid"].numel() == 2 else None
        if grid is None or min(grid) < 1:
            raise ModelFileError(f"the himatch token grid {t['grid'].tolist()} is not two positive sizes")
        r = 1 if self.descriptor == "mean" else min(RETRIEVAL_CENTROIDS, grid[0] * grid[1])
        expected_c = grid[0] * grid[1] if self.keeps_all_tokens else min(self.clusters, grid[0] * grid[1])
        expected = {"cls": (n, d), "descriptors": (n, r, d), "banks": (n, len(self.layers), expected_c, d),
                    "grid": (2,), "stage_mean": (n_layers,), "stage_std": (n_layers,),
                    "pixel_mean": (n_layers, *grid), "pixel_std": (n_layers, *grid)}
        for key, shape in expected.items():
            if tuple(t[key].shape) != shape:
                raise ModelFileError(f"the himatch state tensor {key} has shape {tuple(t[key].shape)}, expected {shape}; "
                                     "the model file does not match its parameters")
        if bool((t["stage_std"] < 0).any()) or bool((t["pixel_std"] < 0).any()):
            raise ModelFileError("the himatch state holds negative standard deviations; the model file is corrupt")
        self.cls_, self.descriptors_, self.banks_ = t["cls"].half(), t["descriptors"].half(), banks.half()
        self.grid_ = t["grid"].reshape(2).to(torch.int64)
        for key in _STAT_KEYS:
            setattr(self, key + "_", t[key].float())
        self.fit_info_ = dict(info or {})
        if hasattr(self, "device"):
            self.to(self.device)
        return self
