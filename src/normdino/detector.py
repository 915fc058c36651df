"""The anomaly detector: backbone tokens + Dirichlet process mixture + calibrated thresholds, in one model file."""

from __future__ import annotations

import copy
import itertools
import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence, Union

import numpy as np
import torch
from safetensors.torch import save_file

from normdino import __version__
from normdino.methods import scoring
from normdino.errors import InputError, ModelFileError
from normdino.files import atomic_path, read_safetensors
from normdino.evaluation.metrics import thresholds_at_fprs

log = logging.getLogger(__name__)

ImageLike = Union[str, Path, np.ndarray]

MODEL_FORMAT = "normdino-model"
MODEL_FORMAT_VERSION = (1, 0)
DEFAULT_FPRS = (0.01, 0.05, 0.10)
# Calibration keeps the healthy score quantiles on this grid of FPRs, so any FPR can be asked for at predict time.
_FPR_GRID = np.unique(np.concatenate([np.geomspace(1e-4, 0.5, 240), DEFAULT_FPRS]))
_MAX_CALIBRATION_PIXELS = 50_000_000
_RANDOM_BACKBONE = "random"


@dataclass
class Prediction:
    """What the detector says about one image."""

    patch_map: np.ndarray  # (h, w) anomaly score of each patch token
    pixel_map: np.ndarray  # (H, W) anomaly map at the image's own size
    score: float  # image score: mean of the top pixel scores
    fpr: float  # the false-positive rate the mask and the verdict were thresholded at
    threshold: float  # pixel threshold giving ``fpr`` on healthy validation pixels
    mask: np.ndarray  # (H, W) bool, pixel_map > threshold
    is_anomalous: bool  # image score above the image threshold giving ``fpr`` on healthy validation images


def image_shape(image: ImageLike) -> tuple[int, int]:
    """(H, W) of an image array or file, reading only the file header."""
    from normdino.io.reading import image_shape as file_shape

    if isinstance(image, np.ndarray):
        return int(image.shape[0]), int(image.shape[1])
    return file_shape(image)


def _threshold_from_table(fprs: np.ndarray, thresholds: np.ndarray, fpr: float) -> float:
    """Threshold at ``fpr``, interpolated in log-FPR between the calibrated grid points."""
    if not 0.0 < fpr < 1.0:
        raise InputError(f"the false-positive rate must lie strictly between 0 and 1, got {fpr}")
    if fpr < fprs[0] or fpr > fprs[-1]:
        raise InputError(f"FPR {fpr} is outside the calibrated range {fprs[0]:g}..{fprs[-1]:g}")
    return float(np.interp(np.log(fpr), np.log(fprs), thresholds))


