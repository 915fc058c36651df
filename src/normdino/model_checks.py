"""What loading a model file checks beyond its schema and checksum (:mod:`normdino.model_file`): the method's
state restores and scores tokens of the backbone's width, a ``random:ARCH`` backbone fits the model's geometry,
and the weights are the ones the model was fitted with. ``normdino info`` and ``AnomalyDetector.load`` both read
models through :func:`read_checked_model`, so a file one accepts the other accepts.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from normdino.errors import InputError, ModelFileError
from normdino.features.tokens import Tokens
from normdino.methods import registry
from normdino.methods.base import NormativeMethod

log = logging.getLogger(__name__)

RANDOM_BACKBONE = "random"
"""The backbone name of random weights (``random``, ``random:ARCH``; saved as ``random[-tiny]-ARCH-seedN``)."""


def read_checked_model(path: str | Path) -> tuple[dict, NormativeMethod, dict]:
    """(header, restored method, tensors) of a model file, checked in full: the file's schema and checksum
    (:func:`normdino.model_file.read_model_file`), then the method's state, which must be exactly the tensors
    the method keeps, non-empty, and able to score tokens of the backbone's width. ``info`` and ``load`` both
    read models through here, so a file one accepts the other accepts."""
    from normdino.model_file import read_model_file

    header, tensors = read_model_file(path)
    spec, meta = header["backbone"], header["method"]
    try:
        method = registry.create(meta["name"], **meta["params"])
        method.check_params()
    except InputError as err:
        raise ModelFileError(f"{path} holds invalid settings: {err}") from None
    state = {k.removeprefix("method."): v for k, v in tensors.items() if k.startswith("method.")}
    try:
        method.load_state_dict(state, meta.get("info", {}))
    except ModelFileError as err:
        raise ModelFileError(f"{path}: {err}") from None
    except Exception:  # noqa: BLE001 - a state of the wrong shapes fails anywhere inside; never show its text
        raise ModelFileError(f"{path} holds a {meta['name']} state of the wrong shapes; the file is corrupt or "
                             "was altered") from None
    expected = set(method.state_dict())
    missing, extra = sorted(expected - set(state)), set(state) - expected
    if missing:
        raise ModelFileError(f"{path} is an incomplete normdino model file (the {meta['name']} state tensor "
                             f"{missing[0]!r} is missing)")
    if extra:
        raise ModelFileError(f"{path} holds {len(extra)} tensor(s) its {meta['name']} state does not have; the file "
                             "was altered")
    if method.n_prototypes <= 0:
        raise ModelFileError(f"{path} holds an empty {meta['name']} state (no prototypes); the file is corrupt")
    _check_scores_tokens(path, method, spec, header.get("training", {}))
    return header, method, tensors


def _check_scores_tokens(path, method: NormativeMethod, spec: dict, training: dict) -> None:
    """The method scores a grid of tokens of the backbone's width, finitely (wrong-width prototypes fail): a 2 x 2
    grid (cheap even against a large memory bank), else the training grid for methods tied to it (HiMatch)."""
    grid = training.get("grid_shape")
    if not (isinstance(grid, list) and len(grid) == 2 and all(isinstance(v, int) and 0 < v <= 1024 for v in grid)):
        side = int(spec["image_size"]) // int(spec["patch_size"])
        grid = [side, side]
    request = method.feature_request()
    layers, dim = len(request.layers), int(spec["embed_dim"])
    for h, w in ((2, 2), tuple(grid)):
        generator = torch.Generator().manual_seed(0)
        patches = torch.randn(1, layers, h, w, dim, generator=generator)
        cls = torch.randn(1, layers, dim, generator=generator) if request.cls else None
        try:
            with torch.no_grad():
                scores = method.patch_scores(Tokens(patches, cls))
            if tuple(scores.shape) == (1, h, w) and bool(torch.isfinite(scores).all()):
                return
        except Exception:  # noqa: BLE001 - a state that does not fit the tokens fails anywhere inside
            pass
    raise ModelFileError(f"{path} holds a {method.name or type(method).__name__} state that cannot score the "
                         f"{dim}-wide tokens of its backbone; the file is corrupt or was altered")


def check_backbone_architecture(path, spec: dict, backbone: Any, default_arch: str = "dinov2_vits14") -> None:
    """Refuse a ``random:ARCH`` backbone of another token width or patch size than the model's before building it
    (a ViT-g is 1.1 B parameters: 45 s and 5 GB to learn it does not fit a ViT-S model)."""
    from normdino.features.loading import HUB_CONFIGS

    if not isinstance(backbone, str):
        return
    arch = backbone
    if backbone == RANDOM_BACKBONE or backbone.startswith(RANDOM_BACKBONE + ":"):
        arch, _, _ = parse_random_name(backbone, default_arch=default_arch)
    if arch not in HUB_CONFIGS:
        return  # a folder or a hub id: its config is read when it is built
    patch, dim = int(HUB_CONFIGS[arch]["patch_size"]), int(HUB_CONFIGS[arch]["hidden_size"])
    if (patch, dim) != (int(spec["patch_size"]), int(spec["embed_dim"])):
        raise ModelFileError(f"{path} was fitted with a backbone of patch {spec['patch_size']} and "
                             f"{spec['embed_dim']}-wide tokens, but {arch} has patch {patch} and {dim}-wide tokens; "
                             "pass a backbone of the model's architecture with --backbone")


def check_same_backbone(path, spec: dict, backbone, overridden: bool) -> None:
    """Refuse other weights than the model was fitted with (unless overridden); warn on another precision/runtime."""
    saved = weights_identity(spec["identifier"])
    if weights_identity(backbone.identifier) != saved and not _fitted_before_plain_vit(backbone, saved):
        message = (f"{path} was fitted with backbone {spec['name']} ({spec['identifier']}), but the backbone "
                   f"loaded now is {backbone.identifier}")
        if not overridden:
            raise ModelFileError(message + "; pass the same weights with --backbone")
        log.warning(message)
    for key in ("precision", "runtime"):
        saved, now = spec.get(key), getattr(backbone, key, None)
        if saved is not None and now is not None and saved != now:
            log.warning("%s was calibrated with backbone %s %s, predictions now use %s: thresholds may be off "
                        "by the difference in tokens", path, key, saved, now)


def _fitted_before_plain_vit(backbone: Any, saved: str) -> bool:
    """True when the model file names these weights as normdino did before it ran DINOv2 itself (hashed as
    transformers' module): such files keep loading."""
    before = getattr(backbone, "identifier_before_plain_vit", lambda: None)()
    if before is None or weights_identity(before) != saved:
        return False
    log.info("the model file names backbone %s as earlier normdino versions did; the weights are the same",
             backbone.name)
    return True


def weights_identity(identifier: str) -> str:
    """The part of a backbone identifier that names the weights and geometry: not precision, runtime or versions.

    A model fitted on a GPU in bf16, or under another torch, still loads; a warning says what differs.
    """
    volatile = ("precision=", "runtime=", "transformers=", "impl=", "torch=")
    return "|".join(part for part in identifier.split("|") if not part.startswith(volatile))


def parse_random_name(name: str, default_seed: int = 0, default_arch: str = "dinov2_vits14") -> tuple[str, int, bool]:
    """(arch, seed, tiny) of ``random``, ``random:ARCH`` or a saved ``random[-tiny]-ARCH-seedN`` name."""
    if name.startswith(RANDOM_BACKBONE + ":") or name == RANDOM_BACKBONE:
        return name.partition(":")[2] or default_arch, default_seed, False
    rest = name[len(RANDOM_BACKBONE) + 1:]
    tiny = rest.startswith("tiny-")
    rest = rest.removeprefix("tiny-")
    arch, _, seed = rest.rpartition("-seed")
    if not arch or not seed.isdigit():
        raise InputError(f"cannot rebuild random backbone {name!r}: expected random[-tiny]-ARCH-seedN")
    return arch, int(seed), tiny
