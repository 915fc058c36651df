"""normdino: normative models of DINO patch embeddings for anomaly detection in medical images.

Heavy modules (torch, transformers) are imported on first use, so ``normdino --help`` is quick.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "DirichletProcessMixture": "normdino.mixture",
    "Backbone": "normdino.backbone",
    "AnomalyDetector": "normdino.detector",
    "NormdinoError": "normdino.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'normdino' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
