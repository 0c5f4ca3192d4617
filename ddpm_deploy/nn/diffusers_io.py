"""Read diffusers folders (DDPMPipeline.save_pretrained or a bare UNet2DModel.save_pretrained) as a Checkpoint.

Only safetensors or weights-only torch files are read; nothing is downloaded.
"""
# torch, diffusers and safetensors (the torch extra) are imported where used: importing ddpm_deploy.nn needs none.

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

from ..config import PREDICTION_TYPES, VARIANCE_TYPES
from ..errors import UserError
from ..files import file_sha256
from ..schedule import CUSTOM, DIFFUSERS_SCHEDULE_NAMES, Schedule, ScheduleError, check_betas
from .checkpoint import Checkpoint

SUPPORTED_UNETS = ("UNet2DModel",)
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# DDPM defaults (Ho et al.), used for a bare UNet folder unless flags say otherwise.
DDPM_DEFAULTS = {"beta_schedule": "linear", "num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                 "variance_type": "fixed_small", "clip_sample": True, "clip_sample_range": 1.0,
                 "prediction_type": "epsilon", "trained_betas": None}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def _unet_dir(folder: Path) -> tuple[Path, Path | None]:
    """(unet folder, scheduler config or None) for a pipeline folder or a bare UNet folder."""
    if (folder / "model_index.json").exists():
        index = _read_json(folder / "model_index.json")
        if "unet" not in index:
            raise UserError(f"{folder}: model_index.json names no 'unet'; only DDPM-style pipelines are supported")
        sched = folder / "scheduler" / "scheduler_config.json"
        return folder / "unet", sched if sched.exists() else None
    if (folder / "config.json").exists():
        return folder, None
    raise UserError(f"{folder} is not a diffusers model folder (no model_index.json or config.json): "
                    "save it with DDPMPipeline.save_pretrained or UNet2DModel.save_pretrained")


def _load_weights(unet_dir: Path) -> tuple[dict, Path]:
    for name in WEIGHT_FILES:
        path = unet_dir / name
        if path.exists():
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                try:
                    return load_file(str(path)), path
                except Exception as e:
                    raise UserError(f"cannot read weights {path}: {e}") from None
            import torch

            try:
                return torch.load(path, map_location="cpu", weights_only=True), path
            except pickle.UnpicklingError:
                raise UserError(f"{path} holds pickled objects; convert it to safetensors") from None
    raise UserError(f"{unet_dir}: no UNet weights ({' or '.join(WEIGHT_FILES)})")


def _schedule_settings(sched_cfg: dict | None, overrides: dict | None) -> dict:
    s = dict(DDPM_DEFAULTS)
    if sched_cfg:
        name = sched_cfg.get("beta_schedule", "linear")
        if sched_cfg.get("trained_betas") is not None:  # diffusers uses the table and ignores beta_schedule then
            s["beta_schedule"], s["trained_betas"] = CUSTOM, sched_cfg["trained_betas"]
            if isinstance(s["trained_betas"], list):  # T is the table's length unless the config says otherwise
                s["num_train_timesteps"] = len(s["trained_betas"])
        elif name not in DIFFUSERS_SCHEDULE_NAMES:
            raise UserError(f"scheduler beta_schedule {name!r} is not supported "
                            f"(supported: {', '.join(DIFFUSERS_SCHEDULE_NAMES)}, or trained_betas)")
        else:
            s["beta_schedule"] = DIFFUSERS_SCHEDULE_NAMES[name]
        for k in ("num_train_timesteps", "beta_start", "beta_end", "variance_type", "clip_sample", "clip_sample_range",
                  "prediction_type"):
            if sched_cfg.get(k) is not None:
                s[k] = sched_cfg[k]
    s.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if s["variance_type"] not in VARIANCE_TYPES:
        raise UserError(f"variance_type {s['variance_type']!r} is not supported ({', '.join(VARIANCE_TYPES)})")
    if s["prediction_type"] not in PREDICTION_TYPES:
        raise UserError(f"prediction_type {s['prediction_type']!r} is not supported ({', '.join(PREDICTION_TYPES)})")
    return s


