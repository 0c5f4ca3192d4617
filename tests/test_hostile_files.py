"""Hostile or broken files (issue 21, items 5-8): whatever the toolkit reads from a file is checked before it sizes a
buffer, a table or a module, and a bad one is refused in one line that names the file and the field.

- manifests (ONNX metadata, engine sidecars): every field, cheaply (no table is built before T is checked);
- schedules: Schedule itself refuses degenerate betas, whoever builds it (manifest, checkpoint, trainer);
- UNet configs: the parameters a config describes are counted on torch's meta device and compared with the
  weights before the real module is built;
- TensorRT sidecars: engine_sha256 is required, and every binding's name, shape and dtype is compared with the
  engine's own before the first enqueue (on the emulated TensorRT of test_device_emulation);
- ONNX external data: a `location` that leaves the model's folder (.., absolute, symlink) is refused by every
  loader, whatever onnx/onnxruntime/OpenVINO version is installed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_one_line_error, cli
from ddpm_deploy.errors import UserError
from ddpm_deploy.artifact.manifest import MANIFEST_KEY, Manifest, sidecar_path
from ddpm_deploy.sampling.schedule import Schedule, ScheduleError
from test_device_emulation import FAKE_TRT_VERSION, emulated, engine  # noqa: F401 (fixtures)

WHERE = "hostile.onnx"


def good_manifest() -> dict:
    return Manifest(channels=1, height=8, width=8, out_channels=1, schedule=Schedule.build("linear", 50),
                    max_batch=4, opset=21).to_dict()


def tampered(field: str, value, m: dict | None = None) -> dict:
    """A good manifest with `field` ("batch.max") set to `value`."""
    m = good_manifest() if m is None else m
    *parents, last = field.split(".")
    node = m
    for key in parents:
        node = node[key]
    node[last] = value
    return m


def refused(text: str, where: str = WHERE) -> str:
    with pytest.raises(UserError) as e:
        Manifest.from_json(text, where)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{where}: "), msg
    return msg


# (field, value, the field the refusal names): the review's attacks (issue 21 item 5) and their neighbours
HOSTILE = [
    ("batch.max", 0, "batch.max"),                 # segfaulted OpenVINO (exit 139), hung the server
    ("batch.max", -4, "batch.max"),
    ("batch.max", 10 ** 9, "batch.max"),
    ("batch.max", 4096, "batch.max"),              # within MAX_BATCH, but 4096 x 1 x 8 x 8 is fine: see below
    ("batch.max", "4", "batch.max"),
    ("batch.max", 4.5, "batch.max"),
    ("batch.max", True, "batch.max"),
    ("batch.min", 0, "batch.min"),
    ("batch.min", 8, "batch.min"),                 # min > max
    ("batch.opt", 9, "batch.opt"),
    ("batch.opt", 0, "batch.opt"),
    ("batch", [1, 4], "batch"),
    ("schedule.num_train_timesteps", 10 ** 10, "schedule"),   # _ArrayMemoryError (74.5 GiB)
    ("schedule.num_train_timesteps", 1000.5, "schedule"),
    ("schedule.num_train_timesteps", "1000", "schedule"),
    ("schedule", {"beta_schedule": "linear", "num_train_timesteps": 1000, "beta_start": 1e-4,
                  "beta_end": 0.9999999999}, "schedule"),     # a-bar underflows: ZeroDivisionError in make_plan
    ("schedule.beta_start", float("nan"), "schedule"),
    ("schedule.beta_start", 1e-20, "schedule"),               # alphas_cumprod[0] == 1: 1 - a-bar = 0
    ("schedule.beta_schedule", "quadratic", "schedule"),
    ("schedule", "linear", "schedule"),
    ("clip_sample_range", -1.0, "clip_sample_range"),        # silently drew all-black images
    ("clip_sample_range", 0.0, "clip_sample_range"),
    ("clip_sample_range", float("inf"), "clip_sample_range"),
    ("clip_sample_range", float("nan"), "clip_sample_range"),
    ("clip_sample_range", "1", "clip_sample_range"),
    ("clip_sample", "false", "clip_sample"),                 # bool("false") is True
    ("clip_sample", 0, "clip_sample"),
    ("image.channels", 0, "image.channels"),
    ("image.channels", 1.0, "image.channels"),
    ("image.height", -8, "image.height"),
    ("image.width", 10 ** 6, "image.width"),
    ("image", [1, 8, 8], "image"),
    ("out_channels", 3, "out_channels"),
    ("out_channels", 0, "out_channels"),
    ("variance_type", "learned_range", "out_channels"),      # learned variance needs 2C outputs
    ("variance_type", "fixed_tiny", "variance_type"),
    ("dtype", "float64", "dtype"),
    ("prediction_type", "x", "prediction_type"),
    ("graph", "fused2", "graph"),
    ("opset", -1, "opset"),
    ("opset", "21", "opset"),
    ("format_version", "9", "format_version"),
    ("onnx_sha256", "zz", "onnx_sha256"),
    ("engine_sha256", 5, "engine_sha256"),
    ("tensorrt", "10.13", "tensorrt"),
    ("inputs", [1], "inputs"),
    ("io_dtype", "float16", "io_dtype"),
    ("source", "ckpt.pt", "source"),
    ("source.sha256", 7, "source.sha256"),
    ("toolkit_version", 3, "toolkit_version"),
    ("precision", "fp16", "precision"),
]


@pytest.mark.parametrize("field,value,named", HOSTILE, ids=[f"{f}={v!r}"[:40] for f, v, _ in HOSTILE])
def test_every_manifest_field_is_checked(field, value, named):
    m = tampered(field, value)
    if (field, value) == ("batch.max", 4096):  # a legal batch: but not 4096 images of 3 x 1024 x 1024
        m = tampered("image", {"channels": 3, "height": 1024, "width": 1024}, tampered("out_channels", 3, m))
    msg = refused(json.dumps(m))
    assert f"manifest field {named}" in msg and "re-export it with `ddpm-deploy export CHECKPOINT`" in msg, msg


def test_good_manifests_still_read():
    """The checks refuse what is wrong, not what is unusual: learned variance, fp16, an engine's profile, 2C
    outputs with a fixed variance (the variance channels are ignored), a cosine schedule at the cap."""
    from ddpm_deploy.sampling.schedule import MAX_TIMESTEPS

    for field, value in (("variance_type", "learned_range"), ("variance_type", "fixed_small"),
                         ("dtype", "float16"), ("batch.opt", 2), ("opset", 0)):
        m = tampered(field, value)
        if field == "variance_type":
            m["out_channels"] = 2
        Manifest.from_json(json.dumps(m), WHERE)
    m = tampered("schedule", Schedule.build("cosine", MAX_TIMESTEPS).to_dict())
    assert Manifest.from_json(json.dumps(m), WHERE).schedule.T == MAX_TIMESTEPS


@pytest.mark.parametrize("schedule", [{"beta_schedule": "linear", "num_train_timesteps": 10 ** 10},
                                      {"beta_schedule": "cosine", "num_train_timesteps": 10 ** 7}])
def test_huge_T_is_refused_before_any_table_is_built(schedule):
    """T = 1e10 allocated 74.5 GiB and cosine T = 1e7 took 12 s and 550 MB: the cap is checked first."""
    m = tampered("schedule", {**good_manifest()["schedule"], **schedule})
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        msg = refused(json.dumps(m))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 1.0 and peak < (8 << 20), (time.perf_counter() - t0, peak)
    assert "num_train_timesteps" in msg and "100000" in msg, msg


def test_schedule_build_refuses_degenerate_betas():
    """Schedule itself refuses what divides by zero later (a beta near 1 underflows a-bar to 0: make_plan raised
    ZeroDivisionError) so the trainer and every other caller are protected, not only the manifest reader."""
    from ddpm_deploy.sampling.plan import make_plan

    for args, words in ((("linear", 1000, 1e-4, 0.9999999999), "alphas_cumprod falls"),
                        (("linear", 1000, 1e-20, 0.02), "decrease strictly"),
                        (("linear", 10 ** 10), "num_train_timesteps"),
                        (("cosine", 1000.0), "integer")):
        with pytest.raises(ScheduleError, match=words):
            Schedule.build(*args)
    with pytest.raises(ScheduleError, match="beta"):
        Schedule(kind="linear", num_train_timesteps=3, beta_start=0.1, beta_end=1.5,
                 betas=np.array([0.1, 0.5, 1.5]))
    make_plan(Schedule.build("linear", 1000, 1e-4, 0.05), "ddpm")  # strong but sound: still builds


@pytest.mark.parametrize("text,words", [("[" * 100_000 + "]" * 100_000, "JSON"),
                                        ('{"format": "ddpm-deploy/manifest", "format_version": ' + "9" * 5000 + "}",
                                         "JSON"),
                                        ("{" + '"a": 1, ' * 10 + "}", "JSON")])
def test_manifest_json_that_breaks_the_parser(text, words):
    """Deep nesting (RecursionError) and a 5000-digit number (ValueError) are refused like any invalid JSON."""
    assert words in refused(text)


def _onnx_with_manifest(src: str, dst: Path, m: dict) -> str:
    import onnx

    model = onnx.load(src)
    for p in model.metadata_props:
        if p.key == MANIFEST_KEY:
            p.value = json.dumps(m)
    onnx.save(model, str(dst))
    return str(dst)


@pytest.mark.parametrize("field,value,backend", [("batch.max", 0, "openvino"), ("batch.max", -1, "onnxruntime"),
                                                 ("clip_sample_range", -1.0, "onnxruntime")])
def test_tampered_onnx_manifest_is_one_line_on_the_cli(tiny_onnx, tmp_path, field, value, backend):
    """`run` on the tampered file: exit 2 with one line naming the field (OpenVINO segfaulted on batch.max 0;
    clip_sample_range -1 wrote an all-black grid)."""
    m = tampered(field, value, Manifest.read(tiny_onnx).to_dict())
    path = _onnx_with_manifest(tiny_onnx, tmp_path / "t.onnx", m)
    r = cli("run", "--engine", path, "-n", "2", "--sampler", "ddim", "--steps", "2", "--backend", backend,
            "-o", tmp_path / "s.png", "--quiet", cwd=tmp_path)
    assert_one_line_error(r, "t.onnx", f"manifest field {field}")
    assert not (tmp_path / "s.png").exists()


# ---------------------------------------------------------------------------------------------- UNet configs (item 6)

@pytest.fixture()
def unet_folder(tmp_path) -> Path:
    """A bare diffusers UNet folder: the tiny preset, random weights, safetensors."""
    import torch

    from ddpm_deploy.config import unet_config
    from ddpm_deploy.nn.unet import unet_from_config

    torch.manual_seed(0)
    folder = tmp_path / "unet"
    unet_from_config(unet_config("tiny", sample_size=8, channels=1)).save_pretrained(folder)
    return folder


HOSTILE_CONFIGS = [
    ({"block_out_channels": [2 ** 20, 2 ** 21]}, "parameters"),  # 640 GB+ before any weight was checked
    ({"layers_per_block": 10 ** 6}, "layers_per_block"),          # a million blocks: minutes even on meta
    ({"block_out_channels": [16, 32]}, "parameters"),             # plausible, but not these weights
    ({"norm_num_groups": 3}, "config"),                            # cannot be built at all
    ({"down_block_types": ["Evil2D", "AttnDownBlock2D"]}, "config"),
    ({"block_out_channels": "8,16"}, "config"),
]


@pytest.mark.parametrize("change,words", HOSTILE_CONFIGS, ids=[next(iter(c)) + str(i) for i, (c, _) in
                                                                 enumerate(HOSTILE_CONFIGS)])
def test_unet_config_is_checked_against_the_weights_before_building(unet_folder, change, words):
    from ddpm_deploy.nn.load import load_checkpoint

    cfg_path = unet_folder / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **change}))
    t0 = time.perf_counter()
    with pytest.raises(UserError) as e:
        load_checkpoint(unet_folder).build_unet()
    msg = str(e.value)
    assert "\n" not in msg and str(unet_folder) in msg and words in msg, msg
    assert time.perf_counter() - t0 < 30, time.perf_counter() - t0


def test_tampered_checkpoint_unet_config(tiny_ckpt, tmp_path):
    """The same check for a ddpm-deploy model.pt whose unet config was edited (read with weights_only)."""
    import torch

    from ddpm_deploy.nn.load import load_checkpoint

    obj = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    obj["unet"]["block_out_channels"] = [2 ** 20, 2 ** 21]
    torch.save(obj, tmp_path / "model.pt")
    with pytest.raises(UserError, match="parameters"):
        load_checkpoint(tmp_path / "model.pt").build_unet()


def test_absurd_unet_config_is_one_line_on_the_cli(unet_folder, tmp_path):
    cfg_path = unet_folder / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "block_out_channels": [2 ** 20, 2 ** 21]}))
    r = cli("export", unet_folder, "-o", tmp_path / "x.onnx", "--quiet", cwd=tmp_path)
    assert_one_line_error(r, "config.json", "parameters")
    assert not (tmp_path / "x.onnx").exists()


# ---------------------------------------------------------------------------------------------- TensorRT sidecars (7)

def _engine_copy(engine: str, tmp_path: Path, **changes) -> str:
    """The emulated engine with its sidecar changed (the engine bytes, and so its hash, unchanged)."""
    path = tmp_path / "e.trt"
    shutil.copy(engine, path)
    side = json.loads(sidecar_path(engine).read_text())
    for field, value in changes.items():
        tampered(field, value, side)
        if value is None:
            *parents, last = field.split(".")
            node = side
            for k in parents:
                node = node[k]
            del node[last]
    sidecar_path(path).write_text(json.dumps(side))
    return str(path)


def test_sidecar_without_engine_hash_is_refused(emulated, engine, tmp_path):
    """An absent engine_sha256 skipped the hash check: any engine ran under any sidecar."""
    from ddpm_deploy.runtime import load

    emulated()
    path = _engine_copy(engine, tmp_path, engine_sha256=None)
    with pytest.raises(UserError) as e:
        load(path).close()
    msg = str(e.value)
    assert "engine_sha256" in msg and "ddpm-deploy build" in msg and "\n" not in msg, msg


@pytest.mark.parametrize("changes,binding", [
    ({"image.height": 16, "image.width": 16}, "x_t"),                                  # buffers 4x too large
    ({"out_channels": 2, "variance_type": "learned_range"}, "eps"),                     # reads garbage variance
    ({"batch.max": 8, "batch.opt": 8}, "x_t"),                                          # profile is 1..4
    ({"batch.min": 2}, "x_t"),
])
def test_sidecar_shapes_are_compared_with_the_engine(emulated, engine, tmp_path, changes, binding):
    """Output buffers were sized from the sidecar and never compared with the engine's own IO: each mismatch is
    refused when the engine is opened, naming the binding."""
    from ddpm_deploy.runtime import load

    rt = emulated()
    path = _engine_copy(engine, tmp_path, **changes)
    with pytest.raises(UserError) as e:
        load(path).close()
    msg = str(e.value)
    assert binding in msg and "ddpm-deploy build" in msg and "\n" not in msg, msg
    contexts = rt.engine._contexts if rt.engine is not None else []
    assert all(c._enqueues == 0 for c in contexts)  # refused before the first enqueue
    assert rt.live == {}


def test_engine_binding_dtype_is_compared(emulated, engine, monkeypatch):
    from ddpm_deploy.runtime import load

    rt = emulated()
    trt = __import__("sys").modules["tensorrt"]
    real = trt.Runtime.deserialize_cuda_engine

    def half_eps(self, data):
        e = real(self, data)
        e.get_tensor_dtype = lambda name: trt.DataType.HALF if name == "eps" else trt.DataType.FLOAT
        return e

    monkeypatch.setattr(trt.Runtime, "deserialize_cuda_engine", half_eps)
    with pytest.raises(UserError, match="eps"):
        load(engine).close()
    assert rt.live == {}


def test_matching_sidecar_still_loads(emulated, engine):
    from ddpm_deploy.runtime import load

    emulated()
    with load(engine) as gpu:
        assert gpu.sample(1, seed=0, sampler="ddim", steps=2, output="float").shape == (1, 1, 8, 8)


# ---------------------------------------------------------------------------------------------- ONNX external data (8)

def _secret(tmp_path: Path) -> Path:
    """A file outside the model's folder that holds valid-looking weights (what an attacker would point at)."""
    return tmp_path / "secret" / "w.bin"


