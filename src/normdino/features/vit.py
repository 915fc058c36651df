"""DINOv2 ViTs (with or without registers) as plain torch modules over the hub's weight files.

They compute what transformers' ``Dinov2Model`` / ``Dinov2WithRegistersModel`` compute (the same operations in
the same order, so the same float32 tokens) without importing transformers' modelling code, which costs ~3 s of
CPU at every start: a seventh of ``normdino predict`` on 40 images on a laptop. Parameter names are the hub's
(``encoder.layer.0.attention.attention.query.weight``...), so ``model.safetensors`` loads as it is; a module
built by transformers converts with :func:`from_transformers`. DINOv3 (RoPE) stays on transformers.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from normdino.errors import ModelFileError

PLAIN_MODEL_TYPES = ("dinov2", "dinov2_with_registers")
IMPLEMENTATION = "normdino-vit/1"
"""Names this module's forward pass in backbone identifiers (it replaces the transformers version there)."""


@dataclass(frozen=True)
class ViTConfig:
    """The architecture fields of a DINOv2 config.json that change what the model computes (hub defaults)."""

    model_type: str = "dinov2"
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    patch_size: int = 14
    image_size: int = 518
    mlp_ratio: float = 4.0
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    layerscale_value: float = 1.0
    qkv_bias: bool = True
    use_swiglu_ffn: bool = False
    num_register_tokens: int = 0
    num_channels: int = 3
    normdino_random_weights: bool = False

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config.json") -> "ViTConfig":
        """The known fields of a config dict (others are ignored, as transformers keeps but never uses them)."""
        known = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in values.items() if k in known and v is not None})
        if config.model_type not in PLAIN_MODEL_TYPES:
            raise ModelFileError(f"{source} describes a {config.model_type!r} model, not a DINOv2 ViT.")
        if config.hidden_act != "gelu" and not config.use_swiglu_ffn:
            raise ModelFileError(f"{source} asks for the activation {config.hidden_act!r}; DINOv2 uses 'gelu'.")
        if config.hidden_size % config.num_attention_heads:
            raise ModelFileError(f"{source}: hidden_size {config.hidden_size} is not a multiple of "
                                 f"num_attention_heads {config.num_attention_heads}.")
        return config

    @classmethod
    def from_file(cls, path: Path) -> "ViTConfig":
        """Read a config.json (one ModelFileError sentence when it is not valid JSON)."""
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise ModelFileError(f"{path} is not a valid config.json ({err}).") from err
        if not isinstance(values, dict):
            raise ModelFileError(f"{path} is not a valid config.json (not a JSON object).")
        return cls.from_dict(values, str(path))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ViTOutput:
    """What ``Dinov2Model`` returns that normdino reads: the normed last layer and, on request, every layer."""

    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


