"""The anomaly detector: a frozen DINO backbone + one normative method + thresholds calibrated on healthy images.

Any registered method (``dpmm``, ``anomalydino``, ``patchcore-150``, ``himatch`` ...) fits, saves, loads
and predicts through this one class; the model file records the method's name, hyper-parameters and
learned tensors and rebuilds it through the registry.

At ~550 lines it is one idea: the estimator (fit, calibration, predict, save, load) and the small result type
it yields. What loading checks beyond the schema lives in ``model_checks``, the settings in ``detector_params``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, Union

import numpy as np
import torch

from normdino import distributed as dist
from normdino.errors import InputError, ModelFileError
from normdino.features.tokens import FeatureRequest, Tokens, TokenSet
from normdino.methods import registry
from normdino.methods import scoring
from normdino.detector_params import DETECTOR_PARAMS
from normdino.methods.base import NormativeMethod
from normdino.model_checks import (RANDOM_BACKBONE, check_backbone_architecture, check_same_backbone,
                                   parse_random_name, read_checked_model)
from normdino.parallel import default_workers, ordered_map

log = logging.getLogger(__name__)

ImageLike = Union[str, Path, np.ndarray]

DEFAULT_FPRS = (0.01, 0.05, 0.10)


def sorted_fprs(*groups: Sequence[float]) -> np.ndarray:
    """The distinct FPRs of ``groups``, ascending, as float64 (``np.unique`` without the ~80 ms import of
    numpy.ma it triggers, which every ``normdino predict`` paid at start-up)."""
    values = np.sort(np.concatenate([np.asarray(group, dtype=np.float64).ravel() for group in groups]))
    return values[np.concatenate([[True], values[1:] != values[:-1]])] if values.size else values


# Calibration keeps the healthy score quantiles on this grid of FPRs, so any FPR can be asked for at predict time.
FPR_GRID = sorted_fprs(np.geomspace(1e-4, 0.5, 240), DEFAULT_FPRS)
#: Errors that stop one image's prediction but not the others' (predict_batches gives them in the image's place).
_FAILURES = (InputError, MemoryError)
_MAX_CALIBRATION_PIXELS = 50_000_000
#: Images per forward pass of a fit when no batch size is given: a fixed number, as before ``auto`` existed,
#: because tokens may differ in the last bits between batch sizes and a refit must give the same model.
FIT_BATCH_SIZE = 8

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


def threshold_from_table(fprs: np.ndarray, thresholds: np.ndarray, fpr: float) -> float:
    """Threshold at ``fpr``, interpolated in log-FPR between the calibrated grid points."""
    if not 0.0 < fpr < 1.0:
        raise InputError(f"the false-positive rate must lie strictly between 0 and 1, got {fpr}")
    if fpr < fprs[0] or fpr > fprs[-1]:
        raise InputError(f"FPR {fpr} is outside the calibrated range {fprs[0]:g}..{fprs[-1]:g}")
    return float(np.interp(np.log(fpr), np.log(fprs), thresholds))


def held_out_split(sources: Sequence[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) image indices with whole sources (volumes, files) on one side, ~``fraction`` held out.

    Slices of one volume never land on both sides: neighbouring slices would make the FPR optimistic.
    """
    groups = list(dict.fromkeys(sources))
    order = np.random.default_rng(seed).permutation(len(groups))
    target = max(1, int(round(fraction * len(sources))))
    counts = {g: 0 for g in groups}
    for s in sources:
        counts[s] += 1
    held: set[str] = set()
    total = 0
    for i in order:
        if total >= target or len(held) == len(groups) - 1:
            break
        held.add(groups[i])
        total += counts[groups[i]]
    is_val = np.array([s in held for s in sources])
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def _check_detector_params(values: dict) -> dict:
    checked = {}
    for param in DETECTOR_PARAMS:
        if param.name in values:
            value = values[param.name]
            if param.name == "batch_size" and isinstance(value, str) and value.strip().lower() == "auto":
                value = None  # chosen per device and runtime (AnomalyDetector.effective_batch_size)
            checked[param.name] = param.check(value, "AnomalyDetector")
    return checked