def _hostile_external(tiny_onnx: str, tmp_path: Path, kind: str) -> str:
    """tiny.onnx with its weights in an external file, and `location` rewritten to reach outside its folder."""
    import onnx

    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    path = folder / "m.onnx"
    onnx.save(onnx.load(tiny_onnx), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="w.bin", size_threshold=0)
    secret = _secret(tmp_path)
    secret.parent.mkdir()
    shutil.move(folder / "w.bin", secret)
    location = {"dotdot": "../secret/w.bin", "nested": "sub/../../secret/w.bin", "absolute": str(secret),
                "passwd": "../../../../../../../../etc/passwd", "symlink": "w.bin"}[kind]
    if kind == "symlink":
        os.symlink(secret, folder / "w.bin")
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, str(path))
    return str(path)


KINDS = ["dotdot", "nested", "absolute", "passwd", "symlink"]


@pytest.mark.parametrize("kind", KINDS)
def test_external_data_outside_the_model_folder_is_refused(tiny_onnx, tmp_path, kind):
    """Every reader of an ONNX in the toolkit (the manifest reader, the model-content hash of generate's job keys and
    auto's cache, the fused-graph builder both CPU backends use, OpenVINO's own reader) refuses a location that
    leaves the model's folder, in one line."""
    from ddpm_deploy.files import model_sha256
    from ddpm_deploy.artifact.manifest import load_onnx
    from ddpm_deploy.runtime import load

    path = _hostile_external(tiny_onnx, tmp_path, kind)
    for read in (load_onnx, Manifest.read, model_sha256, lambda p: load(p, backend="onnxruntime", threads=1),
                 lambda p: load(p, backend="openvino", threads=1)):
        with pytest.raises(UserError) as e:
            read(path)
        msg = str(e.value)
        assert "\n" not in msg and "m.onnx" in msg and "external data" in msg and "outside" in msg, msg


