"""ddpm_deploy.runtime: sample from an exported model without torch.

    from ddpm_deploy.runtime import load
    with load("model.onnx", device="cpu") as pipe:
        images = pipe.sample(16, seed=0, sampler="ddim", steps=50)   # uint8 (N, H, W, C)
"""

from __future__ import annotations

from ..errors import UserError
from .artifact import kind_of
from .noise import request_noise
from .pipeline import Pipeline

BACKENDS = ("onnxruntime", "openvino", "tensorrt", "torch")


def load(path: str, device: str = "cpu", backend: str | None = None, **options) -> Pipeline:
    """Open an artifact; the backend follows from the file (.onnx: onnxruntime, .trt: TensorRT, .pt/folder/name:
    the PyTorch reference) unless `backend` names one. Options go to the backend (threads, precision, ...)."""
    kind = kind_of(str(path))
    backend = backend or {"onnx": "onnxruntime", "tensorrt": "tensorrt", "checkpoint": "torch"}[kind]
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend in ("onnxruntime", "openvino") and kind != "onnx":
        raise UserError(f"backend {backend} needs an .onnx file, got {path}")
    if backend == "onnxruntime":
        from .backends.onnxruntime_backend import OnnxRuntimeBackend

        return Pipeline(OnnxRuntimeBackend(str(path), device=device, **options))
    if backend == "openvino":
        if device != "cpu":
            raise UserError(f"backend openvino runs on the CPU here; --device {device} is for onnxruntime")
        from .backends.openvino_backend import OpenVinoBackend

        return Pipeline(OpenVinoBackend(str(path), **options))
    if backend == "tensorrt":
        if kind != "tensorrt":
            raise UserError(f"backend tensorrt needs an engine built with `ddpm-deploy build`, got {path}")
        from .backends.tensorrt_backend import TensorRTBackend

        return Pipeline(TensorRTBackend(str(path), **options))
    from .backends.torch_backend import TorchBackend

    return Pipeline(TorchBackend(str(path), device=device, **options))


__all__ = ["load", "Pipeline", "request_noise", "BACKENDS", "UserError"]
