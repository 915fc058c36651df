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
_OPTIONAL_CALIBRATION = ("calibration.pixel_range",)  # recorded since issue 20; older files lack it
_MAX_PATCH = 64
_MAX_EMBED_DIM = 16384
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
    if path.is_dir():
        raise ModelFileError(f"{path} is a folder, not a model file; give the .normdino file written by normdino fit")
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
        _check_backbone(path, header["backbone"])
        _check_detector(path, header["detector"], complete=False)
        _check_method(path, header["method"], complete=False)
    else:
        _check_schema(path, header)
        if tensors_checksum(tensors) != header["checksum"]:
            raise ModelFileError(f"{path} fails its checksum: the file was altered or damaged after it was written; refit "
                                 "or restore it from a copy")
    _check_tensor_names(path, tensors)
    _check_calibration(path, tensors)
    return header, tensors


def _check_schema(path: Path, header: dict) -> None:
    """Every header field present, of its type and in its range: the backbone, the detector's settings, the
    method's hyper-parameters (all of them: a missing one would silently take today's default) and the
    volume settings. Messages never quote the offending value: it may be text injected into the file."""
    minor = int(header["format_version"].split(".")[1])
    for key, kind in _TOP_LEVEL.items():
        if key not in header:
            raise ModelFileError(f"{path} is an incomplete normdino model file (header field {key!r} is missing)")
        if not isinstance(header[key], kind):
            raise ModelFileError(f"{path} has a malformed header: {key!r} must be a {kind.__name__}")
    extra = sorted(set(header) - set(_TOP_LEVEL))
    if extra and minor <= MODEL_FORMAT_VERSION[1]:
        raise ModelFileError(f"{path} has {len(extra)} unexpected header field(s); the file was altered")
    _check_backbone(path, header["backbone"])
    _check_detector(path, header["detector"], complete=True)
    _check_method(path, header["method"], complete=True)


def _check_backbone(path: Path, backbone: dict) -> None:
    for key, kind in _BACKBONE.items():
        if not isinstance(backbone.get(key), kind) or (kind is int and isinstance(backbone.get(key), bool)):
            raise ModelFileError(f"{path} has a malformed header: backbone {key!r} must be a {kind.__name__}")
    if not backbone["name"] or not backbone["identifier"]:
        raise ModelFileError(f"{path} has a malformed header: the backbone's name and identifier must not be empty")
    from normdino.detector_params import MAX_IMAGE_SIZE

    patch, dim, size = backbone["patch_size"], backbone["embed_dim"], backbone["image_size"]
    if not 1 <= patch <= _MAX_PATCH or not 1 <= dim <= _MAX_EMBED_DIM:
        raise ModelFileError(f"{path} has an impossible backbone geometry (patch size or token width out of range); "
                             "the file is corrupt or was altered")
    if not patch <= size <= MAX_IMAGE_SIZE or size % patch:
        raise ModelFileError(f"{path} has an impossible backbone input size (it must be a multiple of the patch size "
                             f"between {patch} and {MAX_IMAGE_SIZE} px); the file is corrupt or was altered")
    layers = backbone["layers"]
    if not layers or len(layers) > 64 or not all(isinstance(v, int) and not isinstance(v, bool) and -64 <= v <= 64
                                                 for v in layers):
        raise ModelFileError(f"{path} has a malformed header: the backbone's layers must be a short list of layer "
                             "numbers")


def _check_detector(path: Path, detector: dict, complete: bool) -> None:
    from normdino.detector_params import DETECTOR_PARAMS
    from normdino.errors import InputError

    known = {p.name for p in DETECTOR_PARAMS}
    unknown = set(detector) - known - {"volume_settings"}
    if unknown:
        raise ModelFileError(f"{path} has {len(unknown)} unknown detector setting(s); the file was altered "
                             "or comes from another normdino")
    missing = sorted(known - set(detector)) if complete else []
    if missing:
        raise ModelFileError(f"{path} is an incomplete normdino model file (detector setting {missing[0]!r} is "
                             "missing)")
    for param in DETECTOR_PARAMS:
        if param.name in detector:
            try:
                param.check(detector[param.name], "detector")
            except InputError:
                raise ModelFileError(f"{path} holds an invalid detector setting {param.name!r}; the file is corrupt "
                                     "or was altered") from None
    check_volume_settings(path, detector.get("volume_settings"))