def test_external_data_outside_is_one_line_on_the_cli(tiny_onnx, tmp_path):
    path = _hostile_external(tiny_onnx, tmp_path, "nested")
    r = cli("run", "--engine", path, "-n", "1", "--sampler", "ddim", "--steps", "2", "-o", tmp_path / "s.png",
            "--quiet", cwd=tmp_path)
    assert_one_line_error(r, "m.onnx", "external data")


def test_external_data_inside_the_folder_still_loads(tiny_onnx, tmp_path):
    import onnx

    from ddpm_deploy.runtime import load

    path = tmp_path / "ok" / "m.onnx"
    (path.parent / "weights").mkdir(parents=True)  # a subfolder of the model's folder is inside it
    onnx.save(onnx.load(tiny_onnx), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights/w.bin", size_threshold=0)
    with load(str(path), backend="onnxruntime", threads=1) as p:
        assert p.sample(1, seed=0, sampler="ddim", steps=2, output="float").shape == (1, 1, 8, 8)


def test_onnx_floor_refuses_every_hostile_location():
    """The floor in pyproject is the first onnx release whose loader refuses all of KINDS (checked against the
    releases' sources and wheels): 1.13-1.15 read `sub/../../x` (CVE-2024-27318, fixed in
    1.16.0), 1.16.0-1.20.1 follow a symlink out of the folder (CVE-2026-27489, fixed in 1.21.0)."""
    import re

    floor = re.search(r'"onnx>=([\d.]+)"', (Path(__file__).parents[1] / "pyproject.toml").read_text()).group(1)
    assert tuple(map(int, floor.split("."))) >= (1, 21, 0), floor


# ------------------------------------------------------------ model.pt and diffusers fields (one reader of fields)

def _tampered_pt(tiny_ckpt: str, tmp_path: Path, field: str, value) -> Path:
    """tiny_ckpt with `field` ("unet.sample_size") set to `value` (a plain dict: read back with weights_only)."""
    import torch

    obj = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    tampered(field, value, obj)
    path = tmp_path / "model.pt"
    torch.save(obj, path)
    return path


# (field, value, the field the refusal names): a checkpoint's fields are checked as a manifest's are
HOSTILE_PT = [
    ("clip_sample_range", -1.0, "clip_sample_range"),        # exit 0, every pixel -1
    ("clip_sample_range", "1", "clip_sample_range"),
    ("clip_sample_range", float("nan"), "clip_sample_range"),
    ("clip_sample", "false", "clip_sample"),                   # bool("false") is True
    ("variance_type", ["fixed_small"], "variance_type"),
    ("prediction_type", "noise", "prediction_type"),
    ("unet.sample_size", 10 ** 6, "unet.sample_size"),        # 4 TB of x_T for one 1-channel image
    ("unet.sample_size", [8, 8], "unet.sample_size"),
    ("unet.in_channels", 0, "unet.in_channels"),
    ("unet.out_channels", 3, "unet.out_channels"),            # neither C (eps) nor 2C (eps and variance)
    ("unet", [1, 2], "unet"),
    ("schedule", "linear", "schedule"),
    ("format_version", "1", "format_version"),
    ("weights", [1, 2], "weights"),
    ("weights", {"conv_in.weight": 1.0}, "weights"),
]


@pytest.mark.parametrize("field,value,named", HOSTILE_PT, ids=[f"{f}={v!r}"[:40] for f, v, _ in HOSTILE_PT])
def test_every_checkpoint_field_is_checked(tiny_ckpt, tmp_path, field, value, named):
    from ddpm_deploy.nn.load import load_checkpoint

    path = _tampered_pt(tiny_ckpt, tmp_path, field, value)
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: ") and named in msg, msg


def test_checkpoint_clip_range_is_refused_by_run_and_export(tiny_ckpt, tmp_path):
    """clip_sample_range -1 in a model.pt: `run --checkpoint` exited 0 with every pixel -1 and `export` wrote a file
    `info` then refused. Both refuse it now, naming the file and the field, and write nothing."""
    path = _tampered_pt(tiny_ckpt, tmp_path, "clip_sample_range", -1.0)
    r = cli("run", "--checkpoint", path, "-n", "1", "--sampler", "ddim", "--steps", "2", "-o", tmp_path / "s.png",
            "--quiet", cwd=tmp_path)
    assert_one_line_error(r, "model.pt", "clip_sample_range")
    r = cli("export", path, "-o", tmp_path / "x.onnx", "--quiet", cwd=tmp_path)
    assert_one_line_error(r, "model.pt", "clip_sample_range")
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "x.onnx").exists()


