"""Read diffusers folders (DDPMPipeline.save_pretrained or a bare UNet2DModel.save_pretrained) as a Checkpoint.

Only safetensors or weights-only torch files are read; nothing is downloaded.
"""
# torch, diffusers and safetensors (the torch extra) are imported where used: importing ddpm_deploy.nn needs none.

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

from ..errors import UserError, first_line
from ..files import file_sha256, read_regular_file
from ..artifact.fields import Fields, parse_json, sampling_fields, shown, unet_shape_fields
from ..sampling.schedule import CUSTOM, DIFFUSERS_SCHEDULE_NAMES, Schedule, ScheduleError, check_betas
from .checkpoint import Checkpoint, check_weights

SUPPORTED_UNETS = ("UNet2DModel",)
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# DDPM defaults (Ho et al.), used for a bare UNet folder unless flags say otherwise.
DDPM_DEFAULTS = {"beta_schedule": "linear", "num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                 "variance_type": "fixed_small", "clip_sample": True, "clip_sample_range": 1.0,
                 "prediction_type": "epsilon", "trained_betas": None}
# A config file's size cap: a scheduler's trained_betas at T = 100 000 (schedule.MAX_TIMESTEPS) is ~2.5 MB of JSON.
MAX_CONFIG_BYTES = 16 << 20
RESAVE = "save the folder again with save_pretrained"


def _inside(folder: Path, path: Path) -> Path:
    """`path`, refused unless it resolves inside the model folder: a link to a file elsewhere (a key, /dev/zero) is
    refused as ONNX external data outside the model's folder is (manifest.check_external_data)."""
    root, target = folder.resolve(), path.resolve()
    if not target.is_relative_to(root):
        raise UserError(f"{path} leads through a symbolic link to {target}, outside the model folder {root}; "
                        "refusing to read it (copy the file into the folder)")
    return path


def _read_json(path: Path, folder: Path) -> dict:
    """A JSON object from a config file of the folder: a regular file inside it, of at most MAX_CONFIG_BYTES."""
    try:
        data = read_regular_file(_inside(folder, path), MAX_CONFIG_BYTES)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or first_line(e)}") from None
    d = parse_json(data, str(path), what="config", fix=RESAVE)
    if not isinstance(d, dict):
        raise UserError(f"{path}: config is a JSON {type(d).__name__}, not an object; {RESAVE}")
    return d


def _unet_dir(folder: Path) -> tuple[Path, Path | None]:
    """(unet folder, scheduler config or None) for a pipeline folder or a bare UNet folder."""
    if (folder / "model_index.json").exists():
        index = _read_json(folder / "model_index.json", folder)
        if "unet" not in index:
            raise UserError(f"{folder}: model_index.json names no 'unet'; only DDPM-style pipelines are supported")
        sched = folder / "scheduler" / "scheduler_config.json"
        return folder / "unet", sched if sched.exists() else None
    if (folder / "config.json").exists():
        return folder, None
    raise UserError(f"{folder} is not a diffusers model folder (no model_index.json or config.json): "
                    "save it with DDPMPipeline.save_pretrained or UNet2DModel.save_pretrained")


def _load_weights(unet_dir: Path, folder: Path) -> tuple[dict, Path]:
    """The UNet's weights (name -> tensor) and their file: a regular file inside the model folder."""
    for name in WEIGHT_FILES:
        path = unet_dir / name
        if path.exists():
            if not _inside(folder, path).is_file():  # a FIFO or a device would be read forever
                raise UserError(f"{path} is not a regular file; {RESAVE}")
            return check_weights(_read_weights(path), str(path), RESAVE), path
    raise UserError(f"{unet_dir}: no UNet weights ({' or '.join(WEIGHT_FILES)})")


def _read_weights(path: Path):
    """safetensors, or a torch file read weights_only (nothing unpickled); any damage is one line."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors' errors vary by version: one line either way
            raise UserError(f"cannot read weights {path} ({type(e).__name__}: {first_line(e, 120)}); "
                            f"{RESAVE}") from None
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path} holds pickled objects; convert it to safetensors") from None
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt archive: zip, pickle-opcode or tensor errors
        raise UserError(f"cannot read weights {path} ({type(e).__name__}: {first_line(e, 120)}); "
                        f"{RESAVE}") from None


def _schedule_settings(sched_cfg: dict | None, overrides: dict | None, where: str) -> dict:
    """DDPM_DEFAULTS, then the scheduler config's values, then `overrides`; the sampling fields checked as a
    manifest's are (sampling_fields), naming `where` (the scheduler config, or the folder of a bare UNet)."""
    s = dict(DDPM_DEFAULTS)
    if sched_cfg:
        name = sched_cfg.get("beta_schedule", "linear")
        if sched_cfg.get("trained_betas") is not None:  # diffusers uses the table and ignores beta_schedule then
            s["beta_schedule"], s["trained_betas"] = CUSTOM, sched_cfg["trained_betas"]
            if isinstance(s["trained_betas"], list):  # T is the table's length unless the config says otherwise
                s["num_train_timesteps"] = len(s["trained_betas"])
        elif not isinstance(name, str) or name not in DIFFUSERS_SCHEDULE_NAMES:
            raise UserError(f"{where}: scheduler beta_schedule {shown(name)} is not supported "
                            f"(supported: {', '.join(DIFFUSERS_SCHEDULE_NAMES)}, or trained_betas)")
        else:
            s["beta_schedule"] = DIFFUSERS_SCHEDULE_NAMES[name]
        for k in ("num_train_timesteps", "beta_start", "beta_end", "variance_type", "clip_sample", "clip_sample_range",
                  "prediction_type"):
            if sched_cfg.get(k) is not None:
                s[k] = sched_cfg[k]
    s.update({k: v for k, v in (overrides or {}).items() if v is not None})
    s.update(sampling_fields(Fields(s, where, what="scheduler config", fix=RESAVE), {}))
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
    cfg = _read_json(cfg_path, folder)
    cls = cfg.get("_class_name", "UNet2DModel")
    if cls not in SUPPORTED_UNETS:
        raise UserError(f"{cfg_path}: model class {shown(cls)} is not supported; ddpm-deploy exports "
                        f"{', '.join(SUPPORTED_UNETS)}")
    unet = {k: v for k, v in cfg.items() if not k.startswith("_")}
    s = _schedule_settings(_read_json(sched_path, folder) if sched_path else None, schedule_overrides,
                           str(sched_path or folder))
    # sample_size sizes every x_t (a config's 10**6 asked for terabytes): capped as a manifest's image fields are
    unet_shape_fields(Fields(cfg, str(cfg_path), what="UNet config", fix=RESAVE), s["variance_type"])
    weights, weights_path = _load_weights(unet_dir, folder)
    try:
        schedule = _schedule(s)
    except ScheduleError as e:
        field = "trained_betas" if s["beta_schedule"] == CUSTOM else "schedule"
        raise UserError(f"{sched_path or folder}: scheduler config field {field}: {first_line(e)}; {RESAVE}") from None
    return Checkpoint(unet=unet, schedule=schedule, weights=weights, variance_type=s["variance_type"],
                      clip_sample=s["clip_sample"], clip_sample_range=s["clip_sample_range"],
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
