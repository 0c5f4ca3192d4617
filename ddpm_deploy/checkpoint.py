"""ddpm-deploy checkpoints: a plain dict of primitives and tensors, read with `torch.load(weights_only=True)`.

No classes are pickled, so loading never runs code from the file. torch is imported lazily.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .config import VARIANCE_TYPES
from .errors import UserError
from .schedule import Schedule, ScheduleError

FORMAT = "ddpm-deploy/checkpoint"
FORMAT_VERSION = 1
SHIPPED_MODELS = ("digits",)


@dataclass
class Checkpoint:
    """What a sampler needs from a checkpoint: the UNet config and weights, schedule and sampling settings."""

    unet: dict
    schedule: Schedule
    weights: dict = field(repr=False)
    variance_type: str = "fixed_small"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    prediction_type: str = "epsilon"
    source: str = ""
    sha256: str = ""
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def channels(self) -> int:
        return int(self.unet["in_channels"])

    @property
    def image_size(self) -> int:
        return int(self.unet["sample_size"])

    def meta(self) -> dict:
        """Everything but the weights, JSON-able."""
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "unet": self.unet,
                "schedule": self.schedule.to_dict(), "variance_type": self.variance_type,
                "clip_sample": self.clip_sample, "clip_sample_range": self.clip_sample_range,
                "prediction_type": self.prediction_type}

    def build_unet(self):
        """A diffusers UNet2DModel with these weights, in eval mode; shape mismatches are a UserError."""
        from .train.model import unet_from_config

        unet = unet_from_config(self.unet)
        try:
            unet.load_state_dict(self.weights, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            detail = first[1].strip() if len(first) > 1 else first[0]
            raise UserError(f"checkpoint {self.source}: weights do not match its UNet config ({detail})") from None
        return unet.eval()


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


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_raw(path: Path) -> dict:
    """torch.load with weights_only=True; anything else in the file is refused, never executed."""
    import pickle
    import zipfile

    import torch

    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6
        raise UserError(f"{path} is not a readable checkpoint (not a torch.save archive): pass a model.pt from "
                        "`ddpm-deploy train` or a diffusers folder")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path} holds pickled Python objects; ddpm-deploy only loads plain tensor checkpoints "
                        "(re-save it as a ddpm-deploy model.pt or a diffusers folder)") from None
    except Exception as e:  # zip/format errors: not a torch file at all
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise UserError(f"{path} is not a ddpm-deploy checkpoint (no '{FORMAT}' header): train one with "
                        "`ddpm-deploy train` or pass a diffusers folder")
    if obj.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer ddpm-deploy (format {obj['format_version']}); upgrade")
    return obj


def load_checkpoint(spec: str | os.PathLike, schedule_overrides: dict | None = None) -> Checkpoint:
    """Load a ddpm-deploy model.pt, a shipped name or a diffusers folder, without unpickling anything.

    `schedule_overrides` only apply to diffusers folders (a bare UNet folder has no schedule of its own)."""
    path = resolve_checkpoint_path(spec)
    if path.is_dir():
        from .diffusers_io import checkpoint_from_diffusers

        return checkpoint_from_diffusers(path, schedule_overrides)
    obj = load_raw(path)
    try:
        schedule = Schedule.from_dict(obj["schedule"])
        ckpt = Checkpoint(unet=dict(obj["unet"]), schedule=schedule, weights=obj["weights"],
                          variance_type=obj.get("variance_type", "fixed_small"),
                          clip_sample=bool(obj.get("clip_sample", True)),
                          clip_sample_range=float(obj.get("clip_sample_range", 1.0)),
                          prediction_type=obj.get("prediction_type", "epsilon"),
                          source=str(spec), sha256=file_sha256(path), extra=obj)
    except (KeyError, TypeError, ScheduleError) as e:
        raise UserError(f"{path} is a damaged ddpm-deploy checkpoint (missing or bad field {e})") from None
    if ckpt.variance_type not in VARIANCE_TYPES:
        raise UserError(f"{path}: unsupported variance_type {ckpt.variance_type!r} (supported: {', '.join(VARIANCE_TYPES)})")
    if ckpt.prediction_type != "epsilon":
        raise UserError(f"{path}: prediction_type {ckpt.prediction_type!r} is not supported; only 'epsilon'")
    return ckpt


def save_atomic(obj: dict, path: str | os.PathLike) -> None:
    """torch.save to a temp file in the same folder, then rename: a crash never leaves a half-written file."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _publish(tmp: str, path: Path) -> None:
    """mkstemp makes 0600 files; give the result the usual umask permissions, then rename into place."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