@pytest.fixture()
def pipeline_folder(unet_folder) -> Path:
    """A DDPMPipeline-style folder (model_index.json, unet/, scheduler/) around the tiny UNet, T = 50."""
    root = unet_folder.parent / "pipe"
    shutil.move(unet_folder, root / "unet")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline",
                                                       "unet": ["diffusers", "UNet2DModel"],
                                                       "scheduler": ["diffusers", "DDPMScheduler"]}))
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDPMScheduler", "num_train_timesteps": 50, "beta_schedule": "linear", "beta_start": 1e-4,
         "beta_end": 0.02, "variance_type": "fixed_small", "clip_sample": True, "clip_sample_range": 1.0,
         "prediction_type": "epsilon"}))
    return root


HOSTILE_SCHEDULER = [
    ("clip_sample_range", -1.0), ("clip_sample_range", "1"), ("clip_sample", "false"), ("clip_sample", 0),
    ("variance_type", "fixed_huge"), ("prediction_type", 7), ("beta_schedule", ["linear"]),
    ("num_train_timesteps", "50"), ("trained_betas", "0.1,0.2"),
]


@pytest.mark.parametrize("field,value", HOSTILE_SCHEDULER, ids=[f"{f}={v!r}" for f, v in HOSTILE_SCHEDULER])
def test_every_scheduler_config_field_is_checked(pipeline_folder, field, value):
    from ddpm_deploy.nn.load import load_checkpoint

    assert load_checkpoint(pipeline_folder).clip_sample is True  # the untampered folder loads
    path = pipeline_folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    with pytest.raises(UserError) as e:
        load_checkpoint(pipeline_folder)
    msg = str(e.value)
    assert "\n" not in msg and str(pipeline_folder) in msg and field in msg, msg