def _schedule(s: dict) -> Schedule:
    """The named schedule, or the scheduler's trained_betas as a custom one (its length is the T)."""
    if s["beta_schedule"] == CUSTOM:
        betas = s["trained_betas"]
        if betas is None:
            raise ScheduleError("beta_schedule 'custom' needs the scheduler's trained_betas")
        return Schedule.from_betas(check_betas(betas, s["num_train_timesteps"]))
    return Schedule.build(s["beta_schedule"], s["num_train_timesteps"], s["beta_start"], s["beta_end"])


def folder_sha256(folder: Path, files: list[Path]) -> str:
    """sha256 of every file that decides what a diffusers folder computes (the UNet's config.json and weights, the
    scheduler config), each named by its path inside the folder: the folder's identity (Checkpoint.identity_sha256;
    the weights alone would not tell two schedules apart)."""
    h = hashlib.sha256(b"diffusers-folder\n")
    for path in files:
        h.update(f"{path.relative_to(folder).as_posix()}:{file_sha256(path)}\n".encode())
    return h.hexdigest()


def checkpoint_from_diffusers(folder: str | Path, schedule_overrides: dict | None = None):
    """A Checkpoint from a diffusers folder; `schedule_overrides` (e.g. from CLI flags) win over the folder."""

    folder = Path(folder)
    unet_dir, sched_path = _unet_dir(folder)
    cfg_path = unet_dir / "config.json"
    if not cfg_path.exists():
        raise UserError(f"{unet_dir} has no config.json")
    cfg = _read_json(cfg_path)
    cls = cfg.get("_class_name", "UNet2DModel")
    if cls not in SUPPORTED_UNETS:
        raise UserError(f"{unet_dir}: model class {cls} is not supported; ddpm-deploy exports {', '.join(SUPPORTED_UNETS)}")
    unet = {k: v for k, v in cfg.items() if not k.startswith("_")}
    weights, weights_path = _load_weights(unet_dir)
    s = _schedule_settings(_read_json(sched_path) if sched_path else None, schedule_overrides)
    try:
        schedule = _schedule(s)
    except ScheduleError as e:
        raise UserError(f"{folder}: {e}") from None
    return Checkpoint(unet=unet, schedule=schedule, weights=weights, variance_type=s["variance_type"],
                      clip_sample=bool(s["clip_sample"]), clip_sample_range=float(s["clip_sample_range"]),
                      prediction_type=s["prediction_type"], source=str(folder), sha256=file_sha256(weights_path),
                      folder_sha256=folder_sha256(folder, [cfg_path, weights_path, *filter(None, [sched_path])]))


def scheduler_config(ckpt: Checkpoint) -> dict:
    """DDPMScheduler keyword arguments that describe the checkpoint's schedule and sampling settings (a custom
    table as trained_betas), so a diffusers pipeline samples what ddpm-deploy samples."""
    s = ckpt.schedule
    cfg = {"num_train_timesteps": s.T, "variance_type": ckpt.variance_type, "clip_sample": bool(ckpt.clip_sample),
           "clip_sample_range": float(ckpt.clip_sample_range), "prediction_type": ckpt.prediction_type}
    names = {ours: theirs for theirs, ours in DIFFUSERS_SCHEDULE_NAMES.items()}
    if s.kind in names:
        cfg.update(beta_schedule=names[s.kind], beta_start=s.beta_start, beta_end=s.beta_end)
    else:  # geometric and custom tables: diffusers has no name for them, the table itself is exact
        cfg["trained_betas"] = [float(b) for b in s.betas]
    return cfg


def save_diffusers(ckpt: Checkpoint, folder: str | Path) -> Path:
    """Write the checkpoint as a diffusers DDPMPipeline folder (UNet weights as safetensors, the scheduler from
    `scheduler_config`); `checkpoint_from_diffusers` reads it back as the same model."""
    from diffusers import DDPMPipeline, DDPMScheduler

    folder = Path(folder)
    DDPMPipeline(unet=ckpt.build_unet(), scheduler=DDPMScheduler(**scheduler_config(ckpt))).save_pretrained(folder)
    return folder
