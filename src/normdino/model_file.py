"""The ``.normdino`` model file: safetensors tensors + one JSON header, validated against a schema and a checksum.

Nothing in it is executable. Reading checks, before anything is used: the format and its major version,
the header's shape and types, a SHA-256 of every tensor (a flipped byte in a threshold would otherwise
give a 100 % mask silently), and the calibration tables' shapes and ranges. Every failure is one
:class:`ModelFileError` sentence. Format 1 files (DPMM only) are read and converted.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from normdino import __version__
from normdino.errors import ModelFileError
from normdino.files import atomic_path, read_safetensors

MODEL_FORMAT = "normdino-model"
MODEL_FORMAT_VERSION = (2, 0)
HEADER_KEY = "normdino"
_TOP_LEVEL = {"format": str, "format_version": str, "normdino_version": str, "method": dict, "backbone": dict,
              "detector": dict, "training": dict, "checksum": str}
_BACKBONE = {"name": str, "identifier": str, "is_random": bool, "patch_size": int, "embed_dim": int,
             "image_size": int, "layers": list}
_CALIBRATION = ("calibration.fprs", "calibration.pixel_thresholds", "calibration.image_thresholds")
_V1_DPMM_PARAMS = ("n_components", "covariance_type", "epochs", "batch_images", "update_rate", "alpha", "score",
                   "layer", "seed")


def tensors_checksum(tensors: dict) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def write_model_file(path: str | Path, header: dict, tensors: dict) -> Path:
    """Write header + tensors atomically, adding format, version and the tensors' checksum."""
    from safetensors.torch import save_file

    full = {"format": MODEL_FORMAT, "format_version": "%d.%d" % MODEL_FORMAT_VERSION, "normdino_version": __version__,
            **header, "checksum": tensors_checksum(tensors)}
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={HEADER_KEY: json.dumps(full, allow_nan=False)})
    return path


