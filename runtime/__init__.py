"""MoBiQuant edge runtime: numpy + ONNX Runtime + tokenizers, never torch."""

from .ops import DOMAIN, OP_TYPE, library_path, register_schema

__all__ = ["DOMAIN", "OP_TYPE", "library_path", "register_schema"]
