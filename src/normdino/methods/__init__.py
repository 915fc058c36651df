"""Normative models over DINO tokens, one module each, behind one interface (``base``) and one registry.

``create("dpmm")``, ``create("anomalydino-1shot", seed=3)``, ``create("patchcore-150")``: see ``registry``.
"""

from normdino.methods.base import NormativeMethod, Param
from normdino.methods.registry import available, create, register

__all__ = ["NormativeMethod", "Param", "available", "create", "register"]
