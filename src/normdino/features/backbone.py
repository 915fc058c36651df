"""Frozen DINOv2 / DINOv3 backbones from Hugging Face ``transformers``: images -> grids of patch tokens.

Layers are numbered like ``output_hidden_states``: 0 is the patch embedding, i (1..n) the output of
block i, negative numbers count from the end (-1 = the last block). Every requested layer, the
intermediate ones included, goes through the model's final LayerNorm (as DINOv2's
``get_intermediate_layers(norm=True)``), so the last layer equals ``last_hidden_state``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from normdino.errors import InputError, ModelFileError, WeightsNotFoundError
from normdino.features import vit
from normdino.features.loading import (RANDOM_MARKER, SUPPORTED_MODEL_TYPES, build_random_model, load_model,
                                       weights_fingerprint)
from normdino.features.runtimes import (
    Runner, check_supported, graph_runner, hidden_tokens, image_parallel_runner, resolve_precision, torch_int8_model,
)
from normdino.io.reading import read_image
from normdino.parallel import default_workers, ordered_map

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESSING_VERSION = "pil-bicubic-clamp/imagenet-v1"
@dataclass
class BackboneOutput:
    """Tokens of one forward pass: patch grids (B, L, h, w, D) and CLS tokens (B, L, D) of the L requested layers."""

    patch_tokens: torch.Tensor
    cls_tokens: torch.Tensor


def preprocess_image(
    image: np.ndarray, size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """(H, W) or (H, W, C) image in [0, 1] -> (3, size, size): whole image resized, clamped to [0, 1], normalised.

    Values outside [0, 1] are refused (InputError), never clipped; the clamp only removes bicubic overshoot.

    Resizing is Pillow's bicubic on float32 planes (antialiased when shrinking, as torchvision's Resize on
    PIL images in the DINO papers); it is single-threaded, so it stays cheap beside a busy model.
    """
    array = np.asarray(image)
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / np.float32(255.0)
    if array.dtype == bool or not np.issubdtype(array.dtype, np.number):
        array = array.astype(np.float32)
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):
        array = array[..., 0] if array.shape[2] == 1 else array[..., :3]
    if array.ndim not in (2, 3) or array.size == 0:
        raise InputError(f"An image must be an (H, W) or (H, W, 3) array, got shape {array.shape}.")
    array = np.asarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise InputError("The image contains NaN or infinite values; clean or rescale it to [0, 1] first.")
    low, high = float(array.min()), float(array.max())
    if low < -1e-6 or high > 1.0 + 1e-6:  # one rule: refuse, never clip silently (an 8-bit float image would go white)
        raise InputError(f"The image's values span {low:g} to {high:g} but must lie in [0, 1]; scale it first "
                         "(e.g. divide 8-bit values by 255, or pass uint8 arrays).")
    planes = [array] if array.ndim == 2 else [array[..., c] for c in range(3)]
    resized = [np.clip(_resize_plane(plane, size), 0.0, 1.0) for plane in planes]
    out = np.empty((3, size, size), dtype=np.float32)
    for c in range(3):  # (x - mean) / std channel by channel: the same float32 operations as a broadcast, 20x faster
        np.subtract(resized[c % len(resized)], np.float32(mean[c]), out=out[c])
        np.divide(out[c], np.float32(std[c]), out=out[c])
    return torch.from_numpy(out)


def _resize_plane(plane: np.ndarray, size: int) -> np.ndarray:
    """Bicubic resize of one float32 plane to size x size."""
    resized = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32)).resize(
        (size, size), Image.Resampling.BICUBIC
    )
    return np.asarray(resized, dtype=np.float32)


def load_pixels(item: Path | str | np.ndarray, size: int, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """An image file or array -> (3, size, size) model input (what the loader threads compute)."""
    array = item if isinstance(item, np.ndarray) else read_image(item)
    return preprocess_image(array, size, mean, std)


class Backbone:
    """A frozen DINO ViT that turns preprocessed images into L2-normalised patch-token grids."""

    def __init__(
        self,
        model: torch.nn.Module,
        name: str,
        image_size: int = 448,
        layers: Sequence[int] = (-1,),
        normalize: bool = True,
        device: str | torch.device = "cpu",
        is_random: bool = False,
        runtime: str = "torch",
        precision: str | None = None,
        transformers_model: Callable[[], torch.nn.Module] | None = None,
    ) -> None:
        config = model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelFileError(
                f"{name} is a {config.model_type!r} model; normdino supports {', '.join(SUPPORTED_MODEL_TYPES)}."
            )
        if config.model_type in vit.PLAIN_MODEL_TYPES and not isinstance(model, vit.DinoV2):
            model = vit.from_transformers(model)  # one forward pass for every DINOv2, whoever built it
            config = model.config
        self.transformers_model = transformers_model
        self.device = resolve_device(device)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.config = config
        self.name = name
        self.patch_size = int(config.patch_size)
        self.embed_dim = int(config.hidden_size)
        self.num_layers = int(config.num_hidden_layers)
        self.num_prefix_tokens = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        if int(image_size) < self.patch_size:
            raise InputError(f"image_size={image_size} is smaller than the patch size {self.patch_size}.")
        self.image_size = int(image_size) // self.patch_size * self.patch_size
        self.layers = self._resolve_layers(layers)
        self.normalize = bool(normalize)
        self.is_random = bool(is_random)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.runtime = str(runtime)
        self.precision = resolve_precision(precision, self.device)
        check_supported(self.runtime, self.precision, self.device)
        self._runner = self._build_runner()
        if self.is_random:
            logger.warning(
                "Backbone %s has RANDOM weights: its tokens are meaningless for detection quality; "
                "use it only for tests and timing.", name,
            )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        image_size: int = 448,
        layers: Sequence[int] = (-1,),
        normalize: bool = True,
        device: str | torch.device = "cpu",
        runtime: str = "torch",
        precision: str | None = None,
    ) -> "Backbone":
        """Load a hub name, an alias, a ``save_pretrained`` folder or a ``.safetensors`` file beside its config.json.

        ``runtime`` (torch, onnx, openvino) and ``precision`` (fp32, int8, bf16; None: bf16 on CUDA, else fp32)
        choose how the forward pass runs (see normdino.features.runtimes).
        """
        model, name = load_model(name_or_path)
        is_random = bool(getattr(model.config, RANDOM_MARKER, False))
        return cls(model, name, image_size, layers, normalize, device, is_random=is_random, runtime=runtime,
                   precision=precision, transformers_model=lambda: load_model(name_or_path, plain=False)[0])

    @classmethod
    def random(
        cls, arch: str = "dinov2_vits14", seed: int = 0, tiny: bool = False, **kwargs: Any
    ) -> "Backbone":
        """The architecture of ``arch`` with seeded random weights, for tests and timing only."""
        model = build_random_model(arch, seed, tiny)
        name = f"random{'-tiny' if tiny else ''}-{arch}-seed{seed}"
        return cls(model, name, is_random=True, transformers_model=lambda: build_random_model(arch, seed, tiny),
                   **kwargs)

    # ------------------------------------------------------------------ geometry and keys
    def grid_shape(self) -> tuple[int, int]:
        """(h, w) of the token grid for a preprocessed image."""
        side = self.image_size // self.patch_size
        return side, side

    def _resolve_layers(self, layers: Sequence[int]) -> tuple[int, ...]:
        """Map layer numbers (negative from the end) to indices 0..num_layers of hidden_states."""
        if isinstance(layers, int):
            layers = (layers,)
        resolved = []
        n = self.num_layers
        for layer in layers:
            if not isinstance(layer, (int, np.integer)) or not -(n + 1) <= layer <= n:
                raise InputError(f"Layer {layer!r} does not exist in {self.name}: use -{n + 1}..{n} ({n} blocks).")
            resolved.append(int(layer) % (n + 1))
        if not resolved:
            raise InputError("At least one layer must be requested.")
        return tuple(resolved)

    @functools.cached_property
    def weights_digest(self) -> str:
        """Hash of the architecture and of every byte of the weights (computed once: the weights are frozen)."""
        return weights_fingerprint(self.model)

    @property
    def identifier(self) -> str:
        """Key of everything that changes the tokens: architecture and weights (every byte), resolution, layers,
        normalisation, precision, runtime, preprocessing and the library versions; the model's name or folder is
        not part of it, so moving a model folder keeps its cached tokens."""
        return self._identifier(self.weights_digest)

    def identifier_before_plain_vit(self) -> str | None:
        """The identifier model files written before normdino ran DINOv2 itself recorded: the weights hashed as
        transformers' module (loads transformers: seconds, for those files only), or None for DINOv3."""
        if not isinstance(self.model, vit.DinoV2) or self.transformers_model is None:
            return None
        return self._identifier(weights_fingerprint(self.transformers_model()))

    def _identifier(self, weights_digest: str) -> str:
        layers = ",".join(map(str, self.layers))
        return (
            f"{self.config.model_type}|weights={weights_digest}|size={self.image_size}|layers={layers}"
            f"|normalize={self.normalize}|precision={getattr(self, 'precision', None)}{self._precision_mode()}"
            f"|runtime={getattr(self, 'runtime', None)}|prep={PREPROCESSING_VERSION}"
            f"|{vit.implementation(self.model)}|torch={torch.__version__}"
        )

    # ------------------------------------------------------------------ computation
    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """(H, W) or (H, W, 3) float image in [0, 1] -> (3, S, S) model input."""
        return preprocess_image(image, self.image_size, self.mean, self.std)

    def encode(self, pixel_values: torch.Tensor) -> BackboneOutput:
        """One forward pass: patch tokens (B, L, h, w, D) and CLS tokens (B, L, D) of the requested layers."""
        pixels = self._check_pixels(pixel_values)
        batch, _, height, width = pixels.shape
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        with torch.inference_mode(), self._autocast():
            if self._runner is None:
                tokens = hidden_tokens(self.model, pixels, self.layers).float()
            else:
                tokens = self._runner(pixels if self.runtime == "torch" else self._check_graph_size(pixels))
            cls_tokens = tokens[:, :, 0]
            patches = tokens[:, :, self.num_prefix_tokens :].reshape(batch, len(self.layers), grid_h, grid_w, -1)
            if self.normalize:
                cls_tokens = F.normalize(cls_tokens, dim=-1)
                patches = F.normalize(patches, dim=-1)
        # clones made outside inference mode are ordinary tensors that callers may modify in place
        return BackboneOutput(patch_tokens=patches.clone(), cls_tokens=cls_tokens.clone())

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, h, w, D) patch tokens of the last requested layer."""
        return self.encode(pixel_values).patch_tokens[:, -1]

    def iter_encoded(
        self,
        images: Sequence[Path | str | np.ndarray],
        batch_size: int = 8,
        progress: bool = True,
        workers: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Iterator[tuple[int, BackboneOutput]]:
        """Yield (index of the first image, BackboneOutput on the CPU in ``dtype``) batch by batch over a dataset.

        ``workers`` threads (None: normdino.parallel.default_workers) read and preprocess the next images while
        the model runs; tokens are cast to ``dtype`` on the device, so float16 halves the copy off a GPU.
        """
        if int(batch_size) < 1:
            raise InputError(f"batch_size must be at least 1, got {batch_size}.")
        images = list(images)
        workers = default_workers(self.device) if workers is None else int(workers)
        load = functools.partial(load_pixels, size=self.image_size, mean=self.mean, std=self.std)
        pixels = ordered_map(load, images, workers, ahead=max(2 * workers, 2 * int(batch_size)))
        start = 0
        with tqdm(total=len(images), unit="img", desc="DINO tokens", disable=not progress) as bar:
            while batch := list(itertools.islice(pixels, int(batch_size))):
                out = self.encode(torch.stack(batch))
                yield start, BackboneOutput(out.patch_tokens.to(dtype).cpu(), out.cls_tokens.to(dtype).cpu())
                start += len(batch)
                bar.update(len(batch))

    def embed_images(
        self,
        images: Sequence[Path | str | np.ndarray],
        batch_size: int = 8,
        progress: bool = True,
        workers: int | None = None,
        all_layers: bool = False,
    ) -> torch.Tensor:
        """(N, h, w, D) float32 tokens of the last requested layer, or (N, L, h, w, D) with ``all_layers``."""
        images = list(images)
        grid_h, grid_w = self.grid_shape()
        n_layers = len(self.layers)
        shape = (len(images), n_layers, grid_h, grid_w, self.embed_dim)
        result = torch.empty(shape if all_layers else shape[:1] + shape[2:], dtype=torch.float32)
        for start, out in self.iter_encoded(images, batch_size, progress, workers):
            tokens = out.patch_tokens if all_layers else out.patch_tokens[:, -1]
            result[start : start + len(tokens)] = tokens
        return result

    # ------------------------------------------------------------------ helpers
    def _check_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Validate a (B, 3, H, W) batch (H, W multiples of the patch size) and move it to the device."""
        if not isinstance(pixel_values, torch.Tensor):
            raise InputError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}.")
        if pixel_values.ndim == 3:
            pixel_values = pixel_values[None]
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise InputError(f"pixel_values must have shape (B, 3, H, W), got {tuple(pixel_values.shape)}.")
        height, width = pixel_values.shape[-2:]
        if height % self.patch_size or width % self.patch_size or height == 0 or width == 0:
            raise InputError(
                f"Input of {height}x{width} pixels is not a multiple of the patch size {self.patch_size}; "
                "use Backbone.preprocess."
            )
        return pixel_values.to(self.device, torch.float32)

    def _final_norm(self) -> torch.nn.Module:
        """The model's final LayerNorm (``layernorm`` in DINOv2, ``norm`` in DINOv3)."""
        norm = getattr(self.model, "layernorm", None)
        if norm is None:
            norm = getattr(self.model, "norm", None)
        if not isinstance(norm, torch.nn.Module):
            raise ModelFileError(f"{self.name} has no final LayerNorm; is it a DINOv2/DINOv3 ViT?")
        return norm

    def _precision_mode(self) -> str:
        """How bf16 runs, for the identifier: bf16 weights on a GPU give other tokens than autocast on a CPU."""
        if getattr(self, "precision", None) != "bf16":
            return ""
        return "/weights" if self.device.type == "cuda" else "/autocast"

    def _autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast when precision is bf16 (CUDA, or a CPU with bf16 instructions); plain fp32 otherwise."""
        if self.precision == "bf16" and self._runner is None:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _build_runner(self) -> Runner | None:
        """None for torch fp32 on a GPU (bf16 there runs a converted copy); on a CPU torch runs images side by side
        (fp32, bf16 autocast, or a converted INT8 copy); onnx/openvino load a cached export.

        ``self.model`` stays the fp32 model in every case, so the weights digest and derived backbones see it.
        """
        if self.runtime == "torch":
            layers = self.layers
            if self.precision == "bf16" and self.device.type == "cuda":
                # bf16 weights run 1.2-1.25x faster than fp32 weights under autocast on an H200 (bench_gpu.py,
                # ViT-S/B at batch 64), token cosine to fp32 0.99995 instead of 0.99999
                weights_bf16 = bf16_copy(self.model)
                return lambda pixels: hidden_tokens(weights_bf16, pixels.to(torch.bfloat16), layers).float()
            if self.device.type != "cpu":
                return None
            model = torch_int8_model(self.model) if self.precision == "int8" else self.model
            context = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16) if self.precision == "bf16" \
                else contextlib.nullcontext
            return image_parallel_runner(lambda pixels: hidden_tokens(model, pixels, layers).float(),
                                         torch.get_num_threads(), context)
        return graph_runner(self.runtime, self.precision, self.model, self.weights_digest, self.image_size,
                            self.layers)

    def _check_graph_size(self, pixels: torch.Tensor) -> torch.Tensor:
        """Exported graphs have a fixed input size: refuse any other in one sentence."""
        if tuple(pixels.shape[-2:]) != (self.image_size, self.image_size):
            raise InputError(
                f"The {self.runtime} runtime was exported for {self.image_size}x{self.image_size} inputs, got "
                f"{pixels.shape[-2]}x{pixels.shape[-1]}; use Backbone.preprocess or --runtime torch."
            )
        return pixels

    def __repr__(self) -> str:
        return (
            f"Backbone({self.name!r}, image_size={self.image_size}, layers={self.layers}, "
            f"normalize={self.normalize}, device='{self.device}', runtime={self.runtime!r}, "
            f"precision={self.precision!r}, random={self.is_random})"
        )


def bf16_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with bf16 floating-point weights, made without a second fp32 copy on the device.

    Equal to ``copy.deepcopy(model).to(torch.bfloat16)``, whose fp32 intermediate would briefly need twice
    the model's memory on the GPU.
    """
    memo: dict[int, Any] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.is_floating_point():
            half = tensor.detach().to(torch.bfloat16)
            memo[id(tensor)] = torch.nn.Parameter(half, requires_grad=False) if isinstance(
                tensor, torch.nn.Parameter) else half
    return copy.deepcopy(model, memo)


# ---------------------------------------------------------------------- devices
def resolve_device(device: str | torch.device) -> torch.device:
    """'cpu', 'cuda[:i]', 'mps' or 'auto' -> torch.device, with a clear error when it is not available."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InputError(f"Unknown device {device!r}; use 'cpu', 'cuda', 'mps' or 'auto'.") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"Device {device!r} was requested but this torch build sees no CUDA GPU; use 'cpu'.")
    if resolved.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError(f"Device {device!r} was requested but MPS is not available here; use 'cpu'.")
    return resolved