HOSTILE_JSON = [
    (b"[1, 2]", "JSON list"), (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    (b'{"sample_size": ' + b"9" * 5000 + b"}", "not valid JSON"), (b'{"sample_size": "\xff\xfe"}', "not valid JSON"),
]


@pytest.mark.parametrize("which", ["unet/config.json", "scheduler/scheduler_config.json", "model_index.json"])
@pytest.mark.parametrize("text,words", HOSTILE_JSON, ids=["list", "deep", "5000-digits", "not-utf8"])
def test_diffusers_json_that_breaks_the_parser(pipeline_folder, which, text, words):
    from ddpm_deploy.nn.load import load_checkpoint

    (pipeline_folder / which).write_bytes(text)
    with pytest.raises(UserError) as e:
        load_checkpoint(pipeline_folder)
    msg = str(e.value)
    assert "\n" not in msg and which.split("/")[-1] in msg and words in msg, msg


def test_absurd_sample_size_in_a_diffusers_config_is_refused(unet_folder, tmp_path):
    """sample_size is not a weight shape (the meta-device check cannot see it) but sizes every x_t."""
    cfg_path = unet_folder / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "sample_size": 10 ** 6}))
    r = cli("run", "--checkpoint", unet_folder, "-n", "1", "--sampler", "ddim", "--steps", "2",
            "-o", tmp_path / "s.png", "--quiet", cwd=tmp_path)
    assert_one_line_error(r, "config.json", "sample_size")


