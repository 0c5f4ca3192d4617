"""The manifest every artifact carries: what the runtime needs to sample from it without the checkpoint.

ONNX files hold it as JSON in metadata_props[MANIFEST_KEY]; TensorRT engines in a sidecar `<engine>.json`.
In code it is a frozen `Manifest`; the JSON layout (format version 1) is what `to_dict` writes and `from_dict` reads.
"""
# onnx (1.1 s to import) is imported by the functions that read ONNX files: engines' sidecars need none.

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import UserError
from ..files import _all_tensors, _inside_folder
from .fields import (ENGINE_SUFFIXES, EPS_IO, MANIFEST_FORMAT, MANIFEST_VERSION, OPENVINO_SUFFIX, REBUILD, REEXPORT,
                     REEXPORT_INT8, eps_io, parse_json, read_fields)
from ..sampling.schedule import Schedule

MANIFEST_KEY = "ddpm_deploy.manifest"  # the ONNX metadata key: a file format name, not the module path
# What makes two artifacts the same model (verify/eval refuse to compare anything else).
MODEL_FIELDS = ("channels", "height", "width", "out_channels", "schedule", "variance_type", "clip_sample",
                "prediction_type")


@dataclass(frozen=True)
class Manifest:
    channels: int
    height: int
    width: int
    out_channels: int
    schedule: Schedule
    variance_type: str = "fixed_small"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    prediction_type: str = "epsilon"
    dtype: str = "float32"
    min_batch: int = 1
    max_batch: int = 1
    opt_batch: int | None = None          # engines: the optimisation point of the batch profile
    source: str = ""                      # the checkpoint it came from, and its hash
    source_sha256: str = ""
    opset: int = 0
    precision: dict | None = None         # fp16: which nodes were kept in fp32 and why
    graph: str = "eps"                    # "eps" (network alone) or "fused" (network + sampler step: engines)
    io: dict = dataclasses.field(default_factory=lambda: dict(EPS_IO))
    tensorrt: dict | None = None          # engines: TensorRT version, GPU, compute capability
    fused_interface: int | None = None    # fused graphs: fused_io.FUSED_INTERFACE_VERSION they were built to
    onnx_sha256: str | None = None
    engine_sha256: str | None = None
    toolkit_version: str = __version__
    distilled: dict | None = None         # distill students: {"steps": K, "timesteps": [...]}, their sampling grid

    # -- derived -------------------------------------------------------------------------------------------------

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.channels, self.height, self.width

    @property
    def learned_variance(self) -> bool:
        return self.out_channels == 2 * self.channels

    @property
    def sampling_options(self) -> dict:
        """Keyword arguments of `sampling.plan.make_plan` that come from the model."""
        return {"variance_type": self.variance_type, "clip_sample": self.clip_sample,
                "clip_sample_range": self.clip_sample_range, "prediction_type": self.prediction_type}

    def replace(self, **changes) -> "Manifest":
        return dataclasses.replace(self, **changes)

    def compatibility_problems(self, other: "Manifest") -> list[str]:
        """Differences that make two artifacts different models (used by verify/eval to refuse mismatches)."""
        problems = []
        for key in MODEL_FIELDS:
            a, b = getattr(self, key), getattr(other, key)
            if (a.to_dict() != b.to_dict()) if isinstance(a, Schedule) else a != b:
                problems.append(f"{key}: {_show(a)} vs {_show(b)}")
        return problems

    # -- construction ----------------------------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, ckpt, *, max_batch: int, dtype: str = "float32", min_batch: int = 1,
                        source: str | None = None, opset: int = 0, precision: dict | None = None) -> "Manifest":
        """The manifest of a network exported (or run on the reference) from a loaded checkpoint."""
        return cls(channels=ckpt.channels, height=ckpt.image_size, width=ckpt.image_size,
                   out_channels=int(ckpt.unet["out_channels"]), schedule=ckpt.schedule,
                   variance_type=ckpt.variance_type, clip_sample=bool(ckpt.clip_sample),
                   clip_sample_range=float(ckpt.clip_sample_range), prediction_type=ckpt.prediction_type,
                   dtype=dtype, min_batch=int(min_batch), max_batch=int(max_batch),
                   source=str(ckpt.source if source is None else source), source_sha256=ckpt.sha256,
                   opset=int(opset), precision=precision, distilled=getattr(ckpt, "distilled", None),
                   io=eps_io(ckpt.prediction_type))

    @classmethod
    def from_dict(cls, m: Any, where: str) -> "Manifest":
        """Check and parse a manifest read from `where`: every field is checked before it sizes anything, a bad one
        is a UserError naming the file and the field (`artifact.fields.read_fields`)."""
        return cls(**read_fields(m, where))

    @classmethod
    def from_json(cls, text: str, where: str) -> "Manifest":
        return cls.from_dict(parse_json(text, where), where)

    @classmethod
    def read(cls, path: str | Path) -> "Manifest":
        """The manifest of an ONNX file (metadata_props) or of an engine (its sidecar)."""
        if Path(path).suffix in ENGINE_SUFFIXES:
            return read_engine_manifest(path)
        if Path(path).suffix == OPENVINO_SUFFIX:
            return read_int8_manifest(path)
        return load_onnx(path)[1]

    # -- output ------------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        batch = {"min": self.min_batch, "max": self.max_batch}
        if self.opt_batch is not None:
            batch = {"min": self.min_batch, "opt": int(self.opt_batch), "max": self.max_batch}
        m = {
            "format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION, "toolkit_version": self.toolkit_version,
            "image": {"channels": self.channels, "height": self.height, "width": self.width},
            "out_channels": self.out_channels, "schedule": self.schedule.to_dict(),
            "prediction_type": self.prediction_type, "variance_type": self.variance_type,
            "clip_sample": self.clip_sample, "clip_sample_range": self.clip_sample_range,
            "dtype": self.dtype, "io_dtype": "float32", **self.io, "batch": batch,
            "source": {"name": self.source, "sha256": self.source_sha256}, "opset": self.opset,
        }
        optional = {"precision": self.precision, "tensorrt": self.tensorrt, "fused_interface": self.fused_interface,
                    "onnx_sha256": self.onnx_sha256, "engine_sha256": self.engine_sha256, "distilled": self.distilled}
        m.update({k: v for k, v in optional.items() if v is not None})
        if self.graph != "eps":
            m["graph"] = self.graph
        return m

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def kind_of(path: str | Path) -> str:
    """'onnx', 'tensorrt', 'openvino' (an int8 .xml of `export --int8`) or 'checkpoint' (a .pt, a diffusers folder
    or a shipped name)."""
    suffix = Path(path).suffix
    if suffix == ".onnx":
        return "onnx"
    if suffix == OPENVINO_SUFFIX:
        return "openvino"
    if suffix in ENGINE_SUFFIXES:
        return "tensorrt"
    return "checkpoint"