def read_header(path: str | Path) -> dict:
    """The JSON header of a model file, read without torch (the safetensors header: u64 length + JSON).

    Checks the format and major version; the tensors are not read (use :func:`read_model_file` for them).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist")
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100 * 2**20:
                raise ValueError("header too large")
            outer = json.loads(handle.read(length))
        header = json.loads(outer["__metadata__"][HEADER_KEY])
    except (OSError, struct.error, ValueError, KeyError, TypeError):
        raise ModelFileError(f"{path} is not a normdino model file (no readable normdino header)") from None
    return _check_format(path, header)


def _check_format(path: Path, header: Any) -> dict:
    if not isinstance(header, dict):
        raise ModelFileError(f"{path} has a malformed normdino header (a {type(header).__name__}, not an object)")
    if header.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{path} is not a normdino model file (format {header.get('format')!r})")
    version = str(header.get("format_version", ""))
    parts = version.split(".")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ModelFileError(f"{path} has an unreadable format version {version!r}; it is corrupt or not a normdino model")
    major = int(parts[0])
    if major > MODEL_FORMAT_VERSION[0] or major < 1:
        raise ModelFileError(
            f"{path} was written by normdino {header.get('normdino_version', '?')} in model format {version}; "
            f"this normdino ({__version__}) reads formats 1.x and {MODEL_FORMAT_VERSION[0]}.x: upgrade normdino or refit the model")
    return header


def read_model_file(path: str | Path) -> tuple[dict, dict]:
    """Validated header (format 2 layout) and tensors of a ``.normdino`` file."""
    path = Path(path)
    header = read_header(path)
    metadata, tensors = read_safetensors(path, "a normdino model file")
    if int(header["format_version"].split(".")[0]) == 1:
        header, tensors = _from_format_1(path, header, tensors)
    else:
        _check_schema(path, header)
        if tensors_checksum(tensors) != header["checksum"]:
            raise ModelFileError(f"{path} fails its checksum: the file was altered or damaged after it was written; refit "
                                 "or restore it from a copy")
    _check_calibration(path, tensors)
    return header, tensors


def _check_schema(path: Path, header: dict) -> None:
    minor = int(header["format_version"].split(".")[1])
    for key, kind in _TOP_LEVEL.items():
        if key not in header:
            raise ModelFileError(f"{path} is an incomplete normdino model file (header field {key!r} is missing)")
        if not isinstance(header[key], kind):
            raise ModelFileError(f"{path} has a malformed header: {key!r} must be a {kind.__name__}")
    extra = sorted(set(header) - set(_TOP_LEVEL))
    if extra and minor <= MODEL_FORMAT_VERSION[1]:
        raise ModelFileError(f"{path} has unexpected header fields {', '.join(extra)}; the file was altered")
    backbone = header["backbone"]
    for key, kind in _BACKBONE.items():
        if not isinstance(backbone.get(key), kind) or (kind is int and isinstance(backbone.get(key), bool)):
            raise ModelFileError(f"{path} has a malformed header: backbone {key!r} must be a {kind.__name__}")
    method = header["method"]
    if not isinstance(method.get("name"), str) or not isinstance(method.get("params"), dict) \
            or not isinstance(method.get("info", {}), dict):
        raise ModelFileError(f"{path} has a malformed header: the method needs a name and a params object")
    from normdino.detector import DETECTOR_PARAMS

    known = {p.name for p in DETECTOR_PARAMS} | {"volume_settings"}
    unknown = sorted(set(header["detector"]) - known)
    if unknown:
        raise ModelFileError(f"{path} has unknown detector settings {', '.join(unknown)}; the file was altered "
                             "or comes from another normdino")
    settings = header["detector"].get("volume_settings")
    if settings is not None and not isinstance(settings, dict):
        raise ModelFileError(f"{path} has a malformed header: volume_settings must be an object")


def _check_calibration(path: Path, tensors: dict) -> None:
    missing = [k for k in _CALIBRATION if k not in tensors]
    if missing:
        raise ModelFileError(f"{path} is an incomplete normdino model file (missing {', '.join(missing)})")
    fprs, pixel, image = (tensors[k].double().numpy() for k in _CALIBRATION)
    if fprs.ndim != 1 or fprs.size < 2 or pixel.shape != fprs.shape or image.shape != fprs.shape:
        raise ModelFileError(f"{path} has calibration tables of shapes {fprs.shape}, {pixel.shape}, {image.shape}; "
                             "they must be equal 1-D tables of at least 2 entries")
    if not (np.isfinite(fprs).all() and np.isfinite(pixel).all() and np.isfinite(image).all()):
        raise ModelFileError(f"{path} has NaN or infinite calibration thresholds; the file is corrupt")
    if not (fprs[0] > 0 and fprs[-1] < 1 and (np.diff(fprs) > 0).all()):
        raise ModelFileError(f"{path} has calibration FPRs that are not increasing inside (0, 1); the file is corrupt")
    for name, table in (("pixel", pixel), ("image", image)):
        if (np.diff(table) > 1e-9 * max(1.0, float(np.abs(table).max()))).any():
            raise ModelFileError(f"{path} has {name} thresholds that rise with the FPR; the file is corrupt")


def _from_format_1(path: Path, header: dict, tensors: dict) -> tuple[dict, dict]:
    """A format-1 (DPMM-only) file as format 2: method tensors under ``method.``, DPMM settings under method."""
    if not all(isinstance(header.get(k), dict) for k in ("backbone", "detector", "mixture")):
        raise ModelFileError(f"{path} is an incomplete normdino model file (missing header fields)")
    old = header["detector"]
    params = {k: old[k] for k in _V1_DPMM_PARAMS if k in old}
    params["n_components"] = header["mixture"].get("n_components", params.get("n_components"))
    params["weight_threshold"] = header["mixture"].get("weight_threshold", 1e-6)
    training = header.get("training", {})
    detector = {k: old[k] for k in ("image_size", "normalize", "sigma", "fprs", "default_fpr", "top_fraction",
                                     "val_fraction", "seed", "volume_settings") if k in old}
    converted = {
        "format": MODEL_FORMAT, "format_version": header["format_version"],
        "normdino_version": header.get("normdino_version", "?"),
        "method": {"name": "dpmm", "params": params, "info": {"best_epoch": training.get("best_epoch")}},
        "backbone": header["backbone"], "detector": detector, "training": training,
    }
    renamed = {}
    for key, value in tensors.items():
        if key.startswith("mixture.") or key == "prototypes":
            renamed["method." + key] = value
        else:
            renamed[key] = value
    return converted, renamed
