"""Export: our checkpoint, diffusers folders, fp16, dynamic batch, the manifest round trip, bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import cli

from ddpm_deploy.errors import UserError

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

QUIET = dict(echo=lambda *_: None)


def _tiny_unet(out_channels=1):
    from ddpm_deploy.config import unet_config
    from ddpm_deploy.nn.unet import unet_from_config

    torch.manual_seed(0)
    cfg = unet_config("tiny", sample_size=8, channels=1)
    cfg["out_channels"] = out_channels
    return unet_from_config(cfg).eval()


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A tiny DDPMPipeline.save_pretrained folder with a cosine, fixed_large, no-clip scheduler."""
    from diffusers import DDPMPipeline, DDPMScheduler

    d = tmp_path_factory.mktemp("pipe")
    sched = DDPMScheduler(num_train_timesteps=40, beta_schedule="squaredcos_cap_v2", variance_type="fixed_large",
                          clip_sample=False)
    DDPMPipeline(unet=_tiny_unet(), scheduler=sched).save_pretrained(d)
    return d


def _manifest(path):
    from ddpm_deploy.artifact.manifest import Manifest

    return Manifest.read(path).to_dict()


def test_our_checkpoint_manifest_round_trip(tiny_ckpt, tiny_onnx):
    m = _manifest(tiny_onnx)
    ck = torch.load(tiny_ckpt, weights_only=True)
    assert m["schedule"] == ck["schedule"] and m["image"] == {"channels": 1, "height": 8, "width": 8}
    assert m["dtype"] == "float32" and m["batch"] == {"min": 1, "max": 4}
    assert m["variance_type"] == "fixed_small" and m["clip_sample"] is True
    from ddpm_deploy.files import file_sha256

    assert m["source"]["sha256"] == file_sha256(tiny_ckpt)
    r = cli("info", tiny_onnx)
    assert r.returncode == 0 and json.loads(r.stdout) == m


def test_dynamic_batch_and_timestep_dtype(tiny_onnx):
    sess = ort.InferenceSession(tiny_onnx, providers=["CPUExecutionProvider"])
    ins = {i.name: i for i in sess.get_inputs()}
    assert ins["t"].type == "tensor(float)" and ins["x_t"].shape[0] == "batch"
    for b in (1, 3, 4):
        out = sess.run(None, {"x_t": np.zeros((b, 1, 8, 8), np.float32), "t": np.zeros(b, np.float32)})[0]
        assert out.shape == (b, 1, 8, 8)


def test_native_group_norm(tiny_onnx):
    import onnx

    ops = {n.op_type for n in onnx.load(tiny_onnx).graph.node}
    assert "GroupNormalization" in ops and "InstanceNormalization" not in ops


def test_fp16_export(tiny_onnx_fp16, tiny_onnx):
    import onnx

    m = _manifest(tiny_onnx_fp16)
    assert m["dtype"] == "float16" and m["precision"]["fp32_nodes"]
    model = onnx.load(tiny_onnx_fp16)
    inits = {onnx.helper.tensor_dtype_to_np_dtype(i.data_type) for i in model.graph.initializer}
    assert np.dtype(np.float16) in inits
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in model.graph.input)
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    t = np.array([0, 49], np.float32)
    a = ort.InferenceSession(tiny_onnx).run(None, {"x_t": x, "t": t})[0]
    b = ort.InferenceSession(tiny_onnx_fp16).run(None, {"x_t": x, "t": t})[0]
    assert 0 < np.abs(a - b).max() < 5e-2


def test_diffusers_pipeline_folder(pipeline_dir, tmp_path):
    from ddpm_deploy.export import onnx_from_checkpoint

    r = onnx_from_checkpoint(str(pipeline_dir), tmp_path / "p.onnx", max_batch=2, **QUIET)
    m = r["manifest"].to_dict()
    assert m["schedule"]["beta_schedule"] == "cosine" and m["schedule"]["num_train_timesteps"] == 40
    assert m["variance_type"] == "fixed_large" and m["clip_sample"] is False
    assert max(row.max_abs for row in r["parity"]) < 1e-4


def test_bare_unet_folder_with_flags_and_learned_variance(tmp_path):
    """A bare UNet2DModel folder (2C outputs) takes its schedule from flags; the 2C channels are kept."""
    _tiny_unet(out_channels=2).save_pretrained(tmp_path / "unet")
    r = cli("export", str(tmp_path / "unet"), "-o", str(tmp_path / "u.onnx"), "--max-batch", "2",
            "--variance-type", "learned_range", "--num-train-timesteps", "30")
    assert r.returncode == 0, r.stderr
    assert "parity" in r.stdout
    m = _manifest(tmp_path / "u.onnx")
    assert m["out_channels"] == 2 and m["variance_type"] == "learned_range"
    assert m["schedule"] == {"beta_schedule": "linear", "num_train_timesteps": 30, "beta_start": 1e-4, "beta_end": 0.02}


