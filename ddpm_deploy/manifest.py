"""The manifest every artifact carries: what the runtime needs to sample from it without the checkpoint.

ONNX files hold it as JSON in metadata_props[MANIFEST_KEY]; TensorRT engines in a sidecar `<engine>.json`.
In code it is a frozen `Manifest`; the JSON layout (format version 1) is what `to_dict` writes and `from_dict` reads.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .config import PREDICTION_TYPES, VARIANCE_TYPES
from .errors import UserError
from .schedule import Schedule, ScheduleError

MANIFEST_KEY = "ddpm_deploy.manifest"
MANIFEST_FORMAT = "ddpm-deploy/manifest"
MANIFEST_VERSION = 1
ENGINE_SUFFIXES = (".trt", ".engine", ".plan")

REQUIRED = ("image", "out_channels", "schedule", "prediction_type", "variance_type", "clip_sample", "dtype", "batch")
# What makes two artifacts the same model (verify/eval refuse to compare anything else).
MODEL_FIELDS = ("channels", "height", "width", "out_channels", "schedule", "variance_type", "clip_sample",
                "prediction_type")
REEXPORT = "re-export it with `ddpm-deploy export CHECKPOINT`"
EPS_IO = {"inputs": {"x_t": "float32 (B, C, H, W)", "t": "float32 (B,) timestep index 0..T-1"},
          "outputs": {"eps": "float32 (B, out_channels, H, W)"}}


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
    onnx_sha256: str | None = None
    engine_sha256: str | None = None
    toolkit_version: str = __version__

    # -- derived -------------------------------------------------------------------------------------------------

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.channels, self.height, self.width

    @property
    def learned_variance(self) -> bool:
        return self.out_channels == 2 * self.channels

    @property
    def sampling_options(self) -> dict:
        """Keyword arguments of `samplers.make_plan` that come from the model."""
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
                   opset=int(opset), precision=precision)

    @classmethod
    def from_dict(cls, m: Any, where: str) -> "Manifest":
        """Check and parse a manifest read from `where`; a bad one is a UserError that says how to get a good one."""
        if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
            raise UserError(f"{where} has no ddpm-deploy manifest; {REEXPORT}")
        if m.get("format_version", 0) > MANIFEST_VERSION:
            raise UserError(f"{where} has manifest format {m['format_version']} from a newer ddpm-deploy; upgrade")
        missing = [k for k in REQUIRED if k not in m]
        if missing:
            raise UserError(f"{where}: manifest lacks {', '.join(missing)}; {REEXPORT}")
        if m["variance_type"] not in VARIANCE_TYPES:
            raise UserError(f"{where}: unsupported variance_type {m['variance_type']!r}")
        if m["prediction_type"] not in PREDICTION_TYPES:  # sampled as another type it would be silently wrong
            raise UserError(f"{where}: unsupported prediction_type {m['prediction_type']!r} (supported: "
                            f"{', '.join(PREDICTION_TYPES)}); {REEXPORT}")
        try:
            schedule = Schedule.from_dict(m["schedule"])
            image, batch, source = m["image"], m["batch"], m.get("source") or {}
            return cls(channels=int(image["channels"]), height=int(image["height"]), width=int(image["width"]),
                       out_channels=int(m["out_channels"]), schedule=schedule, variance_type=m["variance_type"],
                       clip_sample=bool(m["clip_sample"]), clip_sample_range=float(m.get("clip_sample_range", 1.0)),
                       prediction_type=m["prediction_type"], dtype=m["dtype"], min_batch=int(batch["min"]),
                       max_batch=int(batch["max"]), opt_batch=batch.get("opt"), source=source.get("name", ""),
                       source_sha256=source.get("sha256", ""), opset=int(m.get("opset", 0)),
                       precision=m.get("precision"), graph=m.get("graph", "eps"),
                       io={"inputs": m.get("inputs", EPS_IO["inputs"]), "outputs": m.get("outputs", EPS_IO["outputs"])},
                       tensorrt=m.get("tensorrt"), onnx_sha256=m.get("onnx_sha256"),
                       engine_sha256=m.get("engine_sha256"), toolkit_version=m.get("toolkit_version", ""))
        except ScheduleError as e:
            raise UserError(f"{where}: bad schedule in manifest ({e}); {REEXPORT}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{where}: damaged manifest (bad field {e}); {REEXPORT}") from None

    @classmethod
    def from_json(cls, text: str, where: str) -> "Manifest":
        try:
            return cls.from_dict(json.loads(text), where)
        except json.JSONDecodeError:
            raise UserError(f"{where}: manifest is not valid JSON; re-export it") from None

    @classmethod
    def read(cls, path: str | Path) -> "Manifest":
        """The manifest of an ONNX file (metadata_props) or of an engine (its sidecar)."""
        if Path(path).suffix in ENGINE_SUFFIXES:
            return read_engine_manifest(path)
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
        optional = {"precision": self.precision, "tensorrt": self.tensorrt, "onnx_sha256": self.onnx_sha256,
                    "engine_sha256": self.engine_sha256}
        m.update({k: v for k, v in optional.items() if v is not None})
        if self.graph != "eps":
            m["graph"] = self.graph
        return m

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def kind_of(path: str | Path) -> str:
    """'onnx', 'tensorrt' or 'checkpoint' (a .pt, a diffusers folder or a shipped name)."""
    suffix = Path(path).suffix
    if suffix == ".onnx":
        return "onnx"
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
    if not side.is_file():
        raise UserError(f"{path} has no manifest sidecar {side.name}; rebuild it with `ddpm-deploy build MODEL.onnx`")
    try:
        text = side.read_text()
    except OSError as e:
        raise UserError(f"cannot read {side}: {e}; rebuild the engine") from None
    try:
        return Manifest.from_dict(json.loads(text), str(side))
    except json.JSONDecodeError as e:
        raise UserError(f"cannot read {side}: {e}; rebuild the engine") from None


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
    return model, Manifest.from_json(meta[MANIFEST_KEY], str(path))


def set_onnx_manifest(model, manifest: Manifest) -> None:
    """Store `manifest` in the ModelProto's metadata_props (replacing an older one)."""
    kept = [p for p in model.metadata_props if p.key != MANIFEST_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    entry = model.metadata_props.add()
    entry.key, entry.value = MANIFEST_KEY, manifest.to_json()
