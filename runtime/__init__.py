"""MoBiQuant edge runtime: numpy + ONNX Runtime + tokenizers, never torch."""

from .api import Model
from .ops import DOMAIN, OP_TYPE, library_path, register_schema

__all__ = ["DOMAIN", "OP_TYPE", "Model", "library_path", "register_schema"]
