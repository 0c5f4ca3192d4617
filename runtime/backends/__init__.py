"""Backends: one file each; each imports its heavy library only when constructed. `open_backend` opens any runtime
entry of the backend registry (`ddpm_deploy.backend_registry`: name -> class, files, devices); runtime.load and
backend auto both open through it."""

from __future__ import annotations

from ... import backend_registry as registry
from ...errors import UserError


def open_backend(path: str, kind: str, device: str, backend: str, **options):
    """The named backend on `path` (of manifest.kind_of `kind`); options go to its constructor."""
    entry = registry.get(backend)
    if entry is None or not entry.runtime:
        raise UserError(f"unknown backend {backend!r}: choose one of "
                        f"{', '.join(registry.names(with_auto=True, runtime=True))}")
    if kind not in entry.kinds:
        raise UserError(f"backend {backend} {entry.needs}, got {path}")
    if device not in entry.devices:
        raise UserError(f"backend {backend} {entry.device_refusal.format(device=device)}")
    cls = entry.load_class()
    return cls(str(path), device=device, **options) if entry.takes_device else cls(str(path), **options)
