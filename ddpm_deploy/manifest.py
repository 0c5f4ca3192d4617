"""The manifest every artifact carries: what the runtime needs to sample from it without the checkpoint.

ONNX files hold it as JSON in metadata_props[MANIFEST_KEY]; TensorRT engines in a sidecar `<engine>.json`.
"""

from __future__ import annotations

import json
from typing import Any

from . import __version__
from .config import VARIANCE_TYPES
from .errors import UserError
from .schedule import Schedule, ScheduleError

MANIFEST_KEY = "ddpm_deploy.manifest"
MANIFEST_FORMAT = "ddpm-deploy/manifest"
MANIFEST_VERSION = 1

REQUIRED = ("image", "out_channels", "schedule", "prediction_type", "variance_type", "clip_sample", "dtype", "batch")


def make_manifest(*, channels: int, image_size: int, out_channels: int, schedule: Schedule, variance_type: str,
                  clip_sample: bool, clip_sample_range: float, dtype: str, min_batch: int, max_batch: int,
                  source_sha256: str, source: str, opset: int, extra: dict | None = None) -> dict:
    m = {
        "format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION, "toolkit_version": __version__,
        "image": {"channels": int(channels), "height": int(image_size), "width": int(image_size)},
        "out_channels": int(out_channels),
        "schedule": schedule.to_dict(),
        "prediction_type": "epsilon", "variance_type": variance_type,
        "clip_sample": bool(clip_sample), "clip_sample_range": float(clip_sample_range),
        "dtype": dtype, "io_dtype": "float32",
        "inputs": {"x_t": "float32 (B, C, H, W)", "t": "float32 (B,) timestep index 0..T-1"},
        "outputs": {"eps": "float32 (B, out_channels, H, W)"},
        "batch": {"min": int(min_batch), "max": int(max_batch)},
        "source": {"name": source, "sha256": source_sha256},
        "opset": int(opset),
    }
    m.update(extra or {})
    return m


def validate(m: Any, where: str) -> dict:
    """Check a manifest read from `where`; a bad one is a UserError that says how to get a good one."""
    fix = "re-export it with `ddpm-deploy export CHECKPOINT`"
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{where} has no ddpm-deploy manifest; {fix}")
    if m.get("format_version", 0) > MANIFEST_VERSION:
        raise UserError(f"{where} has manifest format {m['format_version']} from a newer ddpm-deploy; upgrade")
    missing = [k for k in REQUIRED if k not in m]
    if missing:
        raise UserError(f"{where}: manifest lacks {', '.join(missing)}; {fix}")
    if m["variance_type"] not in VARIANCE_TYPES:
        raise UserError(f"{where}: unsupported variance_type {m['variance_type']!r}")
    try:
        Schedule.from_dict(m["schedule"])
    except ScheduleError as e:
        raise UserError(f"{where}: bad schedule in manifest ({e}); {fix}") from None
    return m


def schedule_of(m: dict) -> Schedule:
    return Schedule.from_dict(m["schedule"])


def image_shape(m: dict) -> tuple[int, int, int]:
    im = m["image"]
    return int(im["channels"]), int(im["height"]), int(im["width"])


def dumps(m: dict) -> str:
    return json.dumps(m, indent=2, sort_keys=True)


def compatibility_problems(a: dict, b: dict) -> list[str]:
    """Differences that make two artifacts different models (used by verify/eval to refuse mismatches)."""
    problems = []
    for key in ("image", "out_channels", "schedule", "variance_type", "clip_sample", "prediction_type"):
        if a.get(key) != b.get(key):
            problems.append(f"{key}: {a.get(key)} vs {b.get(key)}")
    return problems
