"""Open a Pipeline on any artifact: exported models through the torch-free runtime, checkpoints on the PyTorch
reference (`ddpm_deploy.nn`). The one place the CLI, verify, eval, demo and bench open models."""

from __future__ import annotations

from .errors import UserError
from .manifest import kind_of
from .runtime import Pipeline, load

BACKENDS = ("onnxruntime", "openvino", "tensorrt", "torch")


def open_pipeline(path: str, device: str = "cpu", backend: str | None = None, precision: str | None = None,
                  threads: int | None = None, **options) -> Pipeline:
    """A Pipeline on `path`: .onnx / engine through the runtime, a checkpoint (.pt, folder, shipped name) or
    backend "torch" on the PyTorch reference. `precision` is OpenVINO's (fp32 / bf16)."""
    if threads:
        options["threads"] = threads
    if precision:
        if backend != "openvino":
            raise UserError("--precision applies to --backend openvino only")
        options["precision"] = precision
    if backend == "torch" or (backend is None and kind_of(path) == "checkpoint"):
        return open_reference(path, device=device, **options)
    return load(path, device=device, backend=backend, **options)


def open_reference(checkpoint: str, device: str = "cpu", **options) -> Pipeline:
    """The PyTorch reference on a checkpoint (needs torch)."""
    from .nn.torch_backend import TorchBackend

    return Pipeline(TorchBackend(str(checkpoint), device=device, **options))
