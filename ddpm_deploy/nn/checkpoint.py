"""ddpm-deploy checkpoints: a plain dict of primitives and tensors, read with `torch.load(weights_only=True)`.

No classes are pickled, so loading never runs code from the file. torch is imported lazily.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError, first_line
from ..files import write_atomic
from ..schedule import Schedule

FORMAT = "ddpm-deploy/checkpoint"
FORMAT_VERSION = 1


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
        from .unet import unet_from_config

        unet = unet_from_config(self.unet)
        try:
            unet.load_state_dict(self.weights, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            detail = first[1].strip() if len(first) > 1 else first[0]
            raise UserError(f"checkpoint {self.source}: weights do not match its UNet config ({detail})") from None
        return unet.eval()


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
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {first_line(e, 120)})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise UserError(f"{path} is not a ddpm-deploy checkpoint (no '{FORMAT}' header): train one with "
                        "`ddpm-deploy train` or pass a diffusers folder")
    if obj.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer ddpm-deploy (format {obj['format_version']}); upgrade")
    return obj


def save_atomic(obj: dict, path: str | os.PathLike) -> None:
    """torch.save to a temp file in the same folder, then rename: a crash never leaves a half-written file."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