def test_parity_check_catches_a_wrong_graph(tiny_ckpt, tiny_onnx):
    """The accept/reject gate: the ONNX compared with a different network is refused."""
    from ddpm_deploy.nn import load_checkpoint
    from ddpm_deploy.export.onnx_export import check_parity, eps_module

    ckpt = load_checkpoint(tiny_ckpt)
    other = eps_module(_tiny_unet())
    lines = []
    with pytest.raises(UserError, match="parity check failed"):
        check_parity(open(tiny_onnx, "rb").read(), other, ckpt, 2, fp16=False, echo=lines.append)
    assert lines[-1].startswith("parity verdict: FAIL (ONNX fp32 vs PyTorch"), lines
    assert "> 0.0001" in lines[-1] or "> 1e-05" in lines[-1], lines  # the bound it crossed
    lines.clear()
    rows = check_parity(open(tiny_onnx, "rb").read(), eps_module(ckpt.build_unet()), ckpt, 2, False,
                        echo=lines.append)
    assert {r.batch for r in rows} == {1, 2} and {0, 49} <= {int(t) for r in rows for t in r.timesteps}
    assert lines[-1].startswith("parity verdict: PASS"), lines


def test_export_prints_its_tolerance_and_verdict(tiny_ckpt, tmp_path):
    """export printed its parity rows (max|Δeps| 1.2e-06 ...) with no bound and no verdict; now a verdict line
    names both bounds, as verify does, and --no-check says nothing was checked."""
    from ddpm_deploy.tolerances import EXPORT_FP32_MAX_ABS, EXPORT_FP32_MEAN_ABS

    r = cli("export", tiny_ckpt, "-o", str(tmp_path / "m.onnx"), "--max-batch", "2")
    assert r.returncode == 0, r.stderr
    verdict = [line for line in r.stdout.splitlines() if line.startswith("parity verdict:")]
    assert len(verdict) == 1 and verdict[0].startswith("parity verdict: PASS"), r.stdout
    assert f"<= {EXPORT_FP32_MAX_ABS:g}" in verdict[0] and f"<= {EXPORT_FP32_MEAN_ABS:g}" in verdict[0], verdict
    r = cli("export", tiny_ckpt, "-o", str(tmp_path / "n.onnx"), "--max-batch", "2", "--no-check")
    assert r.returncode == 0 and "parity verdict: NOT CHECKED (--no-check)" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("make,args,msg", [
    (lambda d: None, ["{d}/nothing"], "not found"),
    (lambda d: (d / "plain").mkdir(), ["{d}/plain"], "not a diffusers model folder"),
    (lambda d: ((d / "cond").mkdir(), (d / "cond" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')),
     ["{d}/cond"], "not supported"),
    (lambda d: None, ["{ckpt}", "--opset", "9"], "opset 9 is not supported"),
])
def test_bad_input(tmp_path, tiny_ckpt, make, args, msg):
    make(tmp_path)
    r = cli("export", *[a.replace("{d}", str(tmp_path)).replace("{ckpt}", tiny_ckpt) for a in args],
            "-o", str(tmp_path / "out.onnx"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and msg in lines[0], r.stderr
    assert not (tmp_path / "out.onnx").exists() and not list(tmp_path.glob("*.tmp"))


def test_manifest_says_what_the_output_holds():
    """A v-prediction student's manifest described its output only as `eps`. The tensor keeps that name (every
    runtime, fused graph and engine binds it; files already written carry it), and its description now says what it
    holds, by prediction_type; a manifest written before still loads."""
    from ddpm_deploy.artifact.fields import EPS_IO
    from ddpm_deploy.artifact.manifest import Manifest
    from ddpm_deploy.nn import load_checkpoint

    student = Manifest.from_checkpoint(load_checkpoint("digits-2step"), max_batch=2).to_dict()
    assert list(student["outputs"]) == ["eps"]
    assert "network output: v = alpha_t eps - sigma_t x_0 (not eps)" in student["outputs"]["eps"], student["outputs"]
    assert "(prediction_type v_prediction)" in student["outputs"]["eps"]
    teacher = Manifest.from_checkpoint(load_checkpoint("digits"), max_batch=2).to_dict()
    assert "network output: eps, the noise in x_t" in teacher["outputs"]["eps"], teacher["outputs"]
    written_before = {**student, "outputs": dict(EPS_IO["outputs"])}
    assert Manifest.from_dict(written_before, "old.onnx").prediction_type == "v_prediction"
