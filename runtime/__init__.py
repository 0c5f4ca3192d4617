"""ddpm_deploy.runtime: sample from an exported model without torch.

    from ddpm_deploy.runtime import load
    with load("model.onnx", device="cpu") as pipe:
        images = pipe.sample(16, seed=0, sampler="ddim", steps=50)   # uint8 (N, H, W, C)

Checkpoints (.pt, diffusers folders) run on the PyTorch reference, which lives with torch in `ddpm_deploy.nn`
(`ddpm_deploy.pipelines.open_pipeline` opens either kind).
"""

from __future__ import annotations

from ..errors import UserError
from ..manifest import kind_of
from ..noise import request_noise
from .pipeline import Pipeline

BACKENDS = ("onnxruntime", "openvino", "tensorrt")


def load(path: str, device: str = "cpu", backend: str | None = None, **options) -> Pipeline:
    """Open an exported artifact; the backend follows from the file (.onnx: onnxruntime, .trt: TensorRT) unless
    `backend` names one. Options go to the backend (threads, precision, ...)."""
    kind = kind_of(str(path))
    if kind == "checkpoint":
        raise UserError(f"{path} is not an exported model (.onnx or a TensorRT engine): export it with "
                        f"`ddpm-deploy export {path}`, or open the PyTorch reference with "
                        "ddpm_deploy.pipelines.open_pipeline")
    backend = backend or {"onnx": "onnxruntime", "tensorrt": "tensorrt"}[kind]
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
    if kind != "tensorrt":
        raise UserError(f"backend tensorrt needs an engine built with `ddpm-deploy build`, got {path}")
    from .backends.tensorrt_backend import TensorRTBackend

    return Pipeline(TensorRTBackend(str(path), **options))


def engine_from_onnx(*args, **kwargs):
    """Build a TensorRT engine of the fused step from an exported ONNX (see backends.tensorrt_build)."""
    from .backends.tensorrt_build import engine_from_onnx as build

    return build(*args, **kwargs)


__all__ = ["load", "Pipeline", "request_noise", "engine_from_onnx", "BACKENDS", "UserError"]
