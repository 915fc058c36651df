"""Methods by name: ``create("patchcore-150")`` builds a fresh, unfitted method.

A method module registers a *family* (``dpmm``, ``anomalydino``, ``patchcore``, ...) with a parser for the
optional variant after the first dash (``anomalydino-1shot``, ``patchcore-10%``). Every module of the
``normdino.methods`` package is imported on first use, so a new method is one new module and nothing else.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any, Callable

from normdino.errors import InputError
from normdino.methods.base import NormativeMethod, Param, check_params_match_init

#: family -> (class, variant parser returning constructor overrides, example names)
_FAMILIES: dict[str, tuple[type[NormativeMethod], Callable[[str], dict], tuple[str, ...]]] = {}
_LOADED = False


def register(family: str, variants: Callable[[str], dict] | None = None, examples: tuple[str, ...] = ()):
    """Class decorator: make ``family`` (and ``family-VARIANT`` via ``variants``) create this class."""

    def decorate(cls: type[NormativeMethod]) -> type[NormativeMethod]:
        check_params_match_init(cls)
        _FAMILIES[family] = (cls, variants or _no_variant(family), examples or (family,))
        return cls

    return decorate


def _no_variant(family: str) -> Callable[[str], dict]:
    def parse(variant: str) -> dict:
        raise InputError(f"method {family!r} has no variants ({family}-{variant} was asked for)")

    return parse


def _load_builtin() -> None:
    global _LOADED
    if _LOADED:
        return
    for module in pkgutil.iter_modules([str(Path(__file__).parent)]):  # the modules beside this one
        if module.name not in ("base", "registry"):
            importlib.import_module(f"{__package__}.{module.name}")
    _LOADED = True


def split_name(name: str) -> tuple[str, str | None]:
    """(family, variant) of a method name; the longest registered family prefix wins (``dpmm-multistage``)."""
    _load_builtin()
    if name in _FAMILIES:
        return name, None
    for family in sorted(_FAMILIES, key=len, reverse=True):
        if name.startswith(family + "-"):
            return family, name[len(family) + 1:]
    raise InputError(f"unknown method {name!r}; choose one of {', '.join(available())}")


def method_class(name: str) -> type[NormativeMethod]:
    """The class a method name builds."""
    return _FAMILIES[split_name(name)[0]][0]


def variant_params(name: str) -> dict[str, Any]:
    """The hyper-parameters a preset name fixes (``patchcore-150`` -> ``{"coreset_size": "150"}``); {} for a family."""
    family, variant = split_name(name)
    return {} if variant is None else dict(_FAMILIES[family][1](variant))


def same_value(cls: type[NormativeMethod], name: str, a: Any, b: Any) -> bool:
    """True when two values of hyper-parameter ``name`` of ``cls`` mean the same (compared after conversion)."""
    param = next(p for p in cls.PARAMS if p.name == name)
    return param.check(a, cls.__name__) == param.check(b, cls.__name__)


def create(name: str, **params: Any) -> NormativeMethod:
    """A new unfitted method; ``params`` are hyper-parameters (unknown ones for this method are ignored).

    A preset name's own settings (``patchcore-150``: coreset_size 150) and an explicit different value of the same
    setting conflict: that is refused, never settled silently in favour of either.
    """
    family, variant = split_name(name)
    cls, parse, _ = _FAMILIES[family]
    accepted = {p.name for p in cls.PARAMS}
    kwargs = {k: v for k, v in params.items() if k in accepted and v is not None}
    if variant is not None:
        for key, value in parse(variant).items():
            if key in kwargs and not same_value(cls, key, kwargs[key], value):
                raise InputError(f"method {name} means {key}={value}, which conflicts with the {key}={kwargs[key]!r} "
                                 f"also given; ask for method {family} with {key}={kwargs[key]!r} instead")
            kwargs[key] = value
    method = cls(**kwargs)
    method.name = name
    return method


def create_method(name: str, **params: Any) -> NormativeMethod:
    """Alias of :func:`create` for the package root: ``normdino.create_method("patchcore-150")``."""
    return create(name, **params)


def available_methods() -> list[str]:
    """Alias of :func:`available` for the package root."""
    return available()


def available() -> list[str]:
    """Example names of every registered method (families and their common variants)."""
    _load_builtin()
    return [example for _, _, examples in _FAMILIES.values() for example in examples]


def families() -> dict[str, type[NormativeMethod]]:
    """Registered family -> class."""
    _load_builtin()
    return {family: cls for family, (cls, _, _) in _FAMILIES.items()}


def all_params() -> dict[str, tuple[Param, list[str]]]:
    """Every hyper-parameter of every method: name -> (declaration, families using it). Types must agree."""
    merged: dict[str, tuple[Param, list[str]]] = {}
    for family, cls in families().items():
        for param in cls.PARAMS:
            if param.name in merged:
                known, users = merged[param.name]
                if known.type is not param.type or known.cli_flag != param.cli_flag:
                    raise TypeError(f"parameter {param.name} is declared differently by {users[0]} and {family}")
                users.append(family)
            else:
                merged[param.name] = (param, [family])
    return merged
