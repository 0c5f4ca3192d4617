"""Open a checkpoint by path, diffusers folder or shipped name (torch is imported by the readers, lazily)."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from ..config import PREDICTION_TYPES, VARIANCE_TYPES
from ..errors import UserError
from ..files import file_sha256
from ..artifact.fields import checked_distilled
from ..sampling.schedule import Schedule, ScheduleError
from .checkpoint import Checkpoint, load_raw
from .diffusers_io import checkpoint_from_diffusers

# The shipped digits eps model and its distilled students (`ddpm-deploy distill`; digits-<K>step samples in K steps
# on the grid it records, weights stored in fp16; model cards in models/<name>.card.json).
SHIPPED_MODELS = ("digits", "digits-4step", "digits-2step", "digits-1step")


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
    obj = load_raw(path)
    try:
        schedule = Schedule.from_dict(obj["schedule"])
        ckpt = Checkpoint(unet=dict(obj["unet"]), schedule=schedule, weights=obj["weights"],
                          variance_type=obj.get("variance_type", "fixed_small"),
                          clip_sample=bool(obj.get("clip_sample", True)),
                          clip_sample_range=float(obj.get("clip_sample_range", 1.0)),
                          prediction_type=obj.get("prediction_type", "epsilon"),
                          distilled=checked_distilled(obj.get("distilled"), schedule.T, str(path)),
                          source=str(spec), sha256=file_sha256(path))
    except (KeyError, TypeError, ScheduleError) as e:
        raise UserError(f"{path} is a damaged ddpm-deploy checkpoint (missing or bad field {e})") from None
    if ckpt.variance_type not in VARIANCE_TYPES:
        raise UserError(f"{path}: unsupported variance_type {ckpt.variance_type!r} (supported: {', '.join(VARIANCE_TYPES)})")
    if ckpt.prediction_type not in PREDICTION_TYPES:
        raise UserError(f"{path}: unsupported prediction_type {ckpt.prediction_type!r} "
                        f"(supported: {', '.join(PREDICTION_TYPES)})")
    return ckpt


