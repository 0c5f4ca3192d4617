"""TensorRT: what runs without it (one-line errors, no partial files, the engine compatibility rule, the sidecar
manifest, the batch profile), and GPU tests that build and run engines where TensorRT and a GPU are present."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ddpm_deploy.errors import UserError
from ddpm_deploy.fused_io import FUSED_INTERFACE_VERSION, FUSED_IO
from ddpm_deploy.runtime.backends.tensorrt_build import batch_profile, engine_manifest, publish_engine, sha256_bytes
from ddpm_deploy.artifact.manifest import Manifest, read_engine_manifest, sidecar_path
from ddpm_deploy.runtime.backends.tensorrt_backend import engine_compatibility_problem

from conftest import _has_cuda, assert_one_line_error, cli

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
HAS_GPU = _has_cuda()
no_tensorrt = pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
no_gpu = pytest.mark.skipif(HAS_GPU, reason="a CUDA GPU is present here")


def listing(*dirs):
    return {d: sorted(os.listdir(d)) for d in dirs}


# ---------------------------------------------------------------------------------------------- without TensorRT

@no_tensorrt
def test_build_without_tensorrt_is_one_line_and_writes_nothing(tiny_onnx, tmp_path):
    before = listing(tmp_path, Path(tiny_onnx).parent)
    r = cli("build", tiny_onnx, "-o", "x.trt", cwd=tmp_path)
    assert_one_line_error(r, "TensorRT is not installed", "pip install tensorrt", "NVIDIA GPU")
    r = cli("build", tiny_onnx, cwd=tmp_path)  # default output next to the ONNX
    assert_one_line_error(r, "TensorRT is not installed")
    assert listing(tmp_path, Path(tiny_onnx).parent) == before


@no_tensorrt
def test_run_engine_without_tensorrt_is_one_line_and_writes_nothing(tmp_path):
    r = cli("run", "--engine", "x.trt", "-n", "1", cwd=tmp_path)
    assert_one_line_error(r, "TensorRT is not installed")
    assert os.listdir(tmp_path) == []  # no samples.png


@pytest.fixture()
def fake_tensorrt(tmp_path):
    """A `tensorrt` that fails if imported: proves the GPU check comes before TensorRT is touched."""
    pkg = tmp_path / "fake" / "tensorrt"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('tensorrt imported before the GPU check')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pkg.parent), os.environ.get("PYTHONPATH", "")]))
    return env


@no_gpu
def test_build_with_tensorrt_but_no_gpu_is_one_line(tiny_onnx, tmp_path, fake_tensorrt):
    work = tmp_path / "work"
    work.mkdir()
    r = cli("build", tiny_onnx, "-o", "x.trt", cwd=work, env=fake_tensorrt)
    assert_one_line_error(r, "no usable CUDA GPU")
    r = cli("run", "--engine", "x.trt", "-n", "1", cwd=work, env=fake_tensorrt)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr and ("no usable CUDA GPU" in r.stderr or "cuda-python" in r.stderr)
    assert os.listdir(work) == []


@no_gpu
def test_require_gpu_without_gpu_is_one_line():
    from ddpm_deploy.runtime.cuda import require_gpu

    with pytest.raises(UserError) as e:
        require_gpu()
    assert "\n" not in str(e.value) and "no usable CUDA GPU" in str(e.value)


@no_gpu
@pytest.mark.parametrize("script,words", [("gpu_tensorrt.py", "no usable CUDA GPU"), ("gpu_check.py", "no GPU")])
def test_benchmark_without_gpu_exits_cleanly(tmp_path, script, words):
    script = Path(__file__).parents[1] / "benchmarks" / script
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert len(r.stdout.strip().splitlines()) == 1 and words in r.stdout
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------- provider options

def test_gpu_provider_options():
    """TF32 off in the CUDA provider; no trt_fp16_enable (it makes the TensorRT provider's network weakly typed);
    a profile for every fused input."""
    from ddpm_deploy.runtime.backends.onnxruntime_backend import _provider_list

    for dtype in ("float32", "float16"):
        m = BUILT.replace(dtype=dtype, max_batch=4)
        trt, cuda, cpu = _provider_list("tensorrt", m, None)
        assert cuda == ("CUDAExecutionProvider", {"use_tf32": "0"}) and cpu == "CPUExecutionProvider"
        assert trt[0] == "TensorrtExecutionProvider" and not any("fp16" in k for k in trt[1])
        assert trt[1]["trt_profile_max_shapes"] == "x_t:4x1x8x8,t:4,z:4x1x8x8,coefs:4x16,hist:4x4x1x8x8"
        assert _provider_list("cuda", m, None) == [cuda, "CPUExecutionProvider"]


def test_onnxruntime_and_onnxruntime_gpu_together_are_refused(monkeypatch, tiny_onnx):
    import importlib.metadata as md

    from ddpm_deploy.runtime import load
    from ddpm_deploy.runtime.cuda import onnxruntime_gpu_problem

    real = md.version
    monkeypatch.setattr(md, "version", lambda d: "1.31.1" if d == "onnxruntime-gpu" else real(d))
    p = onnxruntime_gpu_problem()
    assert "\n" not in p and "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu" in p
    for device in ("cuda", "tensorrt"):
        with pytest.raises(UserError, match="are both installed"):
            load(tiny_onnx, device=device)
    load(tiny_onnx, device="cpu").close()  # the CPU provider works either way


# ---------------------------------------------------------------------------------------------- compatibility rule

def with_trt(**changes):
    from ddpm_deploy.sampling.schedule import Schedule

    trt = {"version": "10.13.0.35", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
           "hardware_compatible": False, **changes}
    return Manifest(channels=1, height=8, width=8, out_channels=1, schedule=Schedule.build(), graph="fused",
                    tensorrt=trt, fused_interface=FUSED_INTERFACE_VERSION)


BUILT = with_trt()


def test_same_tensorrt_and_gpu_is_compatible():
    assert engine_compatibility_problem(BUILT, "10.13.0.35", "9.0") is None


def test_other_tensorrt_version_is_refused_with_rebuild_command():
    p = engine_compatibility_problem(BUILT, "11.1.0.4", "9.0", engine="m.trt")
    assert "10.13.0.35" in p and "11.1.0.4" in p and "`ddpm-deploy build MODEL.onnx -o m.trt`" in p and "\n" not in p
    assert engine_compatibility_problem(BUILT, "10.13.0.34", "9.0")  # builds differ too


@pytest.mark.parametrize("cc", ["8.6", "8.9", "10.0", "9.1"])
def test_other_compute_capability_is_refused(cc):
    p = engine_compatibility_problem(BUILT, "10.13.0.35", cc, engine="m.trt")
    assert "9.0" in p and cc in p and "H100" in p and "ddpm-deploy build MODEL.onnx -o m.trt" in p


def test_hardware_compatible_engine_runs_on_ampere_and_newer_only():
    hc = with_trt(hardware_compatible=True)
    for cc in ("8.0", "8.6", "9.0", "10.0", "12.0"):
        assert engine_compatibility_problem(hc, "10.13.0.35", cc) is None, cc
    for cc in ("7.5", "7.0"):
        assert "8.0 or newer" in engine_compatibility_problem(hc, "10.13.0.35", cc)
    assert engine_compatibility_problem(hc, "11.0.0.1", "9.0")  # still tied to the TensorRT version


@pytest.mark.parametrize("recorded", [None, FUSED_INTERFACE_VERSION + 1, FUSED_INTERFACE_VERSION - 1])
def test_other_fused_interface_is_refused_with_rebuild_command(recorded):
    """An engine compiled for another fused-step interface (or a sidecar from before it was recorded) could read
    its coefficient columns permuted: refused, whatever TensorRT and GPU say, with the command that rebuilds it."""
    p = engine_compatibility_problem(BUILT.replace(fused_interface=recorded), "10.13.0.35", "9.0", engine="m.trt")
    assert p and "fused-step interface" in p and "`ddpm-deploy build MODEL.onnx -o m.trt`" in p and "\n" not in p
    assert (f"interface {recorded}," in p) if recorded is not None else "records no fused-step interface version" in p


def test_manifest_without_engine_section_is_refused(tiny_onnx):
    p = engine_compatibility_problem(Manifest.read(tiny_onnx), "10.13.0.35", "9.0", engine="m.trt")
    assert "not built by `ddpm-deploy build`" in p


# ---------------------------------------------------------------------------------------------- sidecar, profile

def test_engine_manifest_and_publish_round_trip(tiny_onnx, tmp_path):
    onnx_m = Manifest.read(tiny_onnx)
    engine = b"serialized engine bytes"
    m = engine_manifest(onnx_m, trt_version="10.13.0.35", gpu_name="NVIDIA L4", compute_capability="8.9",
                        onnx_sha256=sha256_bytes(Path(tiny_onnx).read_bytes()), engine_sha256=sha256_bytes(engine),
                        batch={"min": 1, "opt": 2, "max": 4})
    m, onnx_m = m.to_dict(), onnx_m.to_dict()
    assert m["graph"] == "fused" and m["batch"] == {"min": 1, "opt": 2, "max": 4}
    assert m["fused_interface"] == FUSED_INTERFACE_VERSION
    assert m["tensorrt"] == {"version": "10.13.0.35", "gpu_name": "NVIDIA L4", "compute_capability": "8.9",
                             "hardware_compatible": False, "tf32": False}
    assert m["inputs"] == FUSED_IO["inputs"] and m["outputs"] == FUSED_IO["outputs"]
    for key in ("schedule", "image", "variance_type", "clip_sample", "dtype", "source", "out_channels"):
        assert m[key] == onnx_m[key], key
    assert onnx_m["batch"] == {"min": 1, "max": 4} and "graph" not in onnx_m  # the ONNX's manifest is untouched
    m = Manifest.from_dict(m, "test")
    assert engine_compatibility_problem(m, "10.13.0.35", "8.9") is None
    path = tmp_path / "m.trt"
    side = publish_engine(engine, path, m)
    assert side == sidecar_path(path) and path.read_bytes() == engine
    assert read_engine_manifest(path).to_dict() == m.to_dict()
    assert sorted(os.listdir(tmp_path)) == ["m.trt", "m.trt.json"]  # no temp files left


def test_failed_engine_write_leaves_no_stale_sidecar(tmp_path, monkeypatch):
    import ddpm_deploy.runtime.backends.tensorrt_build as tb

    path = tmp_path / "m.trt"
    path.write_bytes(b"old engine")
    sidecar_path(path).write_text("{}")

    def disk_full(data, dest):
        raise OSError("No space left on device")

    monkeypatch.setattr(tb, "write_bytes_atomic", disk_full)
    with pytest.raises(OSError):
        publish_engine(b"new", path, BUILT)
    assert not sidecar_path(path).exists() and path.read_bytes() == b"old engine"


def test_batch_profile():
    m = BUILT.replace(max_batch=8)
    assert batch_profile(m, None, None) == {"min": 1, "opt": 8, "max": 8}
    assert batch_profile(m, 4, None) == {"min": 1, "opt": 4, "max": 4}
    assert batch_profile(m, None, 2) == {"min": 1, "opt": 2, "max": 8}
    for mx, opt, words in ((9, None, "re-export"), (0, None, "--max-batch"), (4, 5, "--opt-batch"),
                           (None, 0, "--opt-batch")):
        with pytest.raises(UserError, match=words):
            batch_profile(m, mx, opt)


# ---------------------------------------------------------------------------------------------- GPU

def psnr_db(a, b) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(4.0 / mse)


def _needs_tensorrt():
    pytest.importorskip("tensorrt")
    pytest.importorskip("cuda.bindings")


@pytest.mark.gpu
@pytest.mark.parametrize("onnx_fixture", ["tiny_onnx", "tiny_onnx_fp16"])
def test_engine_chain_matches_onnxruntime_cpu(request, onnx_fixture, tmp_path):
    _needs_tensorrt()
    from ddpm_deploy.runtime import engine_from_onnx
    from ddpm_deploy.runtime import load
    from ddpm_deploy.tolerances import (VERIFY_FP32_EPS_MAX_ABS, VERIFY_FP32_X0_MIN_PSNR_DB,
                                        VERIFY_REDUCED_EPS_MAX_ABS, VERIFY_REDUCED_X0_MIN_PSNR_DB)

    onnx_path = request.getfixturevalue(onnx_fixture)
    r = engine_from_onnx(onnx_path, tmp_path / "tiny.trt", echo=lambda *_: None)
    assert Path(r["manifest_path"]).is_file() and (tmp_path / "tiny.trt.timing").is_file()
    fp16 = r["manifest"]["dtype"] == "float16"
    eps_tol, psnr_tol = ((VERIFY_REDUCED_EPS_MAX_ABS, VERIFY_REDUCED_X0_MIN_PSNR_DB) if fp16
                         else (VERIFY_FP32_EPS_MAX_ABS, VERIFY_FP32_X0_MIN_PSNR_DB))
    with load(onnx_path, backend="onnxruntime", threads=1) as cpu, load(r["path"]) as gpu, load(r["path"], cuda_graph=False) as plain:
        for sampler, eta in (("ddpm", 0.0), ("ddim", 1.0)):
            want = cpu.sample(5, seed=3, sampler=sampler, eta=eta, batch_size=4, output="float")  # chunks 4 + 1
            launches = gpu.backend.graph_launches
            got = gpu.sample(5, seed=3, sampler=sampler, eta=eta, batch_size=4, output="float")
            K = gpu.plan(sampler, None, eta).steps
            assert gpu.backend.graph_launches - launches == 2 * K  # every step replayed a captured graph
            assert psnr_db(got, want) >= psnr_tol, (sampler, psnr_db(got, want))
            # independent of the graphs: the enqueue-per-step backend against the CPU reference, not against them
            unrolled = plain.sample(5, seed=3, sampler=sampler, eta=eta, batch_size=4, output="float")
            assert plain.backend.graph_launches == 0 and plain.backend._cuda.graphs_captured == 0
            assert psnr_db(unrolled, want) >= psnr_tol, (sampler, psnr_db(unrolled, want))
        assert gpu.backend._cuda.graphs_captured >= 2 and gpu.backend._cuda.capture_failures == 0
        worst = []
        slow = gpu.sample(2, seed=4, sampler="ddim", steps=10, output="float",
                          callback=lambda s: worst.append(np.abs(s.model_output - cpu.backend.eps(
                              s.x_t, np.full((len(s.x_t),), s.t, np.float32))).max()))
        assert len(worst) == 10 and max(worst) <= eps_tol
        fast = gpu.sample(2, seed=4, sampler="ddim", steps=10, output="float")
        assert psnr_db(fast, slow) >= psnr_tol
        x = np.random.default_rng(0).standard_normal((3, 1, 8, 8), dtype=np.float32)
        t = np.array([0, 25, 49], np.float32)
        assert np.abs(gpu.backend.eps(x, t) - cpu.backend.eps(x, t)).max() <= eps_tol
        assert psnr_db(gpu.sample(2, seed=4, sampler="ddim", steps=10, output="float"), slow) >= psnr_tol


@pytest.mark.gpu
def test_engine_refused_on_mismatch(tiny_onnx, tmp_path):
    _needs_tensorrt()
    from ddpm_deploy.runtime import engine_from_onnx
    from ddpm_deploy.runtime import load

    r = engine_from_onnx(tiny_onnx, tmp_path / "tiny.trt", max_batch=2, echo=lambda *_: None)
    side = Path(r["manifest_path"])
    m = json.loads(side.read_text())
    m["tensorrt"]["version"] = "0.0.0"
    side.write_text(json.dumps(m))
    with pytest.raises(UserError, match="rebuild it here with `ddpm-deploy build MODEL.onnx"):
        load(r["path"])
    engine_from_onnx(tiny_onnx, tmp_path / "tiny.trt", max_batch=2, echo=lambda *_: None)
    with open(tmp_path / "tiny.trt", "ab") as f:
        f.write(b"\0")
    with pytest.raises(UserError, match="describes another engine"):
        load(str(tmp_path / "tiny.trt"))


@pytest.mark.gpu
@pytest.mark.parametrize("device", ["cuda", "tensorrt"])
def test_onnxruntime_gpu_providers_through_load(tiny_onnx, device):
    """load(..., device=) through the public path: the provider really is the one asked for (load refuses a silent
    CPU fallback), and the IO-binding device loop gives the CPU chain's x_0."""
    ort = pytest.importorskip("onnxruntime")
    from ddpm_deploy.runtime import load
    from ddpm_deploy.runtime.backends.onnxruntime_backend import PROVIDERS
    from ddpm_deploy.tolerances import VERIFY_FP32_X0_MIN_PSNR_DB

    if PROVIDERS[device] not in ort.get_available_providers():
        pytest.skip(f"onnxruntime-gpu with {PROVIDERS[device]} is not installed")
    with load(tiny_onnx, backend="onnxruntime", threads=1) as cpu, load(tiny_onnx, device=device) as gpu:
        assert gpu.backend.session.get_providers()[0] == PROVIDERS[device]
        for sampler, eta in (("ddpm", 0.0), ("ddim", 1.0)):
            want = cpu.sample(5, seed=2, sampler=sampler, eta=eta, batch_size=4, output="float")
            got = gpu.sample(5, seed=2, sampler=sampler, eta=eta, batch_size=4, output="float")
            assert psnr_db(got, want) >= VERIFY_FP32_X0_MIN_PSNR_DB, (sampler, psnr_db(got, want))
