"""What a backbone is built from: the DINOv2/DINOv3 architectures by alias, seeded random weights, and weights
from a local folder, a ``.safetensors`` file, the offline store of ``normdino weights import`` or the Hugging
Face Hub (with one clear sentence when they cannot be had); and the fingerprint that names a set of weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import torch

from normdino.errors import InputError, ModelFileError, WeightsNotFoundError
from normdino.features import vit

logger = logging.getLogger(__name__)

ALIASES: dict[str, str] = {
    "dinov2_vits14": "facebook/dinov2-small",
    "dinov2_vitb14": "facebook/dinov2-base",
    "dinov2_vitl14": "facebook/dinov2-large",
    "dinov2_vitg14": "facebook/dinov2-giant",
    "dinov2_vits14_reg": "facebook/dinov2-with-registers-small",
    "dinov2_vitb14_reg": "facebook/dinov2-with-registers-base",
    "dinov2_vitl14_reg": "facebook/dinov2-with-registers-large",
    "dinov2_vitg14_reg": "facebook/dinov2-with-registers-giant",
    "dinov3_vits16": "facebook/dinov3-vits16-pretrain-lvd1689m",
    "dinov3_vits16plus": "facebook/dinov3-vits16plus-pretrain-lvd1689m",
    "dinov3_vitb16": "facebook/dinov3-vitb16-pretrain-lvd1689m",
    "dinov3_vitl16": "facebook/dinov3-vitl16-pretrain-lvd1689m",
    "dinov3_vith16plus": "facebook/dinov3-vith16plus-pretrain-lvd1689m",
    "dinov3_vit7b16": "facebook/dinov3-vit7b16-pretrain-lvd1689m",
}

SUPPORTED_MODEL_TYPES = ("dinov2", "dinov2_with_registers", "dinov3_vit")
RANDOM_MARKER = "normdino_random_weights"

_DINOV2 = dict(
    model_type="dinov2", patch_size=14, image_size=518, mlp_ratio=4, hidden_act="gelu", layer_norm_eps=1e-6,
    layerscale_value=1.0, qkv_bias=True, use_swiglu_ffn=False, num_channels=3,
)
_DINOV3 = dict(
    model_type="dinov3_vit", patch_size=16, image_size=224, hidden_act="gelu", layer_norm_eps=1e-5,
    layerscale_value=1.0, num_register_tokens=4, rope_theta=100.0, query_bias=True, key_bias=False,
    value_bias=True, proj_bias=True, mlp_bias=True, use_gated_mlp=False, pos_embed_rescale=2.0, num_channels=3,
)
_SIZES_V2 = {
    "s": dict(hidden_size=384, num_attention_heads=6, num_hidden_layers=12),
    "b": dict(hidden_size=768, num_attention_heads=12, num_hidden_layers=12),
    "l": dict(hidden_size=1024, num_attention_heads=16, num_hidden_layers=24),
    "g": dict(hidden_size=1536, num_attention_heads=24, num_hidden_layers=40, use_swiglu_ffn=True),
}
_GATED = dict(use_gated_mlp=True, hidden_act="silu")
_SIZES_V3 = {
    "s16": dict(hidden_size=384, intermediate_size=1536, num_attention_heads=6, num_hidden_layers=12),
    "s16plus": dict(hidden_size=384, intermediate_size=1536, num_attention_heads=6, num_hidden_layers=12, **_GATED),
    "b16": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12),
    "l16": dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24),
    "h16plus": dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, **_GATED),
}
# Architecture fields of the hub config.json of each alias (weights are not needed to build them).
HUB_CONFIGS: dict[str, dict[str, Any]] = {
    **{f"dinov2_vit{k}14": {**_DINOV2, **v} for k, v in _SIZES_V2.items()},
    **{
        f"dinov2_vit{k}14_reg": {**_DINOV2, "model_type": "dinov2_with_registers", "num_register_tokens": 4, **v}
        for k, v in _SIZES_V2.items()
    },
    **{f"dinov3_vit{k}": {**_DINOV3, **v} for k, v in _SIZES_V3.items()},
}
_TINY = dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=2)


def hub_config(arch: str, tiny: bool = False):
    """A ``transformers`` config with the hub architecture of ``arch`` (an alias); ``tiny`` shrinks it for tests."""
    from transformers import AutoConfig

    if arch not in HUB_CONFIGS:
        raise InputError(f"Unknown architecture {arch!r}; choose one of {', '.join(HUB_CONFIGS)}.")
    fields = dict(HUB_CONFIGS[arch])
    if tiny:
        fields.update(_TINY)
        if "intermediate_size" in fields:
            fields["intermediate_size"] = 4 * _TINY["hidden_size"]
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **fields)


# config fields that name or describe a file rather than change what the model computes
_CONFIG_NOT_HASHED = {"architectures", "transformers_version", "dtype", "torch_dtype", RANDOM_MARKER}


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 (32 hex) of the architecture config and of every state_dict tensor's name, dtype, shape and bytes.

    Every byte counts, so one changed value anywhere gives another fingerprint. Tensors are hashed on a few
    threads (hashlib releases the GIL); ViT-S/14 takes ~0.1 s on one core. A DINOv2 run by normdino
    (normdino.features.vit) hashes its architecture fields and the hub's tensor names, which no transformers
    release changes; a transformers module (DINOv3) hashes transformers' full config and names.
    """
    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k not in _CONFIG_NOT_HASHED}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    tensors = sorted(model.state_dict().items())
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        for tensor_digest in pool.map(_tensor_digest, tensors):
            digest.update(tensor_digest)
    return digest.hexdigest()[:32]


