"""Backends: one file each; each imports its heavy library only when constructed. `open_backend` is the one map
from a backend name to its class (runtime.load and backend auto both open through it)."""

from __future__ import annotations

from ...errors import UserError

NAMES = ("onnxruntime", "openvino", "tensorrt")


def open_backend(path: str, kind: str, device: str, backend: str, **options):
    """The named backend on `path` (of manifest.kind_of `kind`); options go to its constructor."""
    if backend not in NAMES:
        raise UserError(f"unknown backend {backend!r}: choose one of auto, {', '.join(NAMES)}")
    if backend in ("onnxruntime", "openvino") and kind != "onnx":
        raise UserError(f"backend {backend} needs an .onnx file, got {path}")
    if backend == "onnxruntime":
        from .onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(str(path), device=device, **options)
    if backend == "openvino":
        if device != "cpu":
            raise UserError(f"backend openvino runs on the CPU here; --device {device} is for onnxruntime")
        from .openvino_backend import OpenVinoBackend

        return OpenVinoBackend(str(path), **options)
    if kind != "tensorrt":
        raise UserError(f"backend tensorrt needs an engine built with `ddpm-deploy build`, got {path}")
    from .tensorrt_backend import TensorRTBackend

    return TensorRTBackend(str(path), **options)
