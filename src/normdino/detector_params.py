"""The detector's own hyper-parameters (each method declares its own), below both the detector and the model
file, which checks a file's detector settings against them: one declaration, no import circle.
"""

from __future__ import annotations

from normdino.methods.base import Param

#: The largest input side a model may have: 292 x 292 tokens at patch 14 already; beyond it a size is absurd
#: (a tampered model file, a typo), and fit and the model file refuse it alike.
MAX_IMAGE_SIZE = 4096

#: Hyper-parameters of the detector itself (those of each method are declared by the method).
DETECTOR_PARAMS: tuple[Param, ...] = (
    Param("image_size", int, "input resolution in pixels (rounded down to a multiple of the patch size)", minimum=14,
          maximum=MAX_IMAGE_SIZE),
    Param("normalize", bool, "L2-normalise the patch tokens (the paper does)"),
    Param("sigma", float, "Gaussian smoothing of pixel maps, in pixels (0 = none)", minimum=0.0, maximum=1000.0),
    Param("fprs", float, "false-positive rates to report thresholds for (any FPR in 1e-4..0.5 works at predict time)",
          flag="--fpr", nargs="+", minimum=1e-4, maximum=0.5),
    Param("default_fpr", float, "FPR used by predict when none is given", minimum=1e-4, maximum=0.5),
    Param("top_fraction", float, "image score = mean of this top fraction of pixel scores", minimum=1e-6, maximum=1.0),
    Param("val_fraction", float, "fraction of training sources held out for calibration when no --val is given",
          minimum=0.0, maximum=0.9),
    Param("batch_size", int, "images per backbone forward pass (None or 'auto': the measured best for the device "
          "and runtime: one image per core for torch on a CPU, see normdino.features.runtimes.auto_batch_size)",
          minimum=1),
    Param("seed", int, "random seed (few-shot image choice, coreset start, mixture initialisation)"),
)