def _check_method(path: Path, method: dict, complete: bool) -> None:
    from normdino.errors import InputError
    from normdino.methods import registry

    name, params = method.get("name"), method.get("params")
    if not isinstance(name, str) or not isinstance(params, dict) or not isinstance(method.get("info", {}), dict):
        raise ModelFileError(f"{path} has a malformed header: the method needs a name and a params object")
    try:
        cls = registry.method_class(name)
    except InputError:
        raise ModelFileError(f"{path} names an unknown method; it was written by another normdino or altered; "
                             f"this normdino knows {', '.join(registry.available())}") from None
    declared = {p.name: p for p in cls.PARAMS}
    unknown = set(params) - set(declared)
    if unknown:
        raise ModelFileError(f"{path} has {len(unknown)} setting(s) its method {name} does not take; the file was "
                             "altered or comes from another normdino")
    missing = sorted(set(declared) - set(params)) if complete else []
    if missing:
        raise ModelFileError(f"{path} is an incomplete normdino model file (the {name} setting {missing[0]!r} is "
                             "missing)")
    for key, value in params.items():
        try:
            declared[key].check(value, name)
        except InputError:
            raise ModelFileError(f"{path} holds an invalid {name} setting {key!r}; the file is corrupt or was "
                                 "altered") from None


_VOLUME_SETTINGS = ("axis", "normalization", "window", "percentiles", "image_intensity")


def check_volume_settings(path: Path, settings: Any) -> None:
    """A model's ``volume_settings``: None, or the fields :func:`normdino.io.volumes.recorded_settings` writes,
    each valid. Never quotes a value (it may be text an attacker put there to reach the log)."""
    from normdino.io.reading import IMAGE_INTENSITY
    from normdino.io.intensity import NORMALIZATIONS
    from normdino.io.slicing import AXIS_NAMES

    if settings is None:
        return

    def bad(what: str) -> ModelFileError:
        return ModelFileError(f"{path} has invalid volume settings ({what}); the file is corrupt or was altered")

    if not isinstance(settings, dict):
        raise bad("not an object")
    if set(settings) - set(_VOLUME_SETTINGS):
        raise bad("unknown fields")
    if settings.get("image_intensity", IMAGE_INTENSITY) != IMAGE_INTENSITY:
        raise bad(f"the 2D intensity rule must be {IMAGE_INTENSITY!r}")
    axis = settings.get("axis")
    if axis is not None and axis not in AXIS_NAMES and axis not in (0, 1, 2, "0", "1", "2"):
        raise bad(f"the axis must be one of {', '.join(AXIS_NAMES)} or 0, 1, 2")
    normalization = settings.get("normalization")
    if normalization is not None and normalization not in NORMALIZATIONS:
        raise bad(f"the normalization must be one of {', '.join(NORMALIZATIONS)}")
    window = settings.get("window")
    if window is not None and not (isinstance(window, list) and len(window) == 2
                                   and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in window)
                                   and np.isfinite(window).all() and window[0] < window[1]):
        raise bad("the window must be two finite numbers, low < high")
    percentiles = settings.get("percentiles")
    if percentiles is not None:
        try:
            low, high = (float(v) for v in str(percentiles).split(","))
        except ValueError:
            raise bad("the percentiles must be LOW,HIGH") from None
        if not 0.0 <= low < high <= 100.0:
            raise bad("the percentiles must satisfy 0 <= low < high <= 100")


def _check_tensor_names(path: Path, tensors: dict) -> None:
    """Only calibration tables and method state: anything else was put there by someone else."""
    foreign = [k for k in tensors if k not in _CALIBRATION + _OPTIONAL_CALIBRATION and not k.startswith("method.")]
    if foreign:
        raise ModelFileError(f"{path} holds {len(foreign)} tensor(s) that are no part of a normdino model; the file "
                             "was altered")


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
    if "calibration.pixel_range" in tensors:  # optional: files written before it was recorded lack it
        low_high = tensors["calibration.pixel_range"].double().numpy()
        if low_high.shape != (2,) or not np.isfinite(low_high).all() or not low_high[0] <= low_high[1]:
            raise ModelFileError(f"{path} has a calibration score range {low_high.tolist()} that is not two finite "
                                 "increasing values; the file is corrupt")


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