@pytest.mark.parametrize("content", [b"PK\x03\x04 not really a zip", b"", "list"], ids=["corrupt", "empty", "list"])
def test_corrupt_or_list_bin_weights_are_one_line(unet_folder, content):
    import torch

    from ddpm_deploy.nn.load import load_checkpoint

    (unet_folder / "diffusion_pytorch_model.safetensors").unlink()
    path = unet_folder / "diffusion_pytorch_model.bin"
    if content == "list":
        torch.save([torch.zeros(2)], path)
    else:
        path.write_bytes(content)
    with pytest.raises(UserError) as e:
        load_checkpoint(unet_folder)
    msg = str(e.value)
    assert "\n" not in msg and "diffusion_pytorch_model.bin" in msg, msg


@pytest.mark.parametrize("name", ["diffusion_pytorch_model.safetensors", "config.json"])
def test_diffusers_files_linked_outside_their_folder_are_refused(unet_folder, tmp_path, name):
    """As ONNX external data outside the model's folder is: a link is not followed out of the folder."""
    from ddpm_deploy.nn.load import load_checkpoint

    outside = tmp_path / "elsewhere" / name
    outside.parent.mkdir()
    shutil.move(unet_folder / name, outside)
    (unet_folder / name).symlink_to(outside)
    with pytest.raises(UserError, match="outside the model folder") as e:
        load_checkpoint(unet_folder)
    assert "\n" not in str(e.value)
    inside = unet_folder / "kept" / name  # a link that stays inside the folder is fine
    inside.parent.mkdir()
    shutil.move(outside, inside)
    (unet_folder / name).unlink()
    (unet_folder / name).symlink_to(inside)
    load_checkpoint(unet_folder)


@pytest.mark.parametrize("which", ["config.json", "model.pt"])
def test_a_fifo_config_or_checkpoint_is_refused_without_blocking(unet_folder, which):
    """A FIFO where config.json (or a model.pt) goes blocked the loader forever; it is refused as not a regular
    file (run in a subprocess with a timeout, so a regression fails instead of hanging the suite)."""
    fifo = unet_folder / which
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    model = unet_folder if which == "config.json" else fifo
    r = cli("run", "--checkpoint", model, "-n", "1", "--quiet", "-o", unet_folder.parent / "s.png",
            cwd=unet_folder.parent, timeout=60)
    assert_one_line_error(r, which, "not a regular file")


def test_distilled_error_is_cut_to_one_short_line():
    from ddpm_deploy.artifact.fields import checked_distilled

    with pytest.raises(UserError) as e:
        checked_distilled({"steps": 2, "timesteps": [5] * 200_000}, 50, "s.pt")
    assert len(str(e.value)) < 300, len(str(e.value))
