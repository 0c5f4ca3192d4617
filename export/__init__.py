"""Export: checkpoint -> verified ONNX (fp32/fp16) with a manifest. (ONNX -> TensorRT engine is built by the
runtime's TensorRT backend: `ddpm_deploy.runtime.engine_from_onnx`, as Polygraphy keeps build and run together.)

Importing this package is cheap; torch and onnx are imported by the functions that need them.
"""

from __future__ import annotations

from .onnx_export import onnx_from_checkpoint


__all__ = ["onnx_from_checkpoint"]