class AnomalyDetector:
    """Fit a normative model of DINO patch tokens on healthy images; predict anomaly maps, scores and masks.

    ``method`` is a registered name (``dpmm`` by default, the method of Schulthess & Konukoglu, MICCAI 2025)
    or a :class:`NormativeMethod` instance; ``backbone`` defaults to the method's own (DINOv2 ViT-S/14;
    DINOv3 ViT-S/16 for ``himatch``); extra keyword arguments are that method's hyper-parameters
    (e.g. ``n_components=500, epochs=40`` for ``dpmm``). Calibration sets pixel and image thresholds on
    healthy validation images for any FPR in 1e-4..0.5.
    """

    def __init__(
        self,
        method: str | NormativeMethod = "dpmm",
        backbone: Any = None,
        image_size: int = 448,
        normalize: bool = True,
        sigma: float = 0.0,
        fprs: Sequence[float] = DEFAULT_FPRS,
        default_fpr: float = 0.05,
        top_fraction: float = 0.01,
        val_fraction: float = 0.1,
        cache_dir: str | Path | bool | None = True,
        device: str = "cpu",
        batch_size: int | str | None = None,
        seed: int = 0,
        progress: bool = True,
        volume_settings: dict | None = None,
        runtime: str = "torch",
        precision: str | None = None,
        **method_params: Any,
    ):
        self.method = method
        self.backbone = backbone
        self.image_size = image_size
        self.normalize = normalize
        self.sigma = sigma
        self.fprs = fprs
        self.default_fpr = default_fpr
        self.top_fraction = top_fraction
        self.val_fraction = val_fraction
        self.cache_dir = cache_dir  # True: the default folder ($NORMDINO_CACHE_DIR or ~/.cache/...); None: no cache
        self.device = device
        self.batch_size = batch_size  # None or "auto": effective_batch_size picks the measured best for the device
        self.seed = seed
        self.progress = progress
        self.volume_settings = volume_settings
        self.runtime = runtime  # how the backbone runs (torch, onnx, openvino): recorded, not part of the identity
        self.precision = precision  # fp32, int8, bf16; None: bf16 on CUDA, else fp32
        self.method_params = method_params

    # ------------------------------------------------------------------ parameters
    @property
    def method_name(self) -> str:
        return self.method if isinstance(self.method, str) else (self.method.name or type(self.method).__name__)

    def get_params(self) -> dict:
        """The JSON-able detector hyper-parameters saved with the model (backbone and method are saved apart)."""
        params = {p.name: getattr(self, p.name) for p in DETECTOR_PARAMS}
        params["fprs"] = [float(f) for f in self.fprs]
        params["volume_settings"] = self.volume_settings
        return params

    @property
    def effective_batch_size(self) -> int:
        """Images per forward pass: ``batch_size``, or for None/"auto" the measured best of the device and runtime."""
        value = _check_detector_params({"batch_size": self.batch_size})["batch_size"]
        if value is not None:
            return int(value)
        from normdino.features.backbone import resolve_device
        from normdino.features.runtimes import auto_batch_size

        backbone = getattr(self, "backbone_", None)
        device = backbone.device if backbone is not None else resolve_device(self.device)
        return auto_batch_size(device, getattr(backbone, "runtime", self.runtime))

    @property
    def fit_batch_size(self) -> int:
        """Images per forward pass when fitting: ``batch_size``, or ``FIT_BATCH_SIZE`` for None/"auto", so the
        tokens a model is fitted on (and so its thresholds) do not depend on the machine that fits it."""
        value = _check_detector_params({"batch_size": self.batch_size})["batch_size"]
        return FIT_BATCH_SIZE if value is None else int(value)

    def _check_params(self) -> None:
        checked = _check_detector_params({p.name: getattr(self, p.name) for p in DETECTOR_PARAMS})
        for name, value in checked.items():
            setattr(self, name, value)
        if not self.fprs:
            raise InputError("give at least one false-positive rate")

    def _build_method(self) -> NormativeMethod:
        """A fresh method from the name and hyper-parameters (the seed is the detector's unless given)."""
        if isinstance(self.method, NormativeMethod):
            if self.method_params:
                raise InputError("pass method hyper-parameters to the method instance, not to AnomalyDetector")
            return self.method
        cls = registry.method_class(self.method)
        accepted = {p.name for p in cls.PARAMS}
        unknown = sorted(set(self.method_params) - accepted)
        if unknown:
            raise InputError(f"method {self.method!r} has no hyper-parameter {', '.join(unknown)}; "
                             f"it takes {', '.join(sorted(accepted))}")
        params = {"seed": self.seed, **self.method_params}
        return registry.create(self.method, **params)

    # ------------------------------------------------------------------ backbone and tokens
    def build_backbone(self, request: FeatureRequest):
        from normdino.features.backbone import Backbone

        if isinstance(self.backbone, Backbone):
            return _with_layers(self.backbone, request)
        name = str(self.backbone) if self.backbone is not None else default_backbone(self.method)
        common = dict(image_size=self.image_size, layers=request.layers, normalize=self.normalize, device=self.device,
                      runtime=self.runtime, precision=self.precision)
        if name == RANDOM_BACKBONE or name.startswith(RANDOM_BACKBONE + ":") or name.startswith(RANDOM_BACKBONE + "-"):
            arch, seed, tiny = parse_random_name(name, self.seed, default_arch=default_backbone(self.method))
            return Backbone.random(arch, seed=seed, tiny=tiny, **common)
        return Backbone.from_pretrained(name, **common)

    def _backbone_spec(self, backbone) -> dict:
        """How to rebuild the backbone when the model file is loaded."""
        name = self.backbone if isinstance(self.backbone, (str, Path)) else backbone.name
        if self.backbone is None:
            name = default_backbone(self.method)
        if backbone.is_random and isinstance(self.backbone, str) and self.backbone.startswith(RANDOM_BACKBONE) \
                and not Path(self.backbone).exists():
            name = backbone.name  # random-[tiny-]ARCH-seedN: rebuilds the same weights
        return {"name": str(name), "identifier": backbone.identifier, "is_random": bool(backbone.is_random),
                "patch_size": backbone.patch_size, "embed_dim": backbone.embed_dim,
                "image_size": backbone.image_size, "layers": list(backbone.layers), "normalize": backbone.normalize,
                "precision": getattr(backbone, "precision", "fp32"), "runtime": getattr(backbone, "runtime", "torch")}

    def _token_set(self, images: Iterable[ImageLike], cls: bool, sources: list[str]) -> TokenSet:
        """Float16 tokens of files (through the token cache) or arrays (streamed), with sizes and sources.

        ``sources`` names the file or volume of each image; for a stream it fills as the stream is read.
        """
        from normdino.features.cache import embed_arrays, extract_tokens

        if isinstance(images, (list, tuple)) and images and all(isinstance(im, (str, Path)) for im in images):
            cache_dir = self.token_cache_dir()
            return extract_tokens(self.backbone_, [Path(p) for p in images], cache_dir=cache_dir,
                                  batch_size=self.fit_batch_size, progress=self.progress, cls=cls)
        arrays = (image if isinstance(image, np.ndarray) else _read(image) for image in images)
        tokens = embed_arrays(self.backbone_, arrays, batch_size=self.fit_batch_size, cls=cls, progress=self.progress)
        if len(tokens) == 0:
            raise InputError("no training images were given")
        if len(sources) == len(tokens):
            tokens.sources = list(sources)
        return tokens

    def token_cache_dir(self) -> Path | None:
        """Where tokens of image files are cached (computed once per image and backbone); None: not cached."""
        from normdino.files import default_cache_dir

        if self.cache_dir is True:
            return default_cache_dir()
        return Path(self.cache_dir) if self.cache_dir not in (None, False) else None

    def _embed(self, pixels: list[torch.Tensor]) -> Tokens:
        """Tokens of a batch of preprocessed images, on the detector's device."""
        out = self.backbone_.encode(torch.stack(pixels).to(self.backbone_.device))
        return Tokens(out.patch_tokens, out.cls_tokens if self.method_.feature_request().cls else None)

    # ------------------------------------------------------------------ fit
    def fit(self, normal_images: Iterable[ImageLike], val_normal_images: Iterable[ImageLike] | None = None,
            sources: list[str] | None = None):
        """Learn the normative model from healthy images and calibrate thresholds on healthy validation images.

        Images are folders, globs, files, arrays, or any iterable of them (e.g. a generator of volume slices).
        Without validation images, a seeded ``val_fraction`` of the training sources (whole volumes, whole
        patients of ``<patient>_<slice>`` files, else files) is held out for model selection and calibration. ``sources``: for a stream of slices, a list that
        names each slice's volume as it is produced (see ``normdino.io.inputs.training_images``).
        """
        from normdino.io.inputs import expand_images, held_out_groups

        self._check_params()
        method = self._build_method()
        method.check_params()
        train_sources: list[str] = sources if sources is not None else []
        val_sources: list[str] = []
        recorded: dict = {}  # how the inputs were read (2D rule; slicing and scaling of volumes), kept in the model
        normal_images = expand_images(normal_images, sources=None if sources is not None else train_sources,
                                      settings=recorded)
        if self.volume_settings is None and recorded:
            self.volume_settings = recorded
        if val_normal_images is not None:
            val_normal_images = expand_images(val_normal_images, sources=val_sources)
        started = time.perf_counter()
        request = method.feature_request()
        self.backbone_ = self.build_backbone(request)
        with dist.failing_together("token extraction"):  # under torchrun: this rank's share of the images
            train = self._token_set(normal_images, request.cls, train_sources)
            val = None if val_normal_images is None else self._token_set(val_normal_images, request.cls, val_sources)
        held_out = val is None
        if val is not None:
            log.debug("validation images given: %d on this process", len(val))
        elif self.val_fraction > 0 and len(set(all_sources := dist.gather_list(train.sources))) >= 2 and len(all_sources) >= 4:
            split = held_out_split(held_out_groups(all_sources), self.val_fraction, self.seed)  # all ranks' sources
            train_idx, val_idx = (dist.local_indices(indices, len(train)) for indices in split)
            train, val = train.subset(train_idx), train.subset(val_idx)
            log.info("no validation images given: holding out %d of %d training images (%d sources) for calibration",
                     len(val), len(val) + len(train), len(set(val.sources)))
        else:
            log.warning("calibrating thresholds on the training images: false-positive rates will be optimistic")
            val = train
        extraction_s = time.perf_counter() - started
        self.fit_tokens(train, val, method=method, held_out=held_out)
        self.training_summary_["extraction_seconds"] = round(extraction_s, 3)
        return self

    def fit_tokens(self, train: TokenSet, val: TokenSet, method: NormativeMethod | None = None,
                   held_out: bool = False) -> "AnomalyDetector":
        """Fit the method on precomputed tokens, then calibrate on the healthy validation tokens.

        The tokens must come from this detector's backbone (``backbone_``, built if absent).
        """
        self._check_params()
        method = method if method is not None else self._build_method()
        if not hasattr(self, "backbone_"):
            self.backbone_ = self.build_backbone(method.feature_request())
        method.to(self.backbone_.device)
        method.progress = self.progress
        started = time.perf_counter()
        dist.fit_method(method, train, val)  # method.fit(train, val), or its torchrun form on this rank's share
        fit_s = time.perf_counter() - started
        self.method_ = method
        self.grid_shape_ = train.grid_shape
        self._calibrate(val)
        h, w = train.grid_shape
        self.training_summary_ = {
            "n_train_images": int(dist.global_sum(len(train))), "n_val_images": int(dist.global_sum(len(val))),
            "val_held_out": held_out, "n_train_tokens": int(dist.global_sum(len(train) * h * w)),
            "grid_shape": [h, w], "token_dim": train.dim,
            "image_shapes": sorted({f"{hh}x{ww}" for hh, ww in dist.gather_list(train.shapes)}),
            "n_prototypes": int(method.n_prototypes), "fit_seconds": round(fit_s, 3), **method.fit_info(),
        }
        log.info("fitted %s: %d prototypes in %.1f s", self.method_name, method.n_prototypes, fit_s)
        return self

    def _calibrate(self, val: TokenSet) -> None:
        """Thresholds at every grid FPR from the pixel and image scores of healthy validation images."""
        rng = np.random.default_rng(self.seed + dist.rank())
        total = dist.global_sum(sum(hh * ww for hh, ww in val.shapes))  # under torchrun: every rank's pixels
        keep = min(1.0, _MAX_CALIBRATION_PIXELS / max(1, total))
        pixel_samples, image_scores, low, high = [], [], np.inf, -np.inf
        with dist.failing_together("calibration"):
            for maps in self.pixel_maps(val):
                image_scores.append(scoring.image_score(maps, self.top_fraction))
                flat = maps.ravel()
                low, high = min(low, float(flat.min())), max(high, float(flat.max()))
                pixel_samples.append(flat if keep >= 1.0 else rng.choice(flat, int(np.ceil(keep * flat.size)), replace=False))
        fprs = sorted_fprs(FPR_GRID, self.fprs)
        self.calibration_fprs_ = fprs
        # quantiles of the healthy scores of every rank (exactly the one-process thresholds when not subsampled)
        self.pixel_thresholds_ = dist.thresholds_at_fprs(pixel_samples, fprs)
        self.image_thresholds_ = dist.thresholds_at_fprs(image_scores, fprs)
        # the range the method's scores actually took on healthy pixels (every rank's; an empty share adds nothing)
        ranges = np.asarray(dist.gather_list([(low, high)]), dtype=np.float64)
        self.pixel_range_ = np.array([ranges[:, 0].min(), ranges[:, 1].max()])

    # ------------------------------------------------------------------ scoring
    def _check_fitted(self) -> None:
        if not hasattr(self, "method_"):
            raise InputError("this AnomalyDetector is not fitted yet: call fit() or AnomalyDetector.load()")

    @property
    def prototypes_(self) -> torch.Tensor:
        """The method's prototypes (DPMM component means, bank tokens), for methods that have them."""
        self._check_fitted()
        for name in ("prototypes_", "bank_"):
            if hasattr(self.method_, name):
                return getattr(self.method_, name)
        raise AttributeError(f"method {self.method_name} has no prototypes")

    def pixel_threshold(self, fpr: float) -> float:
        """Pixel threshold giving ``fpr`` false positives on the healthy validation pixels."""
        self._check_fitted()
        return threshold_from_table(self.calibration_fprs_, self.pixel_thresholds_, fpr)

    def image_threshold(self, fpr: float) -> float:
        """Image-score threshold giving ``fpr`` false positives on the healthy validation images."""
        self._check_fitted()
        return threshold_from_table(self.calibration_fprs_, self.image_thresholds_, fpr)

    def patch_maps(self, tokens: Tokens | torch.Tensor | np.ndarray) -> torch.Tensor:
        """(B, h, w) patch anomaly maps of tokens, on the tokens' device ((B, h, w, D) arrays are one layer)."""
        self._check_fitted()
        if not isinstance(tokens, Tokens):
            tokens = Tokens(torch.as_tensor(tokens, dtype=torch.float32))
        return self.method_.patch_scores(tokens)

    def pixel_maps(self, tokens: TokenSet, chunk: int = 32) -> Iterator[np.ndarray]:
        """Pixel map of each image of a token set, scoring ``chunk`` images at a time on the method's device."""
        device = self.backbone_.device if hasattr(self, "backbone_") else "cpu"
        return scoring.pixel_maps(self.patch_maps, tokens, self.sigma, device, chunk)

    def predict_one(self, image: np.ndarray, fpr: float | None = None) -> Prediction:
        """Predict a single image array (H, W) or (H, W, 3) in [0, 1]."""
        return self.predict([image], fpr=fpr)[0]

    def predict(self, images: Iterable[ImageLike], fpr: float | None = None) -> list[Prediction]:
        """Anomaly maps, scores and masks at ``fpr`` (default: ``default_fpr``) for folders, files or arrays."""
        return list(self.iter_predict(images, fpr=fpr))

    def iter_predict(self, images: Iterable[ImageLike], fpr: float | None = None) -> Iterator[Prediction]:
        """Like :meth:`predict`, yielding one :class:`Prediction` at a time in input order (bounded memory)."""
        from normdino.io.inputs import expand_images

        batches = _batches(expand_images(images), self.effective_batch_size)
        for outcomes in self.predict_batches(batches, fpr=fpr, retry=False):
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
                yield outcome

    def predict_batches(self, batches: Iterable[Sequence[ImageLike]], fpr: float | None = None, retry: bool = True
                        ) -> Iterator[list[Prediction | InputError | MemoryError]]:
        """The predictions of each batch of images, in order, for batches the caller sized (e.g. by pixels).

        One pipeline for the whole stream: threads read and preprocess the next images and a thread runs the model
        on the next batch while this one is scored, so the model never waits between batches. An image that
        cannot be read or predicted gets its error (InputError, MemoryError) in its place; a batch that fails in
        the model or in scoring is run again image by image, so only the image at fault gets the error
        (``retry=False``: every image of that batch gets it).
        """
        self._check_fitted()
        fpr = self.default_fpr if fpr is None else fpr
        thresholds = self.pixel_threshold(fpr), self.image_threshold(fpr)
        workers = default_workers(self.backbone_.device)
        ahead = max(2 * workers, 2 * self.effective_batch_size)

        def items() -> Iterator[tuple[int, ImageLike | None]]:
            # (batch length, image) for each image; an empty batch passes as one (0, None) so it is yielded too
            position = 0
            for batch in batches:
                batch = list(batch)
                if not batch:
                    yield 0, None
                for image in batch:
                    yield len(batch), (position, image)
                    position += 1

        def load(item: tuple[int, Any]) -> tuple[int, tuple[tuple[int, ...], torch.Tensor] | Exception | None]:
            size, entry = item
            if entry is None:
                return size, None
            position, image = entry
            try:
                array = _checked(image, position) if isinstance(image, np.ndarray) else _read(image)
                return size, (array.shape[:2], self.backbone_.preprocess(array))
            except _FAILURES as err:
                return size, err

        def regroup(loaded: Iterable[tuple[int, Any]]) -> Iterator[list]:
            batch: list = []
            for size, entry in loaded:
                if size == 0:
                    yield []
                    continue
                batch.append(entry)
                if len(batch) == size:
                    yield batch
                    batch = []

        def embed(batch: list) -> tuple[list, list, Tokens | Exception | None]:
            ready = [entry for entry in batch if not isinstance(entry, Exception)]
            try:
                return batch, ready, (self._embed([pixels for _, pixels in ready]) if ready else None)
            except _FAILURES as err:
                return batch, ready, err

        loaded = ordered_map(load, items(), workers, ahead=ahead)
        # The model runs on the next batch while this one is scored (a failure surfaces in turn). On a CPU two
        # batches are in the model at once: its threads run one image each (image_parallel_runner), so they take
        # the next batch's images as soon as they are free instead of waiting for the batch's slowest image.
        overlap = 2 if self.backbone_.device.type == "cpu" else 1
        for batch, ready, tokens in ordered_map(embed, regroup(loaded), workers=overlap, ahead=overlap + 1):
            try:
                if isinstance(tokens, Exception):
                    raise tokens
                scored = iter(self._score([shape for shape, _ in ready], tokens, fpr, *thresholds) if ready else [])
            except _FAILURES as err:
                if retry and len(ready) > 1:
                    scored = iter([self._predict_alone(entry, fpr, thresholds) for entry in ready])
                else:
                    scored = iter([err] * len(ready))
            yield [entry if isinstance(entry, Exception) else next(scored) for entry in batch]

    def _predict_alone(self, entry: tuple, fpr: float, thresholds: tuple[float, float]) -> Prediction | Exception:
        """One preprocessed image through the model and scoring on its own, or the error it raises."""
        shape, pixels = entry
        try:
            return self._score([shape], self._embed([pixels]), fpr, *thresholds)[0]
        except _FAILURES as err:
            return err

    def _score(self, shapes: list[tuple[int, ...]], tokens: Tokens, fpr: float, pixel_threshold: float,
               image_threshold: float) -> list[Prediction]:
        """The predictions of a batch of images of these (H, W) ``shapes`` from their tokens."""
        maps = self.patch_maps(tokens).float()
        pixel_maps = scoring.batch_pixel_maps(maps, shapes, self.sigma)
        predictions = []
        for patch_map, pixels in zip(maps.cpu(), pixel_maps):
            score = scoring.image_score(pixels, self.top_fraction)
            predictions.append(Prediction(patch_map=patch_map.numpy(), pixel_map=pixels, score=score, fpr=fpr,
                                          threshold=pixel_threshold, mask=pixels > pixel_threshold,
                                          is_anomalous=bool(score > image_threshold)))
        return predictions

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write one ``.normdino`` file: safetensors tensors plus a JSON header; nothing executable."""
        from normdino.model_file import write_model_file

        self._check_fitted()
        tensors = {f"method.{k}": v for k, v in self.method_.state_dict().items()}
        tensors["calibration.fprs"] = torch.from_numpy(np.asarray(self.calibration_fprs_, dtype=np.float64))
        tensors["calibration.pixel_thresholds"] = torch.from_numpy(np.asarray(self.pixel_thresholds_, dtype=np.float64))
        tensors["calibration.image_thresholds"] = torch.from_numpy(np.asarray(self.image_thresholds_, dtype=np.float64))
        if getattr(self, "pixel_range_", None) is not None:
            tensors["calibration.pixel_range"] = torch.from_numpy(np.asarray(self.pixel_range_, dtype=np.float64))
        header = {
            "method": {"name": self.method_.name or self.method_name, "params": self.method_.get_params(),
                       "info": self.method_.fit_info()},
            "backbone": self._backbone_spec(self.backbone_),
            "detector": {**self.get_params(), "batch_size": self.fit_batch_size},  # what the fit used; any reader loads it
            "training": self.training_summary_,
        }
        return write_model_file(path, header, tensors)

    @classmethod
    def load(cls, path: str | Path, backbone=None, cache_dir: str | Path | bool | None = True,
             device: str = "cpu", progress: bool = True, runtime: str | None = None,
             precision: str | None = None, keep_fit_state: bool = False,
             batch_size: int | str | None = None) -> "AnomalyDetector":
        """Load a model file written by :meth:`save`; ``backbone`` overrides where the backbone weights come from.

        The method keeps only what scoring reads (e.g. the DPMM's active means, not its EM state of all
        components); ``keep_fit_state=True`` keeps everything the file holds, to :meth:`save` it again or
        continue a fit. The file format is the same either way.

        ``runtime``/``precision`` default to the model's own where this device supports them (a model fitted
        in bf16 on a GPU runs in fp32 on a CPU); a different choice gives a warning, not a refusal.
        ``batch_size`` is a choice of this run, like the device (None: the measured best for the device and
        runtime); the one the model was fitted with is not reused, as it does not change a score.
        """
        from normdino.features.backbone import resolve_device

        header, method, tensors = read_checked_model(path)
        spec = header["backbone"]
        try:
            detector_params = _check_detector_params(header["detector"])
        except InputError as err:
            raise ModelFileError(f"{path} holds invalid settings: {err}") from None
        detector_params["batch_size"] = _check_detector_params({"batch_size": batch_size})["batch_size"]
        detector = cls(method=method, backbone=backbone if backbone is not None else spec["name"],
                       cache_dir=cache_dir, device=device, progress=progress,
                       volume_settings=header["detector"].get("volume_settings"), **detector_params)
        detector.image_size = int(spec["image_size"])
        detector.runtime = runtime or spec.get("runtime", "torch")
        detector.precision = precision or _portable_precision(spec.get("precision"), device)
        detector.normalize = bool(spec.get("normalize", detector.normalize))
        method.to(resolve_device(device))  # 'auto' -> cuda or cpu, as the backbone will resolve it
        if not keep_fit_state:
            method.release_fit_state()
        detector.method_ = method
        detector.calibration_fprs_ = tensors["calibration.fprs"].numpy()
        detector.pixel_thresholds_ = tensors["calibration.pixel_thresholds"].numpy()
        detector.image_thresholds_ = tensors["calibration.image_thresholds"].numpy()
        if "calibration.pixel_range" in tensors:  # absent from files written before it was recorded
            detector.pixel_range_ = tensors["calibration.pixel_range"].numpy()
        detector.training_summary_ = header.get("training", {})
        detector.grid_shape_ = tuple(detector.training_summary_.get("grid_shape", ()))
        if backbone is not None:
            check_backbone_architecture(path, spec, backbone, default_backbone(method))
        detector.backbone_ = detector.build_backbone(method.feature_request())
        check_same_backbone(path, spec, detector.backbone_, overridden=backbone is not None)
        return detector


def default_backbone(method: str | NormativeMethod) -> str:
    """The backbone a method is meant with: its class's ``DEFAULT_BACKBONE``, else DINOv2 ViT-S/14 (the paper's)."""
    cls = registry.method_class(method) if isinstance(method, str) else type(method)
    return getattr(cls, "DEFAULT_BACKBONE", "dinov2_vits14")


def _portable_precision(saved: str | None, device: str) -> str | None:
    """The saved precision where the device can run it; bf16 from a GPU falls back to the device's default."""
    if saved == "bf16" and torch.device(device).type != "cuda":
        return None
    return saved


def _with_layers(backbone, request: FeatureRequest):
    """``backbone`` itself when it gives the requested layers, else the same model giving them."""
    n = backbone.num_layers
    if tuple(layer % (n + 1) for layer in request.layers) == tuple(backbone.layers):
        return backbone
    return type(backbone)(backbone.model, backbone.name, image_size=backbone.image_size, layers=request.layers,
                          normalize=backbone.normalize, device=backbone.device, is_random=backbone.is_random,
                          runtime=backbone.runtime, precision=backbone.precision)


def _read(path: Any) -> np.ndarray:
    from normdino.io.reading import read_image

    return read_image(path)


def _checked(image: np.ndarray, position: int) -> np.ndarray:
    """An image array as given, with the same tiny-image warning files get."""
    from normdino.io.reading import warn_if_tiny

    warn_if_tiny(image.shape[:2], f"image array {position}")
    return image


def _batches(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    import itertools

    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch
