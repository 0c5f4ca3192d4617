"""Reading a manifest's JSON fields: every field checked (type, range, consistency) before it sizes anything.

A manifest is read from a file anyone can edit (an ONNX file's metadata_props, an engine's sidecar): a bad field is
a UserError naming the file and the field, with the command that writes a good one. `read_fields` gives the
keyword arguments of `ddpm_deploy.artifact.manifest.Manifest`; the layout is what `Manifest.to_dict` writes.
"""

from __future__ import annotations

import json
from typing import Any

from ..config import PREDICTION_TYPES, VARIANCE_TYPES
from ..errors import UserError, first_line
from ..sampling.schedule import Schedule, ScheduleError

MANIFEST_FORMAT = "ddpm-deploy/manifest"
MANIFEST_VERSION = 1
ENGINE_SUFFIXES = (".trt", ".engine", ".plan")
OPENVINO_SUFFIX = ".xml"  # an OpenVINO model of `export --int8` (weights in .bin, manifest in .xml.json)
REQUIRED = ("image", "out_channels", "schedule", "prediction_type", "variance_type", "clip_sample", "dtype", "batch")
REEXPORT = "re-export it with `ddpm-deploy export CHECKPOINT`"
REBUILD = "rebuild the engine with `ddpm-deploy build MODEL.onnx`"
REEXPORT_INT8 = "re-export it with `ddpm-deploy export CHECKPOINT --int8`"

# Caps on what a manifest may ask for: it is read from a file anyone can edit, and its fields size tables, buffers
# and batches (batch.max 0 segfaulted OpenVINO; T = 1e10 asked numpy for 74.5 GiB). T's cap is
# schedule.MAX_TIMESTEPS.
MAX_CHANNELS = 4             # an image: grey, grey + alpha, RGB or RGBA (what a PNG holds)
MAX_IMAGE_SIDE = 4096        # pixel-space DDPMs stop at 256-512 (ADM); 4096 leaves room, not GiBs per image
MAX_BATCH = 4096             # images per engine call (the server's slots and every fused-step buffer)
# batch.max x C x H x W: one image-sized float32 tensor of a full batch stays within 1 GiB (the fused step holds
# about 14: x_t, z, eps, x_prev, and the 4-slot history in and out).
MAX_BATCH_ELEMENTS = 2 ** 28
DTYPES = ("float32", "float16", "int8")  # of the network's weights (int8: OpenVINO files of export --int8); IO float32
GRAPHS = ("eps", "fused")
# ONNX default-domain opsets: 0 = not recorded; onnxruntime runs opset 7 and later.
OPSETS = range(7, 100)
FLOAT32_MAX = 3.4028234663852886e38  # clip_sample_range is cast to float32
EPS_IO = {"inputs": {"x_t": "float32 (B, C, H, W)", "t": "float32 (B,) timestep index 0..T-1"},
          "outputs": {"eps": "float32 (B, out_channels, H, W)"}}
# What the network's output is, by prediction_type. Its tensor keeps the name "eps" whatever it holds: every runtime,
# fused graph and engine binds that name, and files already written carry it.
OUTPUT_MEANING = {"epsilon": "eps, the noise in x_t", "v_prediction": "v = alpha_t eps - sigma_t x_0 (not eps)",
                  "sample": "x_0, the clean image (not eps)"}


def eps_io(prediction_type: str) -> dict:
    """EPS_IO with the output described by what it holds (a v-prediction student's output is v, not eps)."""
    what = OUTPUT_MEANING.get(prediction_type, prediction_type)
    return {"inputs": dict(EPS_IO["inputs"]),
            "outputs": {"eps": f"{EPS_IO['outputs']['eps']} network output: {what} "
                               f"(prediction_type {prediction_type})"}}