def _show(v) -> str:
    return str(v.to_dict()) if isinstance(v, Schedule) else str(v)


def sidecar_path(engine: str | Path) -> Path:
    return Path(str(engine) + ".json")


def read_engine_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"engine file {path} not found: build one with `ddpm-deploy build MODEL.onnx -o {path}`")
    side = sidecar_path(path)
    manifest = _read_sidecar(path, side, "rebuild it with `ddpm-deploy build MODEL.onnx`", "rebuild the engine")
    if manifest.engine_sha256 is None:  # without it any engine would run under this sidecar's shapes
        raise UserError(f"{side}: manifest field engine_sha256 is missing (it ties the sidecar to its engine); "
                        f"{REBUILD}")
    return manifest


def _read_sidecar(path: Path, side: Path, missing_fix: str, fix: str) -> Manifest:
    """The manifest in `side`, the sidecar of the model file `path`: one line when it is missing or unreadable."""
    if not side.is_file():
        raise UserError(f"{path} has no manifest sidecar {side.name}; {missing_fix}")
    try:
        text = side.read_text()
    except OSError as e:
        raise UserError(f"cannot read {side}: {e}; {fix}") from None
    return Manifest.from_dict(parse_json(text, str(side)), str(side))


def int8_sidecar_path(model: str | Path) -> Path:
    return Path(str(model) + ".json")


def read_int8_manifest(path: str | Path) -> Manifest:
    """The sidecar manifest of an OpenVINO int8 model (`export --int8`): present, valid, int8, and naming the
    sha256 of the .xml and .bin it describes (checked against them by the backend that reads them)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file {path} not found: export one with `ddpm-deploy export CHECKPOINT --int8 -o {path}`")
    side = int8_sidecar_path(path)
    manifest = _read_sidecar(path, side, REEXPORT_INT8, REEXPORT_INT8)
    if manifest.dtype != "int8" or manifest.graph != "fused":
        raise UserError(f"{side}: manifest dtype {manifest.dtype}, graph {manifest.graph}: an .xml model is the int8 "
                        f"fused step graph of `export --int8`; {REEXPORT_INT8}")
    if manifest.engine_sha256 is None:
        raise UserError(f"{side}: manifest field engine_sha256 is missing (it ties the sidecar to its model); "
                        f"{REEXPORT_INT8}")
    return manifest


def load_onnx(path: str | Path):
    """(ModelProto without external data, its Manifest): one parse for callers that need both (onnx, lazily)."""
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
        raise UserError(f"{path} has no ddpm-deploy manifest; {REEXPORT}")
    manifest = Manifest.from_json(meta[MANIFEST_KEY], str(path))
    check_external_data(model, path)
    return model, manifest


def check_external_data(model, path: Path) -> None:
    """Refuse weights kept in external files that are not regular files inside the model's folder (a location with
    `..`, an absolute path, a symlink), before any loader reads them: no loader's own check is relied on (onnx >= 1.21
    refuses all of these, 1.16-1.20 follow symlinks, onnxruntime and OpenVINO each have their own rules). The
    containment rule is model_sha256's (files._inside_folder); links are refused outright, as onnx >= 1.21 does."""
    import onnx

    for tensor in _all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if not location:
            raise UserError(f"{path}: tensor {tensor.name[:80]!r} is stored as external data but names no file; "
                            f"{REEXPORT}")
        if os.path.islink(path.parent / location):
            raise UserError(f"{path}: external data location {location[:100]!r} is a symbolic link, which may point "
                            "outside the model's folder; copy the file it names next to the model (or re-export)")
        _inside_folder(path, location)


def set_onnx_manifest(model, manifest: Manifest) -> None:
    """Store `manifest` in the ModelProto's metadata_props (replacing an older one)."""
    kept = [p for p in model.metadata_props if p.key != MANIFEST_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    entry = model.metadata_props.add()
    entry.key, entry.value = MANIFEST_KEY, manifest.to_json()
