"""ddpm_deploy.runtime: sample from an exported model without torch.

    from ddpm_deploy.runtime import load
    with load("model.onnx", device="cpu") as pipe:
        images = pipe.sample(16, seed=0, sampler="ddim", steps=50)   # uint8 (N, H, W, C)

An .onnx on the CPU runs on backend "auto" unless one is named: the fastest CPU configuration that passes a
short check against onnxruntime fp32, measured once per model, CPU and library versions and cached
(see runtime/auto.py). The choice is on `pipe.backend_choice`.

Checkpoints (.pt, diffusers folders) run on the PyTorch reference, which lives with torch in `ddpm_deploy.nn`
(`ddpm_deploy.app.opener.open_pipeline` opens either kind).

Backend names, defaults and classes come from the backend registry (ddpm_deploy.backend_registry). The one local
import, the TensorRT engine builder, imports onnx and the TensorRT backend: only for `engine_from_onnx`.
"""

from __future__ import annotations

from .. import backend_registry as registry
from ..backend_registry import default_backend
from ..errors import UserError
from ..artifact.manifest import kind_of
from ..sampling.noise import request_noise
from .auto import _default_echo, choose
from .backends import open_backend
from .pipeline import Pipeline

# The names `load(backend=...)` takes: "auto" and the registry's runtime entries (not the PyTorch reference).
BACKENDS = registry.names(with_auto=True, runtime=True)


def load(path: str, device: str = "cpu", backend: str | None = None, echo=None, **options) -> Pipeline:
    """Open an exported artifact; the backend follows from the file (`default_backend`) unless `backend` names
    one. Options go to the backend (threads, precision, ...). `echo(line)` gets what auto chose and why
    (default: stderr when it is a terminal)."""
    kind = kind_of(str(path))
    if kind == "checkpoint":
        raise UserError(f"{path} is not an exported model (.onnx or a TensorRT engine): export it with "
                        f"`ddpm-deploy export {path}`, or open the PyTorch reference with "
                        "ddpm_deploy.app.opener.open_pipeline")
    _check_threads(options, echo)
    backend = backend or default_backend(kind, device)
    if backend == registry.AUTO:
        return _load_auto(str(path), kind, device, echo, options)
    return Pipeline(open_backend(str(path), kind, device, backend, **options))


def _check_threads(options: dict, echo) -> None:
    """threads < 1 is refused (onnxruntime would run "-3 threads", OpenVINO fail mid-run); above the usable cores
    it is capped at them with one line: more threads than cores only fight over them (a tampered value of 3000
    drove a 2-core machine's load average past 900)."""
    n = options.get("threads")
    if n is None:
        return
    options["threads"], note = registry.checked_threads(n)
    if note:
        (_default_echo if echo is None else echo)(note)


def _load_auto(path: str, kind: str, device: str, echo, options: dict) -> Pipeline:
    """The fastest verified CPU backend for this file (measured on first use, then cached)."""
    if default_backend(kind, device) != registry.AUTO:
        raise UserError(f"backend auto chooses among CPU backends for an .onnx file; for {path} on --device "
                        f"{device} name a backend ({default_backend('onnx', device, allow_auto=False)} for .onnx, "
                        f"{default_backend('tensorrt', device)} for engines)")
    extra = sorted(k for k in options if k != "threads")
    if extra:
        raise UserError(f"backend auto takes only threads, got {', '.join(extra)}: name a backend "
                        f"(--backend {' or '.join(registry.names(auto=True))}) to pass backend options")
    choice = choose(path, threads=options.get("threads"), echo=echo)
    pipe = load(path, device="cpu", backend=choice.backend, **choice.options())
    pipe.backend_choice = choice
    return pipe


def engine_from_onnx(*args, **kwargs):
    """Build a TensorRT engine of the fused step from an exported ONNX (see backends.tensorrt_build)."""
    from .backends.tensorrt_build import engine_from_onnx as build

    return build(*args, **kwargs)


__all__ = ["load", "default_backend", "Pipeline", "request_noise", "engine_from_onnx", "BACKENDS", "UserError"]
