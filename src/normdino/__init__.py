"""normdino: normative models of DINO patch embeddings for anomaly detection in medical images.

Heavy modules (torch, transformers) are imported on first use, so ``normdino --help`` is quick.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # the pipeline, in the order data flows through it
    "read_image": "normdino.io.reading",
    "Volume": "normdino.io.volumes",
    "SliceOptions": "normdino.io.slicing",
    "Backbone": "normdino.features.backbone",
    "extract_tokens": "normdino.features.cache",
    "DirichletProcessMixture": "normdino.methods.mixture",
    "AnomalyDetector": "normdino.detector",
    "Prediction": "normdino.detector",
    # every method behind one interface, by name
    "NormativeMethod": "normdino.methods.base",
    "create_method": "normdino.methods.registry",
    "available_methods": "normdino.methods.registry",
    "DPMM": "normdino.methods.dpmm",
    "MemoryBank": "normdino.methods.memory_bank",
    "Coreset": "normdino.methods.memory_bank",
    # evaluation
    "load_dataset": "normdino.evaluation.datasets",
    "PixelScoreAccumulator": "normdino.evaluation.metrics",
    # data for trying things out, and errors
    "write_phantom_dataset": "normdino.io.phantoms",
    "NormdinoError": "normdino.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'normdino' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
