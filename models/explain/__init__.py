"""Explanations of the classifier's decisions: the Grad-CAM family, gradients, integrated gradients, occlusion,
deconvnet and guided backprop, several sharing one forward pass. Entry point: `explain`."""

from models.explain.base import Explanation
from models.explain.core import explain
from models.explain.params import ALIASES, LAYER_METHODS, METHODS, PARAMS, Param, resolve_methods, resolve_params

__all__ = [
    "ALIASES",
    "LAYER_METHODS",
    "METHODS",
    "PARAMS",
    "Explanation",
    "Param",
    "explain",
    "resolve_methods",
    "resolve_params",
]
