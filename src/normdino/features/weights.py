"""Backbone weights for a machine without internet: import the files users can carry in, list what is there.

:func:`import_weights` takes an official DINOv2 checkpoint (``dinov2_vits14_pretrain.pth``,
``dinov2_vits14_reg4_pretrain.pth`` ... as published by the DINOv2 authors), an official DINOv3 ``.pth``
(``dinov3_vits16_pretrain_lvd1689m-08c60483.pth`` ...) or a Hugging Face model folder (config.json +
model.safetensors), converts official checkpoints to the Hugging Face hub layout with the explicit key maps
below, checks that every tensor is used and has the shape the architecture needs, and stores the result as
``<store>/<alias>/`` (config.json, model.safetensors, normdino-weights.json with SHA-256 checksums), where
``--backbone <alias>`` finds it before any hub lookup (:func:`imported_folder`).

Checkpoints are read with ``torch.load(weights_only=True)``: tensors only, no code from the file ever runs.

Key maps (official -> Hugging Face hub layout), as in transformers' conversion scripts
``convert_dinov2_to_hf.py`` and ``convert_dinov3_vit_to_hf.py``:

DINOv2 (``Dinov2Model`` / ``Dinov2WithRegistersModel``)::

    cls_token, mask_token, register_tokens     -> embeddings.cls_token, .mask_token, .register_tokens
    pos_embed                                  -> embeddings.position_embeddings
    patch_embed.proj.{weight,bias}             -> embeddings.patch_embeddings.projection.{weight,bias}
    blocks.N.norm1 / norm2                     -> encoder.layer.N.norm1 / norm2
    blocks.N.attn.qkv (rows q | k | v)         -> encoder.layer.N.attention.attention.{query,key,value}
    blocks.N.attn.proj                         -> encoder.layer.N.attention.output.dense
    blocks.N.ls1.gamma / ls2.gamma             -> encoder.layer.N.layer_scale1.lambda1 / layer_scale2.lambda1
    blocks.N.mlp.fc1 / fc2                     -> encoder.layer.N.mlp.fc1 / fc2
    blocks.N.mlp.w12 / w3 (SwiGLU, giant)      -> encoder.layer.N.mlp.weights_in / weights_out
    norm                                       -> layernorm

DINOv3 (``DINOv3ViTModel``)::

    cls_token, mask_token, storage_tokens      -> embeddings.cls_token, .mask_token, .register_tokens
    patch_embed.proj.{weight,bias}             -> embeddings.patch_embeddings.{weight,bias}
    blocks.N.norm1 / norm2                     -> layer.N.norm1 / norm2
    blocks.N.attn.qkv (rows q | k | v)         -> layer.N.attention.{q_proj,k_proj,v_proj} (no key bias:
                                                  attn.qkv.bias_mask zeroes it in the original)
    blocks.N.attn.proj                         -> layer.N.attention.o_proj
    blocks.N.ls1.gamma / ls2.gamma             -> layer.N.layer_scale1.lambda1 / layer_scale2.lambda1
    blocks.N.mlp.fc1 / fc2                     -> layer.N.mlp.up_proj / down_proj
    blocks.N.mlp.w1 / w2 / w3 (SwiGLU)         -> layer.N.mlp.gate_proj / up_proj / down_proj
    norm                                       -> norm
    rope_embed.periods                         -> (recomputed from the config; checked equal to 1 / inv_freq)
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from normdino.errors import InputError, ModelFileError
from normdino.features.loading import (ALIASES, HUB_CONFIGS, WEIGHTS_RECORD, default_weights_dir, hub_config,
                                       imported_folder)

logger = logging.getLogger(__name__)

_WRAPPERS = ("teacher", "model", "state_dict", "module")
_PREFIXES = ("backbone.", "module.", "model.")


@dataclass(frozen=True)
class ImportedWeights:
    """One entry of the store: the alias, its folder and what its ``normdino-weights.json`` says."""

    alias: str
    folder: Path
    record: dict


def list_weights(store: str | os.PathLike | None = None) -> list[ImportedWeights]:
    """The imported weights in ``store`` (default :func:`default_weights_dir`), sorted by alias."""
    root = Path(store) if store is not None else default_weights_dir()
    found = []
    if root.is_dir():
        for folder in sorted(root.iterdir()):
            if imported_folder(folder.name, root) is not None:
                try:
                    record = json.loads((folder / WEIGHTS_RECORD).read_text())
                except (OSError, ValueError):
                    record = {}
                found.append(ImportedWeights(folder.name, folder, record))
    return found


def sha256(path: Path) -> str:
    """SHA-256 of a file, read in 16 MB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- reading


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an official .pth checkpoint, read with ``weights_only=True``; one sentence for a bad file."""
    import pickle
    import zipfile

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):
            raise ModelFileError(f"{path} holds Python objects besides tensors; normdino reads checkpoints with "
                                 "weights_only=True and never runs code from a file: save its state_dict alone.") from None
        raise ModelFileError(f"{path} is not a PyTorch checkpoint (it cannot be unpickled).") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        text = str(err)
        if "central directory" in text or "failed finding" in text or isinstance(err, EOFError) or "truncated" in text:
            raise ModelFileError(f"{path} is truncated (the file ends before its checkpoint does): copy it "
                                 "again and compare its checksum.") from None
        raise ModelFileError(f"{path} is not a PyTorch checkpoint ({text.splitlines()[0] if text else type(err).__name__}).") from None
    state = loaded
    while isinstance(state, dict) and len(state) <= 8 and any(k in state for k in _WRAPPERS):
        state = next(state[k] for k in _WRAPPERS if k in state)
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFileError(f"{path} is a PyTorch file but not a checkpoint of tensors (a state_dict).")
    out = {}
    for key, value in state.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _family(state: dict[str, torch.Tensor], path: Path) -> str:
    """"dinov2" or "dinov3" from the key names, or one sentence saying it is neither."""
    if "storage_tokens" in state or any(k.startswith("rope_embed") for k in state):
        return "dinov3"
    if "pos_embed" in state and "cls_token" in state:
        return "dinov2"
    if "cls_token" in state and "patch_embed.proj.weight" in state:
        return "dinov3"
    example = next(iter(state))
    raise ModelFileError(f"{path} is not a DINOv2 or DINOv3 ViT checkpoint (no cls_token / patch_embed / pos_embed "
                         f"tensors; its first tensor is {example!r}).")


def _depth(state: dict[str, torch.Tensor]) -> int:
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    return max(blocks) + 1 if blocks else 0


def infer_arch(state: dict[str, torch.Tensor], path: Path) -> str:
    """The alias (e.g. dinov2_vits14_reg) whose architecture the checkpoint's tensors have, or one sentence."""
    family = _family(state, path)
    hidden = int(state["cls_token"].shape[-1])
    patch = int(state["patch_embed.proj.weight"].shape[-1])
    depth = _depth(state)
    tokens = state.get("register_tokens", state.get("storage_tokens"))
    registers = int(tokens.shape[1]) if tokens is not None and tokens.dim() == 3 else 0
    gated = any(".mlp.w12." in k or ".mlp.w1." in k for k in state)
    for alias, fields in HUB_CONFIGS.items():
        if not alias.startswith(family):
            continue
        if (fields["hidden_size"], fields["num_hidden_layers"], fields["patch_size"]) != (hidden, depth, patch):
            continue
        if fields.get("num_register_tokens", 0) != registers:
            continue
        if bool(fields.get("use_swiglu_ffn") or fields.get("use_gated_mlp")) != gated:
            continue
        return alias
    raise ModelFileError(f"{path} holds a {family.upper()} ViT of width {hidden}, {depth} blocks, patch {patch}, "
                         f"{registers} register tokens{', SwiGLU' if gated else ''}: not one of the architectures "
                         "normdino knows (dinov2_vit{s,b,l,g}14[_reg], dinov3_vit{s16,s16plus,b16,l16,h16plus}).")


