"""Recognise an artifact and read its manifest (no torch)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from ..manifest import MANIFEST_KEY, validate

ENGINE_SUFFIXES = (".trt", ".engine", ".plan")


def kind_of(path: str) -> str:
    """'onnx', 'tensorrt' or 'checkpoint' (a .pt, a diffusers folder or a shipped name)."""
    p = Path(path)
    if p.suffix == ".onnx":
        return "onnx"
    if p.suffix in ENGINE_SUFFIXES:
        return "tensorrt"
    return "checkpoint"


def read_onnx_manifest(path: str | Path) -> dict:
    return load_onnx(path)[1]


def load_onnx(path: str | Path):
    """(ModelProto without external data, validated manifest): one parse for callers that need both."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise UserError(f"engine file {path} not found: export one with `ddpm-deploy export CHECKPOINT -o {path}`")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise UserError(f"{path} is not a readable ONNX file ({type(e).__name__}); re-export it") from None
    meta = {p.key: p.value for p in model.metadata_props}
    if MANIFEST_KEY not in meta:
        raise UserError(f"{path} has no ddpm-deploy manifest; re-export it with `ddpm-deploy export CHECKPOINT`")
    try:
        manifest = json.loads(meta[MANIFEST_KEY])
    except json.JSONDecodeError:
        raise UserError(f"{path}: manifest is not valid JSON; re-export it") from None
    return model, validate(manifest, str(path))


def sidecar_path(engine: str | Path) -> Path:
    return Path(str(engine) + ".json")


def read_engine_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"engine file {path} not found: build one with `ddpm-deploy build MODEL.onnx -o {path}`")
    side = sidecar_path(path)
    if not side.is_file():
        raise UserError(f"{path} has no manifest sidecar {side.name}; rebuild it with `ddpm-deploy build MODEL.onnx`")
    try:
        manifest = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {side}: {e}; rebuild the engine") from None
    return validate(manifest, str(side))
