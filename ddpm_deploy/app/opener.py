"""Open a Pipeline on any artifact: exported models through the torch-free runtime, checkpoints on the PyTorch
reference (`ddpm_deploy.nn`). The one place the CLI, verify, eval, demo and bench open models.

Backends are the registry's (`ddpm_deploy.backend_registry`): its runtime entries open through `runtime.load`, the
PyTorch reference (entry "torch", `runtime=False`) through its class here, the only place the app opens it; the
class is imported on first use (torch is the torch extra's).
"""

from __future__ import annotations

from .. import backend_registry as registry
from ..errors import UserError
from ..artifact.manifest import kind_of
from ..runtime import Pipeline, load

REFERENCE = "torch"   # the registry entry of the PyTorch reference (ddpm_deploy.nn)
BACKENDS = registry.names()   # every backend an app command may name ("auto" aside): the runtime's and the reference


def open_pipeline(path: str, device: str = "cpu", backend: str | None = None, precision: str | None = None,
                  threads: int | None = None, **options) -> Pipeline:
    """A Pipeline on `path`: .onnx / engine through the runtime, a checkpoint (.pt, folder, shipped name) or
    backend "torch" on the PyTorch reference. `precision` goes to a backend that takes one (OpenVINO: fp32 / bf16)."""
    if threads:
        options["threads"] = threads
    if precision:
        if not registry.takes_precision(backend):
            raise UserError(f"--precision applies to --backend {' or '.join(registry.precision_backends())} only")
        options["precision"] = precision
    if (backend or registry.default_backend(kind_of(path), device)) == REFERENCE:
        return open_reference(path, device=device, **options)
    return load(path, device=device, backend=backend, **options)


def open_reference(checkpoint: str, device: str = "cpu", **options) -> Pipeline:
    """The PyTorch reference on a checkpoint (needs torch)."""
    return Pipeline(registry.get(REFERENCE).load_class()(str(checkpoint), device=device, **options))
