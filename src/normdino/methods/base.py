"""The normative-model interface every method implements, and the hyper-parameter declarations the CLI reads.

A method learns what healthy DINO tokens look like and scores new tokens patch by patch. It follows
scikit-learn's conventions: hyper-parameters in ``__init__`` (declared once in ``PARAMS``, from which the
CLI options and the YAML config are built), ``fit`` returns self, learned state in attributes ending in
``_``. Its learned state is a dict of tensors plus its JSON-able parameters, so a model file can rebuild
it through the registry without pickle.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from normdino.errors import InputError, ModelFileError
from normdino.features.tokens import FeatureRequest, Tokens, TokenSet


@dataclass(frozen=True)
class Param:
    """One hyper-parameter: its name in ``__init__``, type, help, and the CLI flag (default ``--name-with-dashes``).

    ``choices`` restricts the values; ``minimum``/``maximum`` bound numbers (inclusive) for validation.
    """

    name: str
    type: type
    help: str
    flag: str | None = None
    choices: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None
    nargs: str | None = None  # "+" for lists (e.g. layers)

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def check(self, value: Any, owner: str) -> Any:
        """``value`` converted to the declared type, or an InputError saying what is wrong."""
        if value is None:
            return None
        try:
            if self.nargs:
                values = value if isinstance(value, (list, tuple)) else [value]
                converted: Any = tuple(self.type(v) for v in values)
                items = converted
            else:
                converted = _convert(self.type, value)
                items = (converted,)
        except (TypeError, ValueError):
            raise InputError(f"{owner}: {self.name} must be of type {self.type.__name__}, got {value!r}") from None
        for item in items:
            if self.choices is not None and item not in self.choices:
                raise InputError(f"{owner}: {self.name} must be one of {', '.join(map(str, self.choices))}, got {item!r}")
            if self.minimum is not None and isinstance(item, (int, float)) and not item >= self.minimum:
                raise InputError(f"{owner}: {self.name} must be at least {self.minimum:g}, got {item!r}")
            if self.maximum is not None and isinstance(item, (int, float)) and not item <= self.maximum:
                raise InputError(f"{owner}: {self.name} must be at most {self.maximum:g}, got {item!r}")
        return converted


def _convert(kind: type, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        return bool(value)
    if kind is float:
        converted = float(value)
        if converted != converted:  # NaN never makes sense as a hyper-parameter
            raise ValueError(value)
        return converted
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    return kind(value)


class NormativeMethod(ABC):
    """A normative model over DINO tokens: fit on healthy tokens, score new tokens patch by patch.

    Subclasses declare ``PARAMS`` (matching ``__init__``), register themselves with
    :func:`normdino.methods.registry.register`, and implement the abstract methods below. Scores live on
    the tokens' device; nothing moves tensors across devices behind the caller's back.
    """

    PARAMS: ClassVar[tuple[Param, ...]] = ()
    #: the registry name of this instance (e.g. ``patchcore-150``); set by :func:`registry.create`
    name: str = ""

    # ------------------------------------------------------------------ what it needs and keeps
    @abstractmethod
    def feature_request(self) -> FeatureRequest:
        """Which layers (and whether CLS tokens) the backbone must return for this method."""

    @abstractmethod
    def fit(self, train: TokenSet, val: TokenSet | None = None) -> "NormativeMethod":
        """Learn from healthy training tokens; ``val`` (healthy too) may select a model, never calibrate it here."""

    @abstractmethod
    def patch_scores(self, tokens: Tokens) -> torch.Tensor:
        """(B, h, w) anomaly scores (higher = more anomalous) on ``tokens.device``."""

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The learned state as named tensors (CPU, contiguous), enough to score after :meth:`load_state_dict`."""

    @abstractmethod
    def load_state_dict(self, tensors: dict[str, torch.Tensor], info: dict | None = None) -> "NormativeMethod":
        """Install a learned state written by :meth:`state_dict` (``info`` = :meth:`fit_info` of the fit).

        Shapes and value ranges are checked; anything wrong raises :class:`ModelFileError`.
        """

    # ------------------------------------------------------------------ defaults most methods keep
    def fit_info(self) -> dict:
        """JSON-able facts about the fit that the model file keeps (counts, best epoch, seconds)."""
        return dict(getattr(self, "fit_info_", {}))

    def to(self, device: torch.device | str) -> "NormativeMethod":
        """Move the learned tensors to ``device`` (every attribute ending in ``_`` that is a tensor) and fit there
        from now on (``self.device``, which methods read with ``getattr(self, "device", "cpu")``)."""
        self.device = device
        for key, value in vars(self).items():
            if key.endswith("_") and isinstance(value, torch.Tensor):
                setattr(self, key, value.to(device))
        return self

    @property
    def n_prototypes(self) -> int:
        """How many reference vectors a query token is compared with (prototypes, bank tokens)."""
        return 0

    @property
    def score_range(self) -> tuple[float, float] | None:
        """Where scores live a priori: (0, 1) for cosine distances; None when not known in advance (Euclidean,
        likelihood, centred fusions): the detector then stores maps over the range found at calibration."""
        kind = getattr(self, "metric", getattr(self, "score", "cosine"))
        return (0.0, 1.0) if kind == "cosine" else None

    def state_bytes(self) -> int:
        """Bytes of the method's tensors in a model file (its :meth:`state_dict`)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def scoring_bytes(self) -> int:
        """Bytes of what :meth:`patch_scores` reads (prototypes, bank): the memory the paper compares.

        The whole saved state unless a method keeps more than it scores with (the DPMM's EM state).
        """
        return self.state_bytes()

    def release_fit_state(self) -> "NormativeMethod":
        """Drop what only fitting further or saving needs, keep what scoring reads (a loaded model used to predict).

        Nothing to drop for a method whose whole state is scored with; afterwards scores are unchanged, while
        :meth:`state_dict` may refuse (load with the fit state kept to save or resume a fit).
        """
        return self

    def get_params(self) -> dict[str, Any]:
        """The hyper-parameters, by the names of ``PARAMS`` (JSON-able)."""
        params = {}
        for param in self.PARAMS:
            value = getattr(self, param.name)
            params[param.name] = list(value) if isinstance(value, tuple) else value
        return params

    def check_params(self) -> None:
        """Validate every hyper-parameter against its declaration (call at the start of ``fit``)."""
        for param in self.PARAMS:
            setattr(self, param.name, param.check(getattr(self, param.name), self.name or type(self).__name__))

    def check_fitted(self, attribute: str) -> None:
        if not hasattr(self, attribute):
            raise InputError(f"this {self.name or type(self).__name__} method is not fitted yet: call fit() first")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


def check_params_match_init(cls: type[NormativeMethod]) -> None:
    """Raise TypeError when ``PARAMS`` and ``__init__`` disagree (one source of truth, checked at registration)."""
    signature = inspect.signature(cls.__init__)
    names = [p for p in signature.parameters if p != "self"]
    declared = [p.name for p in cls.PARAMS]
    if sorted(names) != sorted(declared):
        raise TypeError(f"{cls.__name__}: PARAMS {declared} do not match __init__ arguments {names}")


def require(tensors: dict[str, torch.Tensor], names: tuple[str, ...], where: str) -> None:
    """ModelFileError unless every named tensor is present and finite."""
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ModelFileError(f"the {where} state is missing tensors {', '.join(missing)}")
    for n in names:
        t = tensors[n]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ModelFileError(f"the {where} state tensor {n} holds NaN or infinite values")