def _tensor_digest(item: tuple[str, torch.Tensor]) -> bytes:
    """SHA-256 of one named tensor: name, dtype, shape and raw bytes (any dtype, any device)."""
    key, tensor = item
    if not isinstance(tensor, torch.Tensor):  # e.g. packed parameters of a quantised module
        return hashlib.sha256(f"{key}:{tensor!r}".encode()).digest()
    digest = hashlib.sha256(f"{key}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    digest.update(memoryview(raw))
    return digest.digest()


def build_random_model(arch: str = "dinov2_vits14", seed: int = 0, tiny: bool = False) -> torch.nn.Module:
    """A ``transformers`` model of ``arch`` with weights drawn from a seeded generator (global RNG untouched)."""
    from transformers import AutoModel

    config = hub_config(arch, tiny)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModel.from_config(config, dtype=torch.float32)
    setattr(model.config, RANDOM_MARKER, True)
    return model.eval()


def save_random_backbone(
    directory: str | os.PathLike, arch: str = "dinov2_vits14", seed: int = 0, tiny: bool = False
) -> Path:
    """Save a seeded random model of ``arch`` with ``save_pretrained`` (config.json + model.safetensors); return the folder."""
    final = Path(directory)
    if final.exists() and any(final.iterdir()):
        raise InputError(f"{final} already exists and is not empty; choose a new folder for the random backbone.")
    model = build_random_model(arch, seed, tiny)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        model.save_pretrained(tmp)
        if final.exists():
            final.rmdir()
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final


WEIGHTS_RECORD = "normdino-weights.json"
"""The record ``normdino weights import`` writes beside imported weights (normdino.features.weights)."""


def default_weights_dir() -> Path:
    """Where imported weights live: $NORMDINO_WEIGHTS_DIR, else ~/.cache/normdino/weights."""
    return Path(os.environ.get("NORMDINO_WEIGHTS_DIR") or Path.home() / ".cache" / "normdino" / "weights")


def imported_folder(alias: str, store: str | os.PathLike | None = None) -> Path | None:
    """The folder of imported weights for ``alias`` (e.g. dinov2_vits14), or None when none were imported."""
    folder = Path(store) if store is not None else default_weights_dir()
    folder = folder / alias
    return folder if (folder / WEIGHTS_RECORD).is_file() and (folder / "model.safetensors").is_file() else None


def load_model(name_or_path: str | os.PathLike, plain: bool = True) -> tuple[torch.nn.Module, str]:
    """Resolve an alias, local folder, .safetensors file or hub name into an fp32 model and a display name.

    An alias (or its hub name) whose weights were imported with ``normdino weights import`` loads from the
    offline store (normdino.features.weights) under the hub name, before any hub lookup. DINOv2 weights in
    safetensors load as a normdino.features.vit.DinoV2 unless ``plain`` is False (then as transformers' module).
    """
    text = str(name_or_path)
    alias = text if text in ALIASES else next((a for a, repo in ALIASES.items() if repo == text), None)
    if alias is not None and (folder := imported_folder(alias)) is not None:  # `normdino weights import`: offline
        return _load_local_dir(folder, plain), ALIASES[alias]
    name = ALIASES.get(text, text)
    path = Path(name).expanduser()
    if path.is_dir():
        return _load_local_dir(path, plain), str(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ModelFileError(f"{path} is not a .safetensors file; pass a model folder, a .safetensors file or a hub name.")
        return _load_safetensors(path, plain), str(path)
    if isinstance(name_or_path, os.PathLike) or _looks_like_path(text):
        raise WeightsNotFoundError(f"Backbone weights {path} do not exist; pass an existing folder or .safetensors file.")
    if "/" not in name:
        raise WeightsNotFoundError(
            f"Backbone {text!r} is neither a known alias ({', '.join(ALIASES)}), an existing path, "
            "nor a hub repo id such as 'facebook/dinov2-small'."
        )
    return _load_from_hub(name, plain), name


def _looks_like_path(text: str) -> bool:
    """True for strings that can only be file paths, never hub repo ids ('org/name')."""
    return (
        text.startswith((".", "/", "~", "\\")) or text.endswith(".safetensors") or text.count("/") > 1
        or "\\" in text or (len(text) > 1 and text[1] == ":")
    )


def _check_config(config, source: str) -> None:
    """Reject configs of models that are not DINOv2/DINOv3 ViTs."""
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelFileError(
            f"{source} holds a {config.model_type!r} model; normdino supports DINOv2/DINOv3 ViTs "
            f"({', '.join(SUPPORTED_MODEL_TYPES)})."
        )


def _read_config(folder: Path):
    """The transformers config in ``folder``, or a ModelFileError saying what is wrong with it."""
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise ModelFileError(f"{folder} has no config.json; save the backbone with save_pretrained or pass a hub name.")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ModelFileError(f"{folder / 'config.json'} is not a valid transformers config ({err}).") from err
    _check_config(config, str(folder))
    return config


def _plain_config(folder: Path, weights: str = "model.safetensors") -> vit.ViTConfig | None:
    """The folder's config when normdino runs it without transformers (DINOv2 weights in safetensors), else None."""
    file = folder / "config.json"
    if not file.is_file():
        raise ModelFileError(f"{folder} has no config.json; save the backbone with save_pretrained or pass a hub name.")
    try:
        model_type = json.loads(file.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise ModelFileError(f"{file} is not a valid transformers config ({err}).") from err
    if model_type not in vit.PLAIN_MODEL_TYPES or not (folder / weights).is_file():
        return None
    return vit.ViTConfig.from_file(file)


def _load_local_dir(folder: Path, plain: bool = True) -> torch.nn.Module:
    """A ``save_pretrained`` folder -> model (DINOv2 without transformers' modelling code, see normdino.features.vit)."""
    config = _plain_config(folder) if plain else None
    if config is not None:
        return vit.load_folder(folder, config)
    return _from_folder(folder, _read_config(folder), str(folder))


def _load_safetensors(file: Path, plain: bool = True) -> torch.nn.Module:
    """A .safetensors file beside its config.json -> model (a DINOv2 directly, others through transformers' own key
    conversion)."""
    from safetensors import SafetensorError, safe_open

    config = _plain_config(file.parent, file.name) if plain and (file.parent / "config.json").is_file() else None
    if config is not None:
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(file))
        except (SafetensorError, OSError, ValueError) as err:
            raise ModelFileError(f"{file} is not a readable safetensors file ({err}).") from err
        return vit.build(config, tensors, str(file))
    config = _read_config(file.parent)
    try:
        with safe_open(str(file), framework="pt"):
            pass
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelFileError(f"{file} is not a readable safetensors file ({err}).") from err
    with tempfile.TemporaryDirectory(prefix="normdino-weights-") as staging:
        staged = Path(staging)
        shutil.copyfile(file.parent / "config.json", staged / "config.json")
        try:
            (staged / "model.safetensors").symlink_to(file.resolve())
        except OSError:  # no symlinks (e.g. Windows without developer mode): copy instead
            shutil.copyfile(file, staged / "model.safetensors")
        return _from_folder(staged, config, str(file))


def _from_folder(folder: Path, config, source: str, local_only: bool = True) -> torch.nn.Module:
    """Load fp32 weights from a folder (or hub repo) and refuse checkpoints that leave model tensors uninitialised."""
    from transformers import AutoModel

    try:
        model, info = AutoModel.from_pretrained(
            folder, config=config, local_files_only=local_only, dtype=torch.float32, output_loading_info=True
        )
    except OSError as err:
        if local_only and Path(folder).is_dir():
            raise WeightsNotFoundError(
                f"{source} has a config.json but no readable weights (model.safetensors); save the model again ({err})."
            ) from err
        raise
    missing = [key for key in info.get("missing_keys", ()) if not key.endswith("mask_token")]
    if missing:
        raise ModelFileError(
            f"{source} does not hold the weights of the {config.model_type} model in its config.json "
            f"({len(missing)} tensors missing, e.g. {sorted(missing)[0]!r})."
        )
    return model.eval()


def _offline() -> bool:
    """True when the user has switched the Hugging Face hub off (read now, not at import time)."""
    return any(
        os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _hub_reachable(timeout: float = 2.0) -> bool:
    """A quick TCP connect to the hub endpoint, so an unreachable hub fails in seconds, not after 30 s of retries."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def _load_from_hub(repo: str, plain: bool = True) -> torch.nn.Module:
    """A hub repo id -> model, from the local cache first; one clear sentence when that is impossible."""
    cached = _cached_hub_model(repo) if plain else None
    if cached is not None:  # before importing anything of transformers (~1-3 s)
        return cached
    from transformers import AutoConfig

    gated_hint = (
        f" DINOv3 weights are gated: accept the licence at https://huggingface.co/{repo} and log in "
        "(`hf auth login` or the HF_TOKEN variable)."
        if "dinov3" in repo.lower() else ""
    )
    local_hint = "or pass a local folder saved with save_pretrained (or a .safetensors file beside its config.json)"
    attempts = [True] if _offline() else [True, False]
    for local_only in attempts:
        if not local_only and not _hub_reachable():
            break
        try:
            config = AutoConfig.from_pretrained(repo, local_files_only=local_only)
            _check_config(config, repo)
            return _from_folder(repo, config, repo, local_only=local_only)
        except OSError as err:
            if _is_gated(err):
                raise WeightsNotFoundError(
                    f"{repo} is a gated repository: accept its licence at https://huggingface.co/{repo} and provide "
                    "a Hugging Face token (`hf auth login` or the HF_TOKEN variable)."
                ) from err
            if not local_only and not _is_connection_error(err):
                raise WeightsNotFoundError(
                    f"Backbone {repo!r} is neither an alias ({', '.join(ALIASES)}), a local path, nor a model on "
                    f"the Hugging Face hub ({err})."
                ) from err
    reason = "offline mode is on (HF_HUB_OFFLINE)" if _offline() else "the Hugging Face hub is unreachable"
    raise WeightsNotFoundError(
        f"Weights of {repo!r} are not in the local Hugging Face cache and {reason}: download them once on a machine "
        f"with internet, {local_hint}.{gated_hint}"
    )


def _cached_hub_model(repo: str) -> torch.nn.Module | None:
    """A DINOv2 whose config.json and model.safetensors are in the local hub cache, loaded without transformers."""
    from huggingface_hub import try_to_load_from_cache

    files = [try_to_load_from_cache(repo, name) for name in ("config.json", "model.safetensors")]
    if not all(isinstance(file, str) for file in files):
        return None
    folder = Path(files[0]).parent
    if Path(files[1]).parent != folder or (plain := _plain_config(folder)) is None:
        return None
    return vit.load_folder(folder, plain)


def _error_chain(err: BaseException) -> Iterator[BaseException]:
    """The error and its causes/contexts."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _is_gated(err: BaseException) -> bool:
    """True when the hub refused a gated repository."""
    return any(type(e).__name__ == "GatedRepoError" or "gated repo" in str(e).lower() for e in _error_chain(err))


def _is_connection_error(err: BaseException) -> bool:
    """True when the hub could not be reached (as opposed to a wrong repository name)."""
    names = {"LocalEntryNotFoundError", "ConnectionError", "ConnectTimeout", "ReadTimeout", "ConnectError"}
    return any(
        type(e).__name__ in names or "couldn't connect" in str(e).lower() for e in _error_chain(err)
    )