# ---------------------------------------------------------------------------------------------- key maps


class _KeyMapping:
    """Official tensors renamed to the hub layout (``out``), remembering which official keys were used."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state
        self.out: dict[str, torch.Tensor] = {}
        self.used: set[str] = set()

    def take(self, old: str, new: str) -> None:
        if old in self.state:
            self.out[new] = self.state[old]
            self.used.add(old)


def _split_qkv(tensor: torch.Tensor, hidden: int, key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if tensor.shape[0] != 3 * hidden:
        raise ModelFileError(f"{key} has shape {tuple(tensor.shape)}, expected {3 * hidden} rows (query, key, value).")
    return tensor[:hidden], tensor[hidden:2 * hidden], tensor[2 * hidden:]


def convert_dinov2(state: dict[str, torch.Tensor], hidden: int) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Official DINOv2 tensors -> Hugging Face hub layout; returns the converted tensors and the official keys used."""
    mapping = _KeyMapping(state)
    take, out, used = mapping.take, mapping.out, mapping.used

    take("cls_token", "embeddings.cls_token")
    take("mask_token", "embeddings.mask_token")
    take("register_tokens", "embeddings.register_tokens")
    take("pos_embed", "embeddings.position_embeddings")
    take("patch_embed.proj.weight", "embeddings.patch_embeddings.projection.weight")
    take("patch_embed.proj.bias", "embeddings.patch_embeddings.projection.bias")
    for n in range(_depth(state)):
        old, new = f"blocks.{n}.", f"encoder.layer.{n}."
        for part in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"):
            take(old + part, new + part)
        for part in ("weight", "bias"):
            key = f"{old}attn.qkv.{part}"
            if key in state:
                q, k, v = _split_qkv(state[key], hidden, key)
                out[f"{new}attention.attention.query.{part}"] = q
                out[f"{new}attention.attention.key.{part}"] = k
                out[f"{new}attention.attention.value.{part}"] = v
                used.add(key)
            take(f"{old}attn.proj.{part}", f"{new}attention.output.dense.{part}")
            take(f"{old}mlp.fc1.{part}", f"{new}mlp.fc1.{part}")
            take(f"{old}mlp.fc2.{part}", f"{new}mlp.fc2.{part}")
            take(f"{old}mlp.w12.{part}", f"{new}mlp.weights_in.{part}")
            take(f"{old}mlp.w3.{part}", f"{new}mlp.weights_out.{part}")
        take(old + "ls1.gamma", new + "layer_scale1.lambda1")
        take(old + "ls2.gamma", new + "layer_scale2.lambda1")
    take("norm.weight", "layernorm.weight")
    take("norm.bias", "layernorm.bias")
    return out, used


