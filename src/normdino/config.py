"""Estimator settings from one source of truth: the ``Param`` declarations of the detector and every method.

The same declarations give the command-line options of ``fit`` and ``bench`` and the keys of a YAML
config file (``normdino fit --config fit.yaml``; ``--print-config`` writes one), so options cannot drift
between commands. Precedence: defaults < config file < options given on the command line.
"""

from __future__ import annotations

import argparse
import inspect
import logging
from pathlib import Path
from typing import Any

from normdino.errors import InputError

logger = logging.getLogger(__name__)

#: settings that are not estimator hyper-parameters but belong in a config file too
RUN_KEYS = ("method", "backbone", "device", "cache_dir")


def declared_params() -> dict[str, tuple[Any, list[str]]]:
    """name -> (Param, users): the detector's parameters first, then every registered method's."""
    from normdino.detector_params import DETECTOR_PARAMS
    from normdino.methods.registry import all_params

    merged: dict[str, tuple[Any, list[str]]] = {p.name: (p, ["detector"]) for p in DETECTOR_PARAMS}
    for name, (param, users) in all_params().items():
        if name in merged:
            merged[name][1].extend(users)
        else:
            merged[name] = (param, users)
    return merged


def add_param_options(parser: argparse.ArgumentParser) -> None:
    """One option per declared hyper-parameter (default None = not given), grouped as estimator settings."""
    group = parser.add_argument_group("estimator settings (also from --config; each names the methods that use it)")
    for name, (param, users) in declared_params().items():
        where = "" if "detector" in users else f" [{', '.join(users)}]"
        help_text = (param.help + where).replace("%", "%%")  # argparse formats help with %
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": help_text}
        if param.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _fpr if name in ("fprs", "default_fpr") else param.type
            kwargs["metavar"] = name.upper()
            if param.nargs:
                kwargs["nargs"] = param.nargs
            if param.choices:
                kwargs["choices"] = param.choices
        group.add_argument(param.cli_flag, **kwargs)
    parser.add_argument("--config", default=None, help="YAML file of settings (keys as in --print-config)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved settings as YAML and exit")


def _fpr(text: str) -> float:
    try:
        return float(text[:-1]) / 100 if str(text).endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a false-positive rate: {text!r} (use 0.05 or 5%)") from None


def read_config(path: str | Path) -> dict:
    """Settings from a YAML file, with one clear error for a missing file, bad YAML or an unknown key."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as err:
        raise InputError(f"cannot read the config file {path} ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        raise InputError(f"{path} is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a mapping of settings, e.g. 'n_components: 500'")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    known = set(declared_params()) | set(RUN_KEYS)
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(f"{path} has unknown settings {', '.join(unknown)}; see 'normdino fit --print-config'")
    return data


def resolve_settings(args: argparse.Namespace, run_defaults: dict, method: str | None = None) -> dict:
    """Defaults < config file < command line, for the detector's and the chosen method's parameters and the run keys.

    The method is chosen first (``method``, else the command line, else config, else default), so only its
    parameters appear. A preset name (``patchcore-150``) sets its settings where the name is given: a setting on
    the command line beats a preset from the config file (the method becomes the family, ``patchcore``), a preset
    on the command line beats a setting in the config file, and a preset and a different value of its setting in
    the same place are refused.
    """
    from normdino.detector import AnomalyDetector
    from normdino.detector_params import DETECTOR_PARAMS

    config = read_config(args.config) if getattr(args, "config", None) else {}
    on_command_line = method or getattr(args, "method", None)
    method = on_command_line or config.get("method") or run_defaults.get("method", "dpmm")
    settings: dict[str, Any] = {**run_defaults, "method": method}
    signature = inspect.signature(AnomalyDetector.__init__).parameters
    settings.update({p.name: signature[p.name].default for p in DETECTOR_PARAMS})
    settings.update(_method_defaults(method))
    settings.update({k: v for k, v in config.items() if k != "method"})
    for name in list(declared_params()) + list(RUN_KEYS):
        value = getattr(args, name, None)
        if value is not None:
            settings[name] = value
    if on_command_line or "method" in config:
        where = "the command line" if on_command_line else str(args.config)
        settings["method"] = _settle_preset(str(method), where, args, config, settings)
    settings["fprs"] = sorted(set(float(f) for f in settings["fprs"]))
    if settings.get("backbone") is None:
        from normdino.detector import default_backbone

        settings["backbone"] = default_backbone(method)
    return settings


def _settle_preset(method: str, where: str, args: argparse.Namespace, config: dict, settings: dict) -> str:
    """The method name to fit after a preset's settings met explicit ones (see :func:`resolve_settings`).

    Updates ``settings`` in place; an InputError for a preset and a different value of its setting in one place.
    """
    from normdino.methods import registry

    fixed = registry.variant_params(method)
    if not fixed:
        return method
    family = registry.split_name(method)[0]
    cls = registry.method_class(method)
    flags = {name: param.cli_flag for name, (param, _) in declared_params().items()}
    overridden = {}
    for key, value in fixed.items():
        flag = flags[key]
        on_cli, in_file = getattr(args, key, None), config.get(key)
        if where == "the command line":
            if on_cli is not None and not registry.same_value(cls, key, on_cli, value):
                raise InputError(f"method {method} means {flag} {value}, which conflicts with {flag} {on_cli} on the "
                                 f"command line; ask for method {family} with {flag} {on_cli} instead")
            if in_file is not None and not registry.same_value(cls, key, in_file, value):
                logger.warning("method %s on the command line sets %s %s over %s: %s in %s",
                               method, flag, value, key, in_file, args.config)
            settings[key] = value
        else:
            if in_file is not None and not registry.same_value(cls, key, in_file, value):
                raise InputError(f"{where} sets method: {method}, which means {key}: {value}, and also {key}: "
                                 f"{in_file}; set method: {family} with {key}: {in_file} instead")
            if on_cli is not None and not registry.same_value(cls, key, on_cli, value):
                overridden[key] = on_cli
            else:
                settings[key] = value
    if not overridden:
        return method
    given = ", ".join(f"{flags[k]} {v}" for k, v in overridden.items())
    logger.warning("%s on the command line overrides method %s of %s: fitting %s with %s", given, method, where,
                   family, given)
    return family


def _method_defaults(method: str) -> dict:
    """The hyper-parameters a method name implies (its class defaults, with the variant applied: patchcore-150)."""
    from normdino.methods import registry

    params = registry.create(str(method)).get_params()
    params.pop("seed", None)
    return params


def split_settings(settings: dict, method: str) -> tuple[dict, dict]:
    """(detector keyword arguments, method hyper-parameters) of resolved settings, for one method name."""
    from normdino.detector_params import DETECTOR_PARAMS
    from normdino.methods import registry

    detector = {p.name: settings[p.name] for p in DETECTOR_PARAMS if p.name in settings}
    accepted = {p.name for p in registry.method_class(method).PARAMS} - {"seed"}
    method_params = {k: v for k, v in settings.items() if k in accepted}
    return detector, method_params


def to_yaml(settings: dict) -> str:
    """The settings as a YAML config file, the estimator's own keys grouped after the run keys."""
    import yaml

    ordered = {k: settings[k] for k in RUN_KEYS if k in settings}
    ordered.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items() if k not in ordered})
    return yaml.safe_dump(ordered, sort_keys=False)
