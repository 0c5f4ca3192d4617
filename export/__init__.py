"""Export: checkpoint -> verified ONNX (fp32/fp16) with a manifest, and ONNX -> TensorRT engine.

Importing this package is cheap; torch, onnx and tensorrt are imported by the functions that need them.
"""

from __future__ import annotations


def onnx_from_checkpoint(*args, **kwargs):
    from .onnx_export import onnx_from_checkpoint as f

    return f(*args, **kwargs)


def engine_from_onnx(*args, **kwargs):
    from .tensorrt_build import engine_from_onnx as f

    return f(*args, **kwargs)


__all__ = ["onnx_from_checkpoint", "engine_from_onnx"]