def convert_dinov3(state: dict[str, torch.Tensor], hidden: int) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Official DINOv3 tensors -> Hugging Face hub layout; returns the converted tensors and the official keys used."""
    mapping = _KeyMapping(state)
    take, out, used = mapping.take, mapping.out, mapping.used

    take("cls_token", "embeddings.cls_token")
    take("mask_token", "embeddings.mask_token")
    take("storage_tokens", "embeddings.register_tokens")
    take("patch_embed.proj.weight", "embeddings.patch_embeddings.weight")
    take("patch_embed.proj.bias", "embeddings.patch_embeddings.bias")
    if "embeddings.mask_token" in out and out["embeddings.mask_token"].dim() == 2:
        out["embeddings.mask_token"] = out["embeddings.mask_token"][None]
    for n in range(_depth(state)):
        old, new = f"blocks.{n}.", f"layer.{n}."
        for part in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"):
            take(old + part, new + part)
        key = f"{old}attn.qkv.weight"
        if key in state:
            q, k, v = _split_qkv(state[key], hidden, key)
            out.update({f"{new}attention.q_proj.weight": q, f"{new}attention.k_proj.weight": k,
                        f"{new}attention.v_proj.weight": v})
            used.add(key)
        key = f"{old}attn.qkv.bias"
        if key in state:
            q, k, v = _split_qkv(state[key], hidden, key)
            mask = state.get(f"{old}attn.qkv.bias_mask")
            key_bias = k if mask is None else k * mask[hidden:2 * hidden]
            if bool(torch.any(key_bias != 0)):
                raise ModelFileError(f"{key} has a non-zero key bias, which the Hugging Face DINOv3 model does not "
                                     "have: this is not an official DINOv3 checkpoint.")
            out.update({f"{new}attention.q_proj.bias": q, f"{new}attention.v_proj.bias": v})
            used.update({key, f"{old}attn.qkv.bias_mask"} & set(state))
        for part in ("weight", "bias"):
            take(f"{old}attn.proj.{part}", f"{new}attention.o_proj.{part}")
            take(f"{old}mlp.fc1.{part}", f"{new}mlp.up_proj.{part}")
            take(f"{old}mlp.fc2.{part}", f"{new}mlp.down_proj.{part}")
            take(f"{old}mlp.w1.{part}", f"{new}mlp.gate_proj.{part}")
            take(f"{old}mlp.w2.{part}", f"{new}mlp.up_proj.{part}")
            take(f"{old}mlp.w3.{part}", f"{new}mlp.down_proj.{part}")
        take(old + "ls1.gamma", new + "layer_scale1.lambda1")
        take(old + "ls2.gamma", new + "layer_scale2.lambda1")
    take("norm.weight", "norm.weight")
    take("norm.bias", "norm.bias")
    if "rope_embed.periods" in state:
        used.add("rope_embed.periods")  # checked against the built model in _check_rope
    return out, used


# ---------------------------------------------------------------------------------------------- import


def _load_converted(folder: Path, source: Path) -> Any:
    """Load a staged hub-layout folder with transformers and refuse any missing, unexpected or misshapen tensor."""
    from transformers import AutoModel

    try:
        model, info = AutoModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32,
                                                output_loading_info=True)
    except (RuntimeError, ValueError, OSError) as err:  # shapes that do not fit raise here
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelFileError(f"{source} does not fit the architecture it was taken for: {first}") from None
    problems = []
    for what in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = [k for k in info.get(what, ()) if not str(k).endswith("mask_token")]
        if keys:
            problems.append(f"{len(keys)} {what.replace('_', ' ')} (e.g. {sorted(map(str, keys))[0]})")
    if problems:
        raise ModelFileError(f"{source} does not fit the architecture it was taken for: {'; '.join(problems)}.")
    return model.eval()


def _check_rope(model: Any, state: dict[str, torch.Tensor], source: Path) -> None:
    periods = state.get("rope_embed.periods")
    inv_freq = getattr(getattr(model, "rope_embeddings", None), "inv_freq", None)
    if periods is None or inv_freq is None:
        return
    if periods.shape != inv_freq.shape or not torch.allclose(periods.double(), 1.0 / inv_freq.double(), rtol=1e-4):
        raise ModelFileError(f"{source} uses other RoPE periods than the DINOv3 configuration (base "
                             f"{model.config.rope_theta}): it is not this architecture.")


def import_weights(source: str | os.PathLike, store: str | os.PathLike | None = None, arch: str | None = None,
                   overwrite: bool = False, tiny: bool = False) -> ImportedWeights:
    """Import an official DINOv2/DINOv3 .pth checkpoint or a Hugging Face folder into the offline store.

    ``arch``: the alias to import as (default: recognised from the tensors, or from the folder's config);
    ``tiny``: the architecture of ``hub_config(arch, tiny=True)`` (tests). Nothing is written unless every
    check passes; the store entry appears at once (a temp folder renamed into place).
    """
    source = Path(source).expanduser()
    if not source.exists():
        raise InputError(f"{source} does not exist.")
    root = Path(store) if store is not None else default_weights_dir()
    if source.is_dir():
        state, alias, config, fmt = None, arch or _alias_of_folder(source), None, "huggingface-folder"
    elif source.suffix.lower() in (".pth", ".pt", ".bin", ".ckpt"):
        _check_published_hash(source)
        state = read_checkpoint(source)
        alias = arch or infer_arch(state, source)
        fmt = "official-" + _family(state, source)
    else:
        raise InputError(f"{source} is neither an official DINOv2/DINOv3 checkpoint (.pth) nor a Hugging Face "
                         "model folder (config.json + model.safetensors).")
    if alias not in ALIASES:
        raise InputError(f"Unknown architecture {alias!r}: use one of {', '.join(ALIASES)}.")
    target = root / alias
    if target.exists() and not overwrite:
        raise InputError(f"{alias} weights are already imported in {target}: pass --overwrite to replace them.")
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{alias}.", dir=root))
    try:
        if state is not None:
            config = hub_config(alias, tiny=tiny)
            if _family(state, source) != ("dinov3" if config.model_type == "dinov3_vit" else "dinov2"):
                raise ModelFileError(f"{source} is a {_family(state, source).upper()} checkpoint, not {alias}.")
            hidden = config.hidden_size
            converted, used = (convert_dinov3 if config.model_type == "dinov3_vit" else convert_dinov2)(state, hidden)
            unused = sorted(set(state) - used)
            if unused:
                raise ModelFileError(f"{source} holds {len(unused)} tensor(s) the {alias} architecture has no place "
                                     f"for (e.g. {unused[0]!r}): it is not a plain {alias} checkpoint.")
            from safetensors.torch import save_file

            config.save_pretrained(staging)
            save_file({k: v.contiguous() for k, v in converted.items()}, str(staging / "model.safetensors"),
                      metadata={"format": "pt"})
        else:
            _stage_folder(source, staging)
        model = _load_converted(staging, source)
        if state is not None:
            _check_rope(model, state, source)
        record = {"alias": alias, "format": fmt, "source": source.name,
                  "source_sha256": sha256(source) if source.is_file() else None,
                  "sha256": sha256(staging / "model.safetensors"), "model_type": model.config.model_type,
                  "n_tensors": len(model.state_dict()),
                  "imported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        (staging / WEIGHTS_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("imported %s as %s into %s (sha256 %s)", source, alias, target, record["sha256"][:16])
    return ImportedWeights(alias, target, record)


def _check_published_hash(path: Path) -> None:
    """Official DINOv3 files end in the first hex digits of their SHA-256 (torch.hub's ``check_hash`` convention,
    e.g. ``...-08c60483.pth``): warn loudly when the content does not match its name (a damaged or renamed copy;
    a truncated one is refused when it is read)."""
    match = re.search(r"-([0-9a-f]{8,64})\.pth$", path.name)
    if match and not sha256(path).startswith(match.group(1)):
        logger.warning("WARNING: %s does not match the checksum in its name (%s): the copy may be damaged or "
                       "renamed; compare its SHA-256 with the original's.", path, match.group(1))


def _alias_of_folder(folder: Path) -> str:
    """The alias whose architecture a Hugging Face folder's config.json describes, or one sentence."""
    path = folder / "config.json"
    if not path.is_file():
        raise InputError(f"{folder} has no config.json: it is not a Hugging Face model folder.")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelFileError(f"{path} is not valid JSON ({err}).") from None
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size")
    for alias, fields in HUB_CONFIGS.items():
        if all(config.get(k) == fields.get(k) for k in keys) and \
                config.get("num_register_tokens", 0) == fields.get("num_register_tokens", 0):
            return alias
    raise ModelFileError(f"{path} describes a {config.get('model_type', '?')} model of width "
                         f"{config.get('hidden_size', '?')} and {config.get('num_hidden_layers', '?')} blocks: not one "
                         "of the DINOv2/DINOv3 architectures normdino knows (pass --arch to say which it is).")


def _stage_folder(source: Path, staging: Path) -> None:
    """Copy a Hugging Face folder's config.json and model.safetensors (the weights, nothing else) into ``staging``."""
    weights = source / "model.safetensors"
    if not weights.is_file():
        raise InputError(f"{source} has no model.safetensors (sharded or .bin weights: save the model again with "
                         "save_pretrained(safe_serialization=True)).")
    shutil.copyfile(source / "config.json", staging / "config.json")
    shutil.copyfile(weights, staging / "model.safetensors")
