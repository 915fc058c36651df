"""normdino: normative models of DINO patch embeddings for anomaly detection in medical images.

Heavy modules (torch, transformers) are imported on first use, so ``normdino --help`` is quick.

Layout and the import rule. The stages are sub-packages around a small detector and a thin command line,
and imports flow one way, io -> features -> methods -> detector -> evaluation / serving / workflows -> cli:
a module imports only from lower layers or from inside its own sub-package; there are no import circles,
and no module uses another module's ``_private`` names (tests/test_layers.py checks all three). The layers,
lowest first, with the top-level helper modules where their imports put them:

0. foundation: ``errors``, ``parallel``, ``files``, ``thresholds`` (nothing of normdino but these);
1. ``io``: reading images, volumes and DICOM; writing results and reports;
2. ``features``: the DINO backbone, its runtimes and the token cache; then ``distributed`` (collectives over
   token sets, identities without torchrun);
3. ``methods``: the normative methods behind one interface, and scoring;
4. the detector: ``detector_params``, ``model_file``, ``model_checks`` (what loading a model checks),
   ``detector`` (``AnomalyDetector``), ``config`` (settings from the command line and YAML), ``torchrun``
   (joining a job, sharing inputs);
5. ``evaluation``, ``serving``, ``workflows``: whole runs on top of the detector (they do not import each other);
6. entry points: ``demo``, ``cli`` (one module per command), ``__main__``.
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
    "PixelScoreAccumulator": "normdino.evaluation.accumulator",
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