class _PatchEmbeddings(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.projection = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, config.patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.projection(pixels.to(self.projection.weight.dtype)).flatten(2).transpose(1, 2)


class _Embeddings(nn.Module):
    """CLS token + patch embeddings + (interpolated) position embeddings, then the register tokens if any."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        side = config.image_size // config.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.mask_token = nn.Parameter(torch.zeros(1, config.hidden_size))  # pre-training only; kept for the file
        if config.num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, config.num_register_tokens, config.hidden_size))
        self.patch_embeddings = _PatchEmbeddings(config)
        self.position_embeddings = nn.Parameter(torch.zeros(1, side * side + 1, config.hidden_size))
        self.patch_size = config.patch_size
        self.antialias = bool(config.num_register_tokens)  # transformers antialiases only with registers
        self._resized: dict[tuple, torch.Tensor] = {}  # per input size: the weights are frozen

    def interpolate_pos_encoding(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Position embeddings for an input of height x width pixels: bicubic from the trained grid (computed
        once per size, device and dtype; a few ms per image otherwise)."""
        positions = self.position_embeddings
        trained = positions.shape[1] - 1
        if torch.jit.is_tracing():
            return self._resize(height, width)
        if embeddings.shape[1] - 1 == trained and height == width:
            return positions
        key = (height, width, positions.device, positions.dtype, positions.data_ptr())
        if key not in self._resized:
            with torch.inference_mode(False), torch.no_grad():  # an ordinary tensor, whatever mode called first
                self._resized = {key: self._resize(height, width)}
        return self._resized[key]

    def _resize(self, height: int, width: int) -> torch.Tensor:
        positions = self.position_embeddings
        side, dim = int(math.isqrt(positions.shape[1] - 1)), positions.shape[-1]
        grid = positions[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.to(torch.float32), size=(height // self.patch_size, width // self.patch_size),
                             mode="bicubic", align_corners=False, antialias=self.antialias).to(positions.dtype)
        return torch.cat((positions[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = pixels.shape
        tokens = self.patch_embeddings(pixels)
        tokens = torch.cat((self.cls_token.expand(batch, -1, -1), tokens), dim=1)
        tokens = tokens + self.interpolate_pos_encoding(tokens, height, width)
        if hasattr(self, "register_tokens"):
            tokens = torch.cat((tokens[:, :1], self.register_tokens.expand(batch, -1, -1), tokens[:, 1:]), dim=1)
        return tokens


class _LayerScale(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.lambda1 = nn.Parameter(torch.full((config.hidden_size,), float(config.layerscale_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.lambda1


class _Attention(nn.Module):
    """Multi-head self-attention with the hub's names: attention.{query,key,value}, output.dense."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        width, bias = config.hidden_size, config.qkv_bias
        self.heads = config.num_attention_heads
        self.head_dim = width // self.heads
        self.attention = nn.ModuleDict({name: nn.Linear(width, width, bias=bias) for name in ("query", "key", "value")})
        self.output = nn.ModuleDict({"dense": nn.Linear(width, width)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = (self.attention[name](x).view(batch, length, -1, self.head_dim).transpose(1, 2)
                   for name in ("query", "key", "value"))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, scale=self.head_dim ** -0.5, is_causal=False)
        out = out.transpose(1, 2).contiguous().reshape(batch, length, -1).contiguous()
        return self.output["dense"](out)


class _MLP(nn.Module):
    """fc1 -> exact GELU -> fc2 (ViT-S/B/L)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        hidden = int(config.hidden_size * config.mlp_ratio)
        self.fc1 = nn.Linear(config.hidden_size, hidden)
        self.fc2 = nn.Linear(hidden, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _SwiGLU(nn.Module):
    """weights_in (gate and up, stacked as in the hub file) -> SiLU(gate) * up -> weights_out (ViT-g)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        hidden = (int(int(config.hidden_size * config.mlp_ratio) * 2 / 3) + 7) // 8 * 8
        self.weights_in = nn.Linear(config.hidden_size, 2 * hidden)
        self.weights_out = nn.Linear(hidden, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # two products, as transformers computes them (one stacked product rounds differently)
        (gate_w, up_w), (gate_b, up_b) = self.weights_in.weight.chunk(2), self.weights_in.bias.chunk(2)
        return self.weights_out(F.silu(F.linear(x, gate_w, gate_b)) * F.linear(x, up_w, up_b))


class _Block(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = _Attention(config)
        self.layer_scale1 = _LayerScale(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = _SwiGLU(config) if config.use_swiglu_ffn else _MLP(config)
        self.layer_scale2 = _LayerScale(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer_scale1(self.attention(self.norm1(x))) + x
        return self.layer_scale2(self.mlp(self.norm2(x))) + x


class _Encoder(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Block(config) for _ in range(config.num_hidden_layers))


class DinoV2(nn.Module):
    """A DINOv2 ViT: ``forward(pixel_values, output_hidden_states)`` as ``Dinov2Model`` (eval mode, no masking)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> ViTOutput:
        x = self.embeddings(pixel_values)
        hidden = [x]
        for block in self.encoder.layer:
            x = block(x)
            hidden.append(x)
        return ViTOutput(self.layernorm(x), tuple(hidden) if output_hidden_states else None)


def implementation(model: nn.Module) -> str:
    """Who computes the forward pass, for identifiers and export keys: this module, or a transformers release."""
    if isinstance(model, DinoV2):
        return f"impl={IMPLEMENTATION}"
    from importlib.metadata import version

    return f"transformers={version('transformers')}"


# ---------------------------------------------------------------------- weights
_FROM_TRANSFORMERS_5 = (  # transformers >= 5 renames the hub's keys when it loads them; undo that
    (".attention.q_proj.", ".attention.attention.query."),
    (".attention.k_proj.", ".attention.attention.key."),
    (".attention.v_proj.", ".attention.attention.value."),
    (".attention.o_proj.", ".attention.output.dense."),
    (".mlp.down_proj.", ".mlp.weights_out."),
)


def hub_state_dict(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors under the hub's names, whether they come from a file or from a transformers 4/5 module."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        key = key.removeprefix("dinov2.").removeprefix("dinov2_with_registers.")  # a task model's base
        for new, hub in _FROM_TRANSFORMERS_5:
            key = key.replace(new, hub)
        out[key] = tensor
    for gate_key in [k for k in out if ".mlp.gate_proj." in k]:  # SwiGLU: gate and up stacked as weights_in
        up_key = gate_key.replace(".gate_proj.", ".up_proj.")
        out[gate_key.replace(".gate_proj.", ".weights_in.")] = torch.cat((out.pop(gate_key), out.pop(up_key)))
    return out


def build(config: ViTConfig, tensors: Mapping[str, torch.Tensor], source: str) -> DinoV2:
    """A DinoV2 holding ``tensors`` (hub or transformers names), refusing missing or misshapen ones in a sentence."""
    with torch.device("meta"):
        model = DinoV2(config)
    tensors = hub_state_dict(tensors)
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in tensors and not k.endswith("mask_token"))
    if missing:
        raise ModelFileError(f"{source} does not hold the weights of the {config.model_type} model in its "
                             f"config.json ({len(missing)} tensors missing, e.g. {missing[0]!r}).")
    state = {}
    for key, meta in expected.items():
        tensor = tensors[key] if key in tensors else torch.zeros(meta.shape)  # only an unused mask_token is absent
        if tuple(tensor.shape) != tuple(meta.shape):
            raise ModelFileError(f"{source}: tensor {key!r} has shape {tuple(tensor.shape)}, but the config.json "
                                 f"architecture needs {tuple(meta.shape)}.")
        state[key] = tensor.to(torch.float32)
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False)


def load_folder(folder: Path, config: ViTConfig) -> DinoV2:
    """config.json + model.safetensors of a ``save_pretrained`` folder (or a hub snapshot) -> fp32 DinoV2."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(folder) / "model.safetensors"
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelFileError(f"{file} is not a readable safetensors file ({err}).") from err
    return build(config, tensors, str(folder))


def from_transformers(model: nn.Module) -> DinoV2:
    """The same network as a transformers ``Dinov2Model``/``Dinov2WithRegistersModel``, as a DinoV2."""
    config = ViTConfig.from_dict(model.config.to_dict(), type(model).__name__)
    return build(config, {k: v.detach() for k, v in model.state_dict().items()}, type(model).__name__)