def read_fields(m: Any, where: str) -> dict:
    """The Manifest fields of a manifest read from `where`, each checked; a bad one is a UserError naming the file
    and the field, and how to get a good one."""
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{where} has no ddpm-deploy manifest; {REEXPORT}")
    f = Fields(m, where)
    version = f.int("format_version", 0, None, default=0)
    if version > MANIFEST_VERSION:
        raise UserError(f"{where} has manifest format {version} from a newer ddpm-deploy; upgrade")
    missing = [k for k in REQUIRED if k not in m]
    if missing:
        raise UserError(f"{where}: manifest lacks {', '.join(missing)}; {f.fix}")
    sampling = sampling_fields(f, {"clip_sample_range": 1.0})
    schedule = f.schedule()
    shape = _image_fields(f, sampling["variance_type"], MANIFEST_SHAPE)
    batch = _batch_fields(f, shape)
    graph = _graph_fields(f)
    _int8_fields(f)
    return dict(**shape, **batch, **graph, **sampling, schedule=schedule, dtype=f.choice("dtype", DTYPES),
                opt_batch=f.int("batch.opt", batch["min_batch"], batch["max_batch"], default=None),
                source=f.text("source.name", default=""), source_sha256=f.sha256("source.sha256", default=""),
                precision=f.obj("precision", None), tensorrt=f.tensorrt(),
                onnx_sha256=f.sha256("onnx_sha256", default=None), engine_sha256=f.sha256("engine_sha256", default=None),
                toolkit_version=f.text("toolkit_version", default=""),
                distilled=checked_distilled(m.get("distilled"), schedule.T, where))


def sampling_fields(f: "Fields", defaults: dict) -> dict:
    """variance_type, prediction_type, clip_sample and clip_sample_range: what the sampler takes from a model, read
    alike from a manifest, a model.pt or a diffusers scheduler config (`defaults` for the absent ones)."""
    return {"variance_type": f.choice("variance_type", VARIANCE_TYPES, defaults.get("variance_type", _MISSING)),
            # a model sampled as another prediction type is silently wrong
            "prediction_type": f.choice("prediction_type", PREDICTION_TYPES,
                                        defaults.get("prediction_type", _MISSING)),
            "clip_sample": f.boolean("clip_sample", defaults.get("clip_sample", _MISSING)),
            "clip_sample_range": f.positive("clip_sample_range", FLOAT32_MAX,
                                            defaults.get("clip_sample_range", _MISSING))}


# Where the image shape lives: (channels, height, width, out_channels) field names. A UNet config has one
# sample_size for both sides (ddpm-deploy's images are square).
MANIFEST_SHAPE = ("image.channels", "image.height", "image.width", "out_channels")
UNET_SHAPE = ("in_channels", "sample_size", "sample_size", "out_channels")


def unet_shape_fields(f: "Fields", variance_type: str, prefix: str = "") -> dict:
    """in_channels, sample_size and out_channels of a UNet config (`prefix`: where it sits, "unet." in a model.pt),
    capped as a manifest's image fields are: a sample_size of 10**6 asked for terabytes of x_T."""
    return _image_fields(f, variance_type, tuple(prefix + name for name in UNET_SHAPE))


def _image_fields(f: "Fields", variance_type: str, names: tuple) -> dict:
    """channels, height, width (capped) and out_channels, which must fit them and the variance type."""
    c, h, w = (f.int(name, 1, cap) for name, cap in zip(names, (MAX_CHANNELS, MAX_IMAGE_SIDE, MAX_IMAGE_SIDE)))
    out_name = names[3]
    out_channels = f.int(out_name, 1, 2 * MAX_CHANNELS)
    if variance_type == "learned_range" and out_channels != 2 * c:
        f.bad(out_name, out_channels, f"must be {2 * c} (eps and the learned variance) with variance_type "
              f"learned_range and {c}-channel images")
    if out_channels not in (c, 2 * c):
        f.bad(out_name, out_channels, f"must be {c} (eps) or {2 * c} (eps and variance) for {c}-channel "
              "images")
    return {"channels": c, "height": h, "width": w, "out_channels": out_channels}


def _batch_fields(f: "Fields", shape: dict) -> dict:
    """The batch profile, its largest batch tensor within MAX_BATCH_ELEMENTS."""
    min_batch, max_batch = f.int("batch.min", 1, MAX_BATCH), f.int("batch.max", 1, MAX_BATCH)
    if min_batch > max_batch:
        f.bad("batch.min", min_batch, f"must be at most batch.max = {max_batch}")
    c, h, w = shape["channels"], shape["height"], shape["width"]
    if max_batch * c * h * w > MAX_BATCH_ELEMENTS:
        f.bad("batch.max", max_batch, f"gives {c}x{h}x{w} batch tensors of {max_batch * c * h * w} elements, over "
              f"the cap {MAX_BATCH_ELEMENTS} (1 GiB of float32)")
    return {"min_batch": min_batch, "max_batch": max_batch}


