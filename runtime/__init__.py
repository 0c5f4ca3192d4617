"""ddpm_deploy.runtime: sample from an exported model without torch.

    from ddpm_deploy.runtime import load
    with load("model.onnx", device="cpu") as pipe:
        images = pipe.sample(16, seed=0, sampler="ddim", steps=50)   # uint8 (N, H, W, C)

An .onnx on the CPU runs on backend "auto" unless one is named: the fastest CPU configuration that passes a
short check against onnxruntime fp32, measured once per model, CPU and library versions and cached
(see runtime/auto.py). The choice is on `pipe.backend_choice`.

Checkpoints (.pt, diffusers folders) run on the PyTorch reference, which lives with torch in `ddpm_deploy.nn`
(`ddpm_deploy.pipelines.open_pipeline` opens either kind).
"""

from __future__ import annotations

from ..errors import UserError
from ..manifest import kind_of
from ..noise import request_noise
from .backends import open_backend
from .pipeline import Pipeline

BACKENDS = ("auto", "onnxruntime", "openvino", "tensorrt")


def default_backend(kind: str, device: str = "cpu") -> str:
    """The backend a file of `kind` (manifest.kind_of) runs on when none is named: an .onnx on the CPU: auto; on a
    GPU device: onnxruntime; a TensorRT engine: tensorrt."""
    if kind == "onnx":
        return "auto" if device == "cpu" else "onnxruntime"
    return "tensorrt"


def load(path: str, device: str = "cpu", backend: str | None = None, echo=None, **options) -> Pipeline:
    """Open an exported artifact; the backend follows from the file (`default_backend`) unless `backend` names
    one. Options go to the backend (threads, precision, ...). `echo(line)` gets what auto chose and why
    (default: stderr when it is a terminal)."""
    kind = kind_of(str(path))
    if kind == "checkpoint":
        raise UserError(f"{path} is not an exported model (.onnx or a TensorRT engine): export it with "
                        f"`ddpm-deploy export {path}`, or open the PyTorch reference with "
                        "ddpm_deploy.pipelines.open_pipeline")
    _check_threads(options, echo)
    backend = backend or default_backend(kind, device)
    if backend == "auto":
        return _load_auto(str(path), kind, device, echo, options)
    return Pipeline(open_backend(str(path), kind, device, backend, **options))


def _check_threads(options: dict, echo) -> None:
    """threads < 1 is refused (onnxruntime would run "-3 threads", OpenVINO fail mid-run); above the usable cores
    it is capped at them with one line: more threads than cores only fight over them (a tampered value of 3000
    drove a 2-core machine's load average past 900)."""
    n = options.get("threads")
    if n is None:
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"threads must be at least 1 (--threads N), got {n!r}: leave it out for the default")
    from .auto import _default_echo, usable_cores

    cores = usable_cores()
    if n > cores:
        (_default_echo if echo is None else echo)(f"note: --threads {n} capped at the {cores} usable cores")
        options["threads"] = cores


def _load_auto(path: str, kind: str, device: str, echo, options: dict) -> Pipeline:
    """The fastest verified CPU backend for this file (measured on first use, then cached)."""
    if kind != "onnx" or device != "cpu":
        raise UserError(f"backend auto chooses among CPU backends for an .onnx file; for {path} on --device "
                        f"{device} name a backend (onnxruntime for .onnx, tensorrt for engines)")
    extra = sorted(k for k in options if k != "threads")
    if extra:
        raise UserError(f"backend auto takes only threads, got {', '.join(extra)}: name a backend "
                        "(--backend onnxruntime or openvino) to pass backend options")
    from .auto import choose

    choice = choose(path, threads=options.get("threads"), echo=echo)
    pipe = load(path, device="cpu", backend=choice.backend, **choice.options())
    pipe.backend_choice = choice
    return pipe


def engine_from_onnx(*args, **kwargs):
    """Build a TensorRT engine of the fused step from an exported ONNX (see backends.tensorrt_build)."""
    from .backends.tensorrt_build import engine_from_onnx as build

    return build(*args, **kwargs)


__all__ = ["load", "default_backend", "Pipeline", "request_noise", "engine_from_onnx", "BACKENDS", "UserError"]
