"""The manifest every artifact carries: what the runtime needs to sample from it without the checkpoint.

ONNX files hold it as JSON in metadata_props[MANIFEST_KEY]; TensorRT engines in a sidecar `<engine>.json`.
In code it is a frozen `Manifest`; the JSON layout (format version 1) is what `to_dict` writes and `from_dict` reads.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .config import PREDICTION_TYPES, VARIANCE_TYPES
from .errors import UserError, first_line
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
REBUILD = "rebuild the engine with `ddpm-deploy build MODEL.onnx`"

# Caps on what a manifest may ask for: it is read from a file anyone can edit, and its fields size tables, buffers
# and batches (batch.max 0 segfaulted OpenVINO; T = 1e10 asked numpy for 74.5 GiB). T's cap is
# schedule.MAX_TIMESTEPS.
MAX_CHANNELS = 4             # an image: grey, grey + alpha, RGB or RGBA (what a PNG holds)
MAX_IMAGE_SIDE = 4096        # pixel-space DDPMs stop at 256-512 (ADM); 4096 leaves room, not GiBs per image
MAX_BATCH = 4096             # images per engine call (the server's slots and every fused-step buffer)
# batch.max x C x H x W: one image-sized float32 tensor of a full batch stays within 1 GiB (the fused step holds
# about 14: x_t, z, eps, x_prev, and the 4-slot history in and out).
MAX_BATCH_ELEMENTS = 2 ** 28
DTYPES = ("float32", "float16")  # of the network's weights; its IO is float32 (io_dtype)
GRAPHS = ("eps", "fused")
# ONNX default-domain opsets: 0 = not recorded; onnxruntime runs opset 7 and later.
OPSETS = range(7, 100)
FLOAT32_MAX = 3.4028234663852886e38  # clip_sample_range is cast to float32
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
                   opset=int(opset), precision=precision, distilled=getattr(ckpt, "distilled", None))

    @classmethod
    def from_dict(cls, m: Any, where: str) -> "Manifest":
        """Check and parse a manifest read from `where`. Every field is checked (type, range, consistency) before it
        sizes anything; a bad one is a UserError naming the file and the field, and how to get a good one."""
        if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
            raise UserError(f"{where} has no ddpm-deploy manifest; {REEXPORT}")
        f = _Fields(m, where)
        version = f.int("format_version", 0, None, default=0)
        if version > MANIFEST_VERSION:
            raise UserError(f"{where} has manifest format {version} from a newer ddpm-deploy; upgrade")
        missing = [k for k in REQUIRED if k not in m]
        if missing:
            raise UserError(f"{where}: manifest lacks {', '.join(missing)}; {f.fix}")
        variance_type = f.choice("variance_type", VARIANCE_TYPES)
        prediction_type = f.choice("prediction_type", PREDICTION_TYPES)  # sampled as another type: silently wrong
        schedule = f.schedule()
        c, h, w = (f.int(f"image.{k}", 1, cap) for k, cap in
                   (("channels", MAX_CHANNELS), ("height", MAX_IMAGE_SIDE), ("width", MAX_IMAGE_SIDE)))
        out_channels = f.int("out_channels", 1, 2 * MAX_CHANNELS)
        if variance_type == "learned_range" and out_channels != 2 * c:
            f.bad("out_channels", out_channels, f"must be {2 * c} (eps and the learned variance) with variance_type "
                  f"learned_range and {c}-channel images")
        if out_channels not in (c, 2 * c):
            f.bad("out_channels", out_channels, f"must be {c} (eps) or {2 * c} (eps and variance) for {c}-channel "
                  "images")
        min_batch, max_batch = f.int("batch.min", 1, MAX_BATCH), f.int("batch.max", 1, MAX_BATCH)
        if min_batch > max_batch:
            f.bad("batch.min", min_batch, f"must be at most batch.max = {max_batch}")
        if max_batch * c * h * w > MAX_BATCH_ELEMENTS:
            f.bad("batch.max", max_batch, f"gives {c}x{h}x{w} batch tensors of {max_batch * c * h * w} elements, over "
                  f"the cap {MAX_BATCH_ELEMENTS} (1 GiB of float32)")
        io = {"inputs": f.strings("inputs", EPS_IO["inputs"]), "outputs": f.strings("outputs", EPS_IO["outputs"])}
        graph = f.choice("graph", GRAPHS, default="eps")
        fused_interface = f.int("fused_interface", 1, None, default=None)
        if fused_interface is not None and graph != "fused":
            f.bad("fused_interface", fused_interface, "belongs to fused graphs only (this manifest's graph is eps)")
        f.choice("io_dtype", ("float32",), default="float32")
        f.obj("source", {})
        opset = f.int("opset", 0, OPSETS.stop - 1, default=0)
        if opset and opset not in OPSETS:
            f.bad("opset", opset, f"must be 0 (not recorded) or an ONNX opset in {OPSETS.start}..{OPSETS.stop - 1}")
        return cls(channels=c, height=h, width=w, out_channels=out_channels, schedule=schedule,
                   variance_type=variance_type, clip_sample=f.boolean("clip_sample"),
                   clip_sample_range=f.positive("clip_sample_range", FLOAT32_MAX, default=1.0),
                   prediction_type=prediction_type, dtype=f.choice("dtype", DTYPES), min_batch=min_batch,
                   max_batch=max_batch, opt_batch=f.int("batch.opt", min_batch, max_batch, default=None),
                   source=f.text("source.name", default=""), source_sha256=f.sha256("source.sha256", default=""),
                   opset=opset, precision=f.obj("precision", None), graph=graph, io=io, tensorrt=f.tensorrt(),
                   fused_interface=fused_interface, onnx_sha256=f.sha256("onnx_sha256", default=None),
                   engine_sha256=f.sha256("engine_sha256", default=None),
                   toolkit_version=f.text("toolkit_version", default=""),
                   distilled=checked_distilled(m.get("distilled"), schedule.T, where))

    @classmethod
    def from_json(cls, text: str, where: str) -> "Manifest":
        return cls.from_dict(_parse_json(text, where), where)

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
        optional = {"precision": self.precision, "tensorrt": self.tensorrt, "fused_interface": self.fused_interface,
                    "onnx_sha256": self.onnx_sha256, "engine_sha256": self.engine_sha256, "distilled": self.distilled}
        m.update({k: v for k, v in optional.items() if v is not None})
        if self.graph != "eps":
            m["graph"] = self.graph
        return m

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def checked_distilled(d: Any, T: int, where: str) -> dict | None:
    """The {"steps", "timesteps"} record of a distilled student, checked (a wrong grid would sample silently
    wrong): steps = len(timesteps), strictly descending ints in [0, T-1]. None when absent."""
    if d is None:
        return None
    ts = d.get("timesteps") if isinstance(d, dict) else None
    ok = (isinstance(ts, list) and len(ts) > 0 and all(isinstance(t, int) and 0 <= t < T for t in ts)
          and all(a > b for a, b in zip(ts, ts[1:])) and d.get("steps") == len(ts))
    if not ok:
        raise UserError(f"{where}: bad 'distilled' record {d!r} (needs steps = len(timesteps), descending "
                        f"timesteps in [0, {T - 1}]); distill or export it again")
    return {"steps": len(ts), "timesteps": list(ts)}


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


def _parse_json(text: str, where: str):
    """json.loads, with every way a tampered text breaks the parser (deep nesting: RecursionError; a 5000-digit
    number: ValueError) as one line."""
    fix = REBUILD if where.endswith(".json") else REEXPORT
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise UserError(f"{where}: manifest is not valid JSON ({type(e).__name__}); {fix}") from None


_MISSING = object()


class _Fields:
    """Typed reads of one manifest's fields: a bad one is a UserError naming the file and the field (dotted for
    nested ones: batch.max), with the command that writes a good one."""

    def __init__(self, m: dict, where: str):
        self.m, self.where = m, where
        self.fix = REBUILD if any(where.endswith(s + ".json") for s in ENGINE_SUFFIXES) else REEXPORT

    def bad(self, name: str, value, want: str):
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise UserError(f"{self.where}: manifest field {name} = {shown} {want}; {self.fix}")

    def get(self, name: str, default=_MISSING):
        """The value at `name`, or `default` where it (or a parent) is absent or null; required if no default."""
        node, parts = self.m, name.split(".")
        for i, key in enumerate(parts):
            if not isinstance(node, dict):
                self.bad(".".join(parts[:i]), node, "must be a JSON object")
            if node.get(key) is None:
                if default is _MISSING:
                    raise UserError(f"{self.where}: manifest lacks field {name}; {self.fix}")
                return default
            node = node[key]
        return node

    def int(self, name: str, lo: int, hi: int | None, default=_MISSING):
        v = self.get(name, default)
        if v is default is not _MISSING:
            return v
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            self.bad(name, v, f"must be an integer in {lo}..{'' if hi is None else hi}")
        return v

    def positive(self, name: str, hi: float, default=_MISSING) -> float:
        v = self.get(name, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= hi:  # NaN fails too
            self.bad(name, v, f"must be a finite number in (0, {hi:.4g}]")
        return float(v)

    def choice(self, name: str, options: tuple, default=_MISSING):
        v = self.get(name, default)
        if not isinstance(v, str) or v not in options:
            self.bad(name, v, f"must be one of {', '.join(options)}")
        return v

    def boolean(self, name: str) -> bool:
        v = self.get(name)
        if not isinstance(v, bool):  # bool("false") is True
            self.bad(name, v, "must be true or false")
        return v

    def text(self, name: str, default=_MISSING) -> str:
        v = self.get(name, default)
        if not isinstance(v, str):
            self.bad(name, v, "must be a string")
        return v

    def sha256(self, name: str, default=_MISSING):
        v = self.get(name, default)
        if v is default is not _MISSING or v == "" == default:
            return v
        if not isinstance(v, str) or len(v) != 64 or any(ch not in "0123456789abcdef" for ch in v):
            self.bad(name, v, "must be a sha256 (64 lowercase hex digits)")
        return v

    def obj(self, name: str, default=_MISSING):
        v = self.get(name, default)
        if v is not default and not isinstance(v, dict):
            self.bad(name, v, "must be a JSON object")
        return v

    def strings(self, name: str, default: dict) -> dict:
        v = self.obj(name, default)
        if not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
            self.bad(name, v, "must map names to descriptions (strings)")
        return v

    def tensorrt(self) -> dict | None:
        """The engine's TensorRT section: what engine_compatibility_problem reads, typed."""
        trt = self.obj("tensorrt", None)
        if trt is not None:
            for key in ("version", "compute_capability", "gpu_name"):
                self.text(f"tensorrt.{key}", default="")
            for key in ("hardware_compatible", "tf32"):
                if not isinstance(trt.get(key, False), bool):
                    self.bad(f"tensorrt.{key}", trt[key], "must be true or false")
        return trt

    def schedule(self) -> Schedule:
        d = self.obj("schedule")
        try:
            return Schedule.from_dict(d)
        except (ScheduleError, TypeError, ValueError) as e:
            raise UserError(f"{self.where}: manifest field schedule: {first_line(e)}; {self.fix}") from None


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
    manifest = Manifest.from_dict(_parse_json(text, str(side)), str(side))
    if manifest.engine_sha256 is None:  # without it any engine would run under this sidecar's shapes
        raise UserError(f"{side}: manifest field engine_sha256 is missing (it ties the sidecar to its engine); "
                        f"{REBUILD}")
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

    from .files import _all_tensors, _inside_folder

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