def _graph_fields(f: "Fields") -> dict:
    """What the graph is and its IO: names, graph kind, fused interface version, opset."""
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
    return {"io": io, "graph": graph, "fused_interface": fused_interface, "opset": opset}


def _int8_fields(f: "Fields") -> None:
    """An int8 file carries the eps level its export gate accepted (verify's per-step bound is made from it: a
    missing or absurd one would judge the file by nothing)."""
    if f.m.get("dtype") != "int8":
        return
    f.positive("precision.eps_bound", 10.0)
    f.positive("precision.x0_min_psnr_db", 1000.0)


def checked_distilled(d: Any, T: int, where: str) -> dict | None:
    """The {"steps", "timesteps"} record of a distilled student, checked (a wrong grid would sample silently
    wrong): steps = len(timesteps), strictly descending ints in [0, T-1]. None when absent."""
    if d is None:
        return None
    ts = d.get("timesteps") if isinstance(d, dict) else None
    sampler = d.get("sampler", "distilled") if isinstance(d, dict) else None
    ok = (isinstance(ts, list) and len(ts) > 0 and all(isinstance(t, int) and 0 <= t < T for t in ts)
          and all(a > b for a, b in zip(ts, ts[1:])) and d.get("steps") == len(ts)
          and sampler in ("distilled", "lcm"))
    if not ok:
        raise UserError(f"{where}: bad 'distilled' record {shown(d)} (needs steps = len(timesteps), descending "
                        f"timesteps in [0, {T - 1}], sampler distilled or lcm); distill or export it again")
    # a progressive student records no sampler (its manifests stay as they were); a consistency student's is "lcm"
    return {"steps": len(ts), "timesteps": list(ts), **({"sampler": sampler} if sampler != "distilled" else {})}


def parse_json(text: str | bytes, where: str, what: str = "manifest", fix: str | None = None):
    """json.loads, with every way a tampered text breaks the parser (deep nesting: RecursionError; a 5000-digit
    number: ValueError; bytes that are not UTF-8: UnicodeDecodeError, a ValueError) as one line."""
    fix = fix or (REBUILD if where.endswith(".json") else REEXPORT)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise UserError(f"{where}: {what} is not valid JSON ({type(e).__name__}); {fix}") from None


def shown(value, limit: int = 60) -> str:
    """repr(value) cut to `limit` characters, for one-line messages (a tampered field may hold megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


_MISSING = object()


class Fields:
    """Typed reads of one file's fields (a manifest's, a model.pt's, a diffusers config's: `what`): a bad one is a
    UserError naming the file and the field (dotted for nested ones: batch.max), with how to get a good one."""

    def __init__(self, m: dict, where: str, what: str = "manifest", fix: str | None = None):
        self.m, self.where, self.what = m, where, what
        self.fix = fix or (REBUILD if any(where.endswith(s + ".json") for s in ENGINE_SUFFIXES) else REEXPORT)
        if fix is None and where.endswith(OPENVINO_SUFFIX + ".json"):
            self.fix = REEXPORT_INT8

    def bad(self, name: str, value, want: str):
        raise UserError(f"{self.where}: {self.what} field {name} = {shown(value)} {want}; {self.fix}")

    def get(self, name: str, default=_MISSING):
        """The value at `name`, or `default` where it (or a parent) is absent or null; required if no default."""
        node, parts = self.m, name.split(".")
        for i, key in enumerate(parts):
            if not isinstance(node, dict):
                self.bad(".".join(parts[:i]), node, "must be a JSON object")
            if node.get(key) is None:
                if default is _MISSING:
                    raise UserError(f"{self.where}: {self.what} lacks field {name}; {self.fix}")
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

    def boolean(self, name: str, default=_MISSING) -> bool:
        v = self.get(name, default)
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
            raise UserError(f"{self.where}: {self.what} field schedule: {first_line(e)}; {self.fix}") from None
