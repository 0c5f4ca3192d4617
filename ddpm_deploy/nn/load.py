"""Open a checkpoint by path, diffusers folder or shipped name (torch is imported by the readers, lazily)."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from ..errors import UserError
from ..files import file_sha256
from ..artifact.fields import Fields, checked_distilled, sampling_fields, unet_shape_fields
from .checkpoint import RETRAIN, Checkpoint, check_weights, load_raw
from .diffusers_io import checkpoint_from_diffusers

# The shipped digits eps model and its distilled students (`ddpm-deploy distill`; digits-<K>step samples in K steps
# on the grid it records, weights stored in fp16; model cards in models/<name>.card.json).
SHIPPED_MODELS = ("digits", "digits-4step", "digits-2step", "digits-1step")
# What a model.pt without these fields means (the trainer's defaults).
CHECKPOINT_DEFAULTS = {"variance_type": "fixed_small", "clip_sample": True, "clip_sample_range": 1.0,
                       "prediction_type": "epsilon"}


def resolve_checkpoint_path(spec: str | os.PathLike) -> Path:
    """A path, or the name of a model shipped with the package (e.g. 'digits')."""
    spec = str(spec)
    if spec in SHIPPED_MODELS and not Path(spec).exists():
        return Path(str(resources.files("ddpm_deploy") / "models" / f"{spec}.pt"))
    path = Path(spec)
    if not path.exists():
        raise UserError(f"checkpoint {spec!r} not found: give a model.pt path, a diffusers folder, "
                        f"or a shipped name ({', '.join(SHIPPED_MODELS)})")
    return path


def load_checkpoint(spec: str | os.PathLike, schedule_overrides: dict | None = None) -> Checkpoint:
    """Load a ddpm-deploy model.pt, a shipped name or a diffusers folder, without unpickling anything.

    `schedule_overrides` only apply to diffusers folders (a bare UNet folder has no schedule of its own)."""
    path = resolve_checkpoint_path(spec)
    if path.is_dir():
        return checkpoint_from_diffusers(path, schedule_overrides)
    return checkpoint_from_raw(load_raw(path), str(path), source=str(spec), sha256=file_sha256(path))


def checkpoint_from_raw(obj: dict, where: str, source: str, sha256: str) -> Checkpoint:
    """A model.pt's dict as a Checkpoint, every field checked as a manifest's are (artifact.fields): the sampling
    settings, the schedule, the UNet's image shape (capped), the weights' container and a distilled grid."""
    f = Fields(obj, where, what="checkpoint", fix=RETRAIN)
    sampling = sampling_fields(f, CHECKPOINT_DEFAULTS)
    schedule = f.schedule()
    unet = f.obj("unet")
    if not all(isinstance(k, str) for k in unet):
        f.bad("unet", unet, "must map UNet2DModel argument names to values")
    unet_shape_fields(f, sampling["variance_type"], prefix="unet.")
    weights = check_weights(f.get("weights"), where, RETRAIN)
    return Checkpoint(unet=dict(unet), schedule=schedule, weights=weights, **sampling,
                      distilled=checked_distilled(obj.get("distilled"), schedule.T, where), source=source,
                      sha256=sha256)
