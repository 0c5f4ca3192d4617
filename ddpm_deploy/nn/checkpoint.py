"""ddpm-deploy checkpoints: a plain dict of primitives and tensors, read with `torch.load(weights_only=True)`.

No classes are pickled, so loading never runs code from the file.
"""
# torch (the torch extra) is imported where used: importing ddpm_deploy.nn needs no torch.

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError, first_line
from ..files import write_atomic
from ..sampling.schedule import Schedule
from .unet import unet_from_config

FORMAT = "ddpm-deploy/checkpoint"
FORMAT_VERSION = 1
# Caps on a UNet config read from a file (a diffusers config.json, a model.pt's 'unet'), checked before the module is
# built even on the meta device, where building costs O(levels x layers) Python objects (200 layers: 4.7 s here).
# Published UNet2DModels have 4-6 levels of 2-3 layers (google/ddpm-*).
MAX_UNET_LEVELS = 16
MAX_LAYERS_PER_BLOCK = 16
RETRAIN = "use a model.pt as `ddpm-deploy train` or `distill` wrote it (or train it again)"


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
    distilled: dict | None = None  # `ddpm-deploy distill` students: {"steps": K, "timesteps": [...]} they sample on
    source: str = ""
    sha256: str = ""  # of the file; for a diffusers folder, of its weights file (what manifests record as the source)
    folder_sha256: str = ""  # a diffusers folder's config, scheduler config and weights together (`identity_sha256`)

    @property
    def identity_sha256(self) -> str:
        """What decides this model's sampling, hashed: the file for a model.pt, all of a diffusers folder's files
        that are read (a changed scheduler config is another model to `distill --resume`)."""
        return self.folder_sha256 or self.sha256

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
                "prediction_type": self.prediction_type,
                **({"distilled": self.distilled} if self.distilled else {})}

    def build_unet(self):
        """A diffusers UNet2DModel with these weights, in eval mode; a config that does not describe the weights is
        a UserError before the module is built (check_unet_config)."""
        check_unet_config(self.unet, self.weights, self._config_name())
        unet = unet_from_config(self.unet)
        try:
            unet.load_state_dict(self.weights, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            detail = first[1].strip() if len(first) > 1 else first[0]
            raise UserError(f"checkpoint {self.source}: weights do not match its UNet config ({detail})") from None
        return unet.eval()

    def _config_name(self) -> str:
        """Where the UNet config came from, for messages: a diffusers folder's config.json, else the checkpoint."""
        folder = Path(self.source)
        for path in (folder / "unet" / "config.json", folder / "config.json"):
            if path.is_file():
                return str(path)
        return f"checkpoint {self.source}"


def check_unet_config(config: dict, weights: dict, where: str) -> None:
    """Refuse a UNet config that does not describe `weights`, without allocating it: its structure is capped, then
    the module is built on torch's meta device (shapes, no memory) and its state dict compared with the weights name
    by name and shape by shape. A config edited to block_out_channels [2**20, 2**21] (2.7 PiB of float32) asked
    for 16 TiB at its first layer before any weight was checked."""
    import torch

    levels, layers = config.get("block_out_channels"), config.get("layers_per_block", 2)
    if levels is not None and not (isinstance(levels, (list, tuple)) and 1 <= len(levels) <= MAX_UNET_LEVELS and
                                   all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in levels)):
        raise UserError(f"{where}: UNet config field block_out_channels = {str(levels)[:60]} must be a list of 1.."
                        f"{MAX_UNET_LEVELS} positive integers; this config does not belong to a UNet2DModel")
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= MAX_LAYERS_PER_BLOCK:
        raise UserError(f"{where}: UNet config field layers_per_block = {str(layers)[:60]} must be an integer in 1.."
                        f"{MAX_LAYERS_PER_BLOCK}; this config does not belong to a UNet2DModel")
    try:
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in unet_from_config(config).state_dict().items()}
    except Exception as e:  # diffusers' own checks (ValueError, TypeError, ...) on a malformed config
        raise UserError(f"{where}: UNet config cannot be built ({type(e).__name__}: {first_line(e, 120)})") from None
    have = {k: tuple(v.shape) for k, v in weights.items() if isinstance(v, torch.Tensor)}
    if shapes != have:
        n_config, n_weights = (sum(int(torch.Size(s).numel()) for s in d.values()) for d in (shapes, have))
        diff = next(f"{k}: {shapes.get(k)} in the config, {have.get(k)} in the weights"
                    for k in sorted(set(shapes) | set(have)) if shapes.get(k) != have.get(k))
        raise UserError(f"{where}: the UNet config describes {n_config:,} parameters ({n_config * 4 / 2 ** 30:.3g} GiB "
                        f"of float32), the weights hold {n_weights:,} (first difference {diff[:160]}); config and "
                        "weights are not of the same model")


def check_weights(weights, where: str, fix: str) -> dict:
    """`weights` when it is a state dict (parameter name -> tensor), else a UserError: a .bin or a model.pt's
    'weights' can hold any plain container (a list, a dict of numbers) that weights_only loading allows."""
    import torch

    if not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in weights.items()):
        kind = type(weights).__name__ if not isinstance(weights, dict) else "dict that is not name -> tensor"
        raise UserError(f"{where}: the weights are a {kind}, not a state dict of tensors; {fix}")
    return weights


def load_raw(path: Path) -> dict:
    """torch.load with weights_only=True; anything else in the file is refused, never executed."""
    import torch

    if not path.is_file():  # a FIFO would block the reader, a device never end
        raise UserError(f"{path} is not a regular file: pass a model.pt from `ddpm-deploy train` or a diffusers "
                        "folder")
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
    version = obj.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise UserError(f"{path}: checkpoint field format_version = {str(version)[:60]} must be an integer; "
                        f"{RETRAIN}")
    if version > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer ddpm-deploy (format {version}); upgrade")
    return obj


def save_atomic(obj: dict, path: str | os.PathLike) -> None:
    """torch.save to a temp file in the same folder, then rename: a crash never leaves a half-written file."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