class AnomalyDetector:
    """Fit a normative model of DINO patch tokens on healthy images; predict anomaly maps, scores and masks.

    Hyper-parameters follow the paper (Schulthess & Konukoglu, MICCAI 2025): DINOv2 ViT-S/14 at 448 px,
    L2-normalised last-layer tokens, a diagonal DP mixture with K=500, 40 epochs of 12-image batches,
    score = 1 - max cosine to the active component means.
    """

    def __init__(
        self,
        backbone="dinov2_vits14",
        image_size: int = 448,
        layer: int = -1,
        normalize: bool = True,
        n_components: int = 500,
        covariance_type: str = "diag",
        epochs: int = 40,
        batch_images: int = 12,
        update_rate: float = 0.2,
        alpha: float = 2.0,
        score: str = "cosine",
        sigma: float = 0.0,
        fprs: Sequence[float] = DEFAULT_FPRS,
        default_fpr: float = 0.05,
        top_fraction: float = 0.01,
        val_fraction: float = 0.1,
        cache_dir: str | Path | None = None,
        device: str = "cpu",
        batch_size: int = 8,
        seed: int = 0,
        progress: bool = True,
        volume_settings: dict | None = None,
    ):
        self.backbone = backbone
        self.image_size = image_size
        self.layer = layer
        self.normalize = normalize
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.epochs = epochs
        self.batch_images = batch_images
        self.update_rate = update_rate
        self.alpha = alpha
        self.score = score
        self.sigma = sigma
        self.fprs = fprs
        self.default_fpr = default_fpr
        self.top_fraction = top_fraction
        self.val_fraction = val_fraction
        self.cache_dir = cache_dir
        self.device = device
        self.batch_size = batch_size
        self.seed = seed
        self.progress = progress
        self.volume_settings = volume_settings

    # ------------------------------------------------------------------ parameters

    _PARAMS = (
        "image_size", "layer", "normalize", "n_components", "covariance_type", "epochs", "batch_images",
        "update_rate", "alpha", "score", "sigma", "fprs", "default_fpr", "top_fraction", "val_fraction", "seed",
        "volume_settings",
    )

    def get_params(self) -> dict:
        """The JSON-able hyper-parameters saved with the model (the backbone is saved separately)."""
        params = {name: getattr(self, name) for name in self._PARAMS}
        params["fprs"] = [float(f) for f in self.fprs]
        return params

    # ------------------------------------------------------------------ backbone and tokens

    def _build_backbone(self):
        from normdino.features.backbone import Backbone

        if isinstance(self.backbone, Backbone):
            return self.backbone
        name = str(self.backbone)
        if name == _RANDOM_BACKBONE or name.startswith(_RANDOM_BACKBONE + ":"):
            arch = name.partition(":")[2] or "dinov2_vits14"
            return Backbone.random(arch, seed=self.seed, image_size=self.image_size,
                                   layers=(self.layer,), normalize=self.normalize, device=self.device)
        return Backbone.from_pretrained(name, image_size=self.image_size, layers=(self.layer,),
                                        normalize=self.normalize, device=self.device)

    def _backbone_spec(self, backbone) -> dict:
        """How to rebuild the backbone when the model file is loaded."""
        name = self.backbone if isinstance(self.backbone, (str, Path)) else backbone.name
        return {"name": str(name), "identifier": backbone.identifier, "is_random": bool(backbone.is_random),
                "patch_size": backbone.patch_size, "embed_dim": backbone.embed_dim,
                "image_size": backbone.image_size, "layers": list(backbone.layers)}

    def _tokens(self, images: Iterable[ImageLike]) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """(N, h, w, D) float16 tokens and the (H, W) of each image.

        A list of files goes through the token cache; anything else (arrays, a generator of volume slices)
        is streamed through the backbone in batches, so it is never all in memory as images.
        """
        from normdino.features.cache import extract_tokens

        if isinstance(images, (list, tuple)) and images and all(isinstance(im, (str, Path)) for im in images):
            paths = [Path(p) for p in images]
            cache_dir = Path(self.cache_dir) if self.cache_dir is not None else None
            tokens = extract_tokens(self.backbone_, paths, cache_dir=cache_dir, batch_size=self.batch_size,
                                    progress=self.progress)
            return tokens, [image_shape(p) for p in paths]
        chunks, shapes = [], []
        for arrays in _batches(_as_arrays(images), self.batch_size):
            shapes.extend(a.shape[:2] for a in arrays)
            chunks.append(self._embed(arrays).to(torch.float16).numpy())
        if not chunks:
            raise InputError("no training images were given")
        return np.concatenate(chunks), shapes

    def _embed(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """(B, h, w, D) tokens of a batch of image arrays."""
        batch = torch.stack([self.backbone_.preprocess(a) for a in arrays])
        with torch.inference_mode():
            return self.backbone_(batch)

    # ------------------------------------------------------------------ fit

    def fit(self, normal_images: Iterable[ImageLike], val_normal_images: Iterable[ImageLike] | None = None):
        """Learn the normative model from healthy images and calibrate thresholds on healthy validation images.

        Images are files, arrays, or any iterable of them (e.g. a generator of volume slices). Without
        validation images, a seeded ``val_fraction`` of the training images is held out for model selection
        and calibration (calibrating on training images would understate the false-positive rate).
        """
        for fpr in self.fprs:
            if not 0.0 < float(fpr) < 1.0:
                raise InputError(f"false-positive rates must lie strictly between 0 and 1, got {fpr}")
        if self.score not in scoring.SCORE_METHODS:
            raise InputError(f"unknown score {self.score!r}; choose one of {', '.join(scoring.SCORE_METHODS)}")

        started = time.perf_counter()
        self.backbone_ = self._build_backbone()
        tokens, shapes = self._tokens(normal_images)
        if val_normal_images is not None:
            val_tokens, val_shapes = self._tokens(val_normal_images)
        elif self.val_fraction > 0 and len(shapes) >= 4:
            order = np.random.default_rng(self.seed).permutation(len(shapes))
            n_val = max(1, int(round(self.val_fraction * len(shapes))))
            val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
            val_tokens, val_shapes = tokens[val_idx], [shapes[i] for i in val_idx]
            tokens, shapes = tokens[train_idx], [shapes[i] for i in train_idx]
            log.info("no validation images given: holding out %d of %d training images for calibration",
                     n_val, n_val + len(train_idx))
        else:
            log.warning("calibrating thresholds on the training images: false-positive rates will be optimistic")
            val_tokens, val_shapes = tokens, shapes
        extraction_s = time.perf_counter() - started
        self.fit_tokens(tokens, shapes, val_tokens, val_shapes, held_out=val_normal_images is None)
        self.training_summary_["extraction_seconds"] = round(extraction_s, 3)
        return self

    def fit_tokens(self, tokens: np.ndarray, shapes: list[tuple[int, int]], val_tokens: np.ndarray,
                   val_shapes: list[tuple[int, int]], held_out: bool = False):
        """Fit the mixture on precomputed (N, h, w, D) tokens, keep the best epoch, calibrate on the validation tokens.

        The backbone that produced the tokens must be this detector's (``backbone_``, built if absent).
        """
        from normdino.methods.mixture import DirichletProcessMixture

        if not hasattr(self, "backbone_"):
            self.backbone_ = self._build_backbone()
        n, h, w, d = tokens.shape
        mixture = DirichletProcessMixture(
            n_components=self.n_components, covariance_type=self.covariance_type,
            update_rate=self.update_rate, alpha=self.alpha, seed=self.seed)
        with warnings.catch_warnings():  # read-only memory-mapped cache: scoring only reads it
            warnings.simplefilter("ignore", UserWarning)
            val_flat = torch.from_numpy(np.ascontiguousarray(val_tokens.reshape(-1, d)))
        history: list[float] = []
        best: dict = {}

        def keep_best(epoch: int, model) -> bool:
            loglik = _mean_log_likelihood(model, val_flat)
            history.append(loglik)
            log.info("epoch %d: mean validation log-likelihood %.4f", epoch + 1, loglik)
            if not best or loglik > best["loglik"]:
                best.update(loglik=loglik, epoch=epoch, model=copy.deepcopy(model))
            return False

        started = time.perf_counter()
        mixture.fit(tokens.reshape(-1, d), epochs=self.epochs, batch_size=self.batch_images * h * w,
                    shuffle=True, callback=keep_best)
        em_s = time.perf_counter() - started

        self.mixture_ = best.get("model", mixture)
        self.prototypes_ = self.mixture_.prototypes().float()
        self.grid_shape_ = (h, w)
        self.history_ = history
        self.best_epoch_ = int(best.get("epoch", self.epochs - 1))
        self._calibrate(val_tokens, val_shapes)
        self.training_summary_ = {
            "n_train_images": int(n), "n_val_images": len(val_shapes), "val_held_out": held_out,
            "n_train_tokens": int(n * h * w), "grid_shape": [h, w], "token_dim": d,
            "image_shapes": sorted({f"{hh}x{ww}" for hh, ww in shapes}),
            "n_prototypes": int(self.prototypes_.shape[0]), "best_epoch": self.best_epoch_ + 1,
            "val_log_likelihood": history, "em_seconds": round(em_s, 3),
        }
        log.info("fitted: %d prototypes (best epoch %d), EM %.1f s", self.prototypes_.shape[0], self.best_epoch_ + 1, em_s)
        return self

    def _calibrate(self, val_tokens: np.ndarray, val_shapes: list[tuple[int, int]]) -> None:
        """Thresholds at every grid FPR from the pixel and image scores of healthy validation images."""
        rng = np.random.default_rng(self.seed)
        total = sum(hh * ww for hh, ww in val_shapes)
        keep = min(1.0, _MAX_CALIBRATION_PIXELS / total)
        pixel_samples, image_scores = [], []
        for maps in scoring.pixel_maps(self.patch_maps, val_tokens, val_shapes, self.sigma):
            image_scores.append(scoring.image_score(maps, self.top_fraction))
            flat = maps.ravel()
            pixel_samples.append(flat if keep >= 1.0 else rng.choice(flat, int(np.ceil(keep * flat.size)), replace=False))
        fprs = np.unique(np.concatenate([_FPR_GRID, np.asarray(self.fprs, dtype=np.float64)]))
        self.calibration_fprs_ = fprs
        self.pixel_thresholds_ = thresholds_at_fprs(pixel_samples, fprs)
        self.image_thresholds_ = thresholds_at_fprs(image_scores, fprs)

    # ------------------------------------------------------------------ predict

    def _check_fitted(self) -> None:
        if not hasattr(self, "mixture_"):
            raise InputError("this AnomalyDetector is not fitted yet: call fit() or AnomalyDetector.load()")

    def pixel_threshold(self, fpr: float) -> float:
        """Pixel threshold giving ``fpr`` false positives on the healthy validation pixels."""
        self._check_fitted()
        return _threshold_from_table(self.calibration_fprs_, self.pixel_thresholds_, fpr)

    def image_threshold(self, fpr: float) -> float:
        """Image-score threshold giving ``fpr`` false positives on the healthy validation images."""
        self._check_fitted()
        return _threshold_from_table(self.calibration_fprs_, self.image_thresholds_, fpr)

    def patch_maps(self, tokens: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(N, h, w) patch anomaly maps of (N, h, w, D) tokens."""
        return scoring.patch_scores(torch.as_tensor(tokens), self.score, self.prototypes_, self.mixture_)

    def predict_one(self, image: np.ndarray, fpr: float | None = None) -> Prediction:
        """Predict a single image array (H, W) or (H, W, 3) in [0, 1]."""
        return self.predict([image], fpr=fpr)[0]

    def predict(self, images: Iterable[ImageLike], fpr: float | None = None) -> list[Prediction]:
        """Anomaly maps, scores and masks at ``fpr`` (default: ``default_fpr``) for files or arrays."""
        return list(self.iter_predict(images, fpr=fpr))

    def iter_predict(self, images: Iterable[ImageLike], fpr: float | None = None) -> Iterator[Prediction]:
        """Like :meth:`predict`, yielding one :class:`Prediction` at a time in input order (bounded memory)."""
        self._check_fitted()
        fpr = self.default_fpr if fpr is None else fpr
        pixel_threshold, image_threshold = self.pixel_threshold(fpr), self.image_threshold(fpr)
        for arrays in _batches(_as_arrays(images), self.batch_size):
            for patch_map, array in zip(self.patch_maps(self._embed(arrays)), arrays):
                pixels = scoring.pixel_map(patch_map, array.shape[:2], self.sigma)
                score = scoring.image_score(pixels, self.top_fraction)
                yield Prediction(patch_map=patch_map.numpy(), pixel_map=pixels, score=score, fpr=fpr,
                                 threshold=pixel_threshold, mask=pixels > pixel_threshold,
                                 is_anomalous=bool(score > image_threshold))

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | Path) -> Path:
        """Write one ``.normdino`` file: safetensors tensors plus a JSON header; nothing executable."""
        self._check_fitted()
        tensors = {f"mixture.{k}": v.contiguous() for k, v in self.mixture_.to_tensors().items()}
        tensors["prototypes"] = self.prototypes_.contiguous()
        tensors["calibration.fprs"] = torch.from_numpy(self.calibration_fprs_)
        tensors["calibration.pixel_thresholds"] = torch.from_numpy(self.pixel_thresholds_)
        tensors["calibration.image_thresholds"] = torch.from_numpy(self.image_thresholds_)
        header = {
            "format": MODEL_FORMAT,
            "format_version": "%d.%d" % MODEL_FORMAT_VERSION,
            "normdino_version": __version__,
            "backbone": self._backbone_spec(self.backbone_),
            "detector": self.get_params(),
            "mixture": self.mixture_.get_config(),
            "training": self.training_summary_,
        }
        path = Path(path)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"normdino": json.dumps(header)})
        return path

    @classmethod
    def load(cls, path: str | Path, backbone=None, cache_dir: str | Path | None = None,
             device: str = "cpu", progress: bool = True) -> "AnomalyDetector":
        """Load a model file written by :meth:`save`; ``backbone`` overrides where the backbone weights come from."""
        from normdino.methods.mixture import DirichletProcessMixture

        header, tensors = read_model_file(path)
        spec = header["backbone"]
        params = header["detector"]
        detector = cls(backbone=backbone if backbone is not None else spec["name"], cache_dir=cache_dir,
                       device=device, progress=progress, **params)
        mixture_tensors = {k.removeprefix("mixture."): v for k, v in tensors.items() if k.startswith("mixture.")}
        detector.mixture_ = DirichletProcessMixture.from_tensors(mixture_tensors, header["mixture"])
        detector.prototypes_ = tensors["prototypes"]
        detector.calibration_fprs_ = tensors["calibration.fprs"].numpy()
        detector.pixel_thresholds_ = tensors["calibration.pixel_thresholds"].numpy()
        detector.image_thresholds_ = tensors["calibration.image_thresholds"].numpy()
        detector.training_summary_ = header.get("training", {})
        detector.grid_shape_ = tuple(detector.training_summary_.get("grid_shape", ()))
        detector.backbone_ = detector._build_backbone()
        if detector.backbone_.identifier != spec["identifier"]:
            message = (f"{path} was fitted with backbone {spec['name']} ({spec['identifier']}), but the backbone "
                       f"loaded now is {detector.backbone_.identifier}")
            if backbone is None:
                raise ModelFileError(message + "; pass the same weights with --backbone")
            log.warning(message)
        return detector


def _as_arrays(images: Iterable[ImageLike]) -> Iterator[np.ndarray]:
    """Image arrays from files or arrays, read lazily one at a time."""
    from normdino.io.reading import read_image

    for image in images:
        yield image if isinstance(image, np.ndarray) else read_image(image)


def _batches(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def _mean_log_likelihood(mixture, tokens: torch.Tensor, chunk: int = 65536) -> float:
    """Mean mixture log-likelihood of float16/32 tokens (N, D), scored in chunks."""
    total = 0.0
    for start in range(0, tokens.shape[0], chunk):
        total += float(mixture.score_samples(tokens[start:start + chunk].float()).double().sum())
    return total / max(1, tokens.shape[0])


def read_model_file(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Header and tensors of a ``.normdino`` file, with one clear error for anything that is not one."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist")
    metadata, tensors = read_safetensors(path, "a normdino model file")
    try:
        header = json.loads(metadata["normdino"])
    except (KeyError, json.JSONDecodeError):
        raise ModelFileError(f"{path} is a safetensors file but not a normdino model (no normdino header)") from None
    if header.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{path} is not a normdino model file (format {header.get('format')!r})")
    major = int(str(header.get("format_version", "0")).split(".")[0])
    if major != MODEL_FORMAT_VERSION[0]:
        raise ModelFileError(
            f"{path} was written by normdino {header.get('normdino_version', '?')} in model format "
            f"{header.get('format_version')}; this normdino ({__version__}) reads format {MODEL_FORMAT_VERSION[0]}.x: "
            "upgrade normdino or refit the model")
    required = ("prototypes", "calibration.fprs", "calibration.pixel_thresholds", "calibration.image_thresholds")
    missing = [k for k in required if k not in tensors]
    if missing or not all(k in header for k in ("backbone", "detector", "mixture")):
        raise ModelFileError(f"{path} is an incomplete normdino model file (missing {', '.join(missing) or 'header fields'})")
    return header, tensors
