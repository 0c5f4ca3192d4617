"""Runtime: samplers through the ONNX backend against independent computations, seeds, chunking, torch-free
import and run, and bad inputs."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import cli

from ddpm_deploy.errors import UserError
from ddpm_deploy.runtime import load, request_noise

# Chains of 10-50 steps on the tiny model: fp32 ONNX vs torch eps differ by ~1e-6 per call (export parity);
# the clipped updates keep that from growing beyond ~1e-5 over the chain. 1e-4 leaves a 10x margin.
CHAIN_ATOL = 1e-4


def test_ddim_chain_matches_diffusers_scheduler(tiny_onnx, tiny_ckpt):
    """ONNX + numpy DDIM == torch UNet + diffusers DDIMScheduler, same x_T and per-step noise."""
    torch = pytest.importorskip("torch")
    from diffusers import DDIMScheduler

    from ddpm_deploy.nn import load_checkpoint

    ckpt = load_checkpoint(tiny_ckpt)
    unet = ckpt.build_unet()
    sch = DDIMScheduler(num_train_timesteps=50, clip_sample=True)
    sch.set_timesteps(10)
    x_T, z = request_noise(7, 3, (1, 8, 8), 10)
    with load(tiny_onnx, backend="onnxruntime") as pipe:
        ours = pipe.sample(3, sampler="ddim", steps=10, eta=1.0, x_T=x_T, step_noise=z, output="float")
    x = torch.from_numpy(x_T)
    with torch.no_grad():
        for k, t in enumerate(sch.timesteps):
            eps = unet(x, t).sample
            x = sch.step(eps, t, x, eta=1.0, variance_noise=torch.from_numpy(z[k])).prev_sample
    np.testing.assert_allclose(ours, x.numpy(), atol=CHAIN_ATOL)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_chain_matches_torch_reference(tiny_onnx, tiny_ckpt, variance_type):
    """ONNX + numpy DDPM over all T == the torch Ho et al. reference (posterior mean with clipped x_0)."""
    torch = pytest.importorskip("torch")
    from ddpm_deploy.nn import load_checkpoint
    from ddpm_deploy.nn.reference import ddpm_reference_sample
    from ddpm_deploy.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from ddpm_deploy.runtime.pipeline import Pipeline

    ckpt = load_checkpoint(tiny_ckpt)
    unet = ckpt.build_unet()
    backend = OnnxRuntimeBackend(tiny_onnx)
    backend.manifest = backend.manifest.replace(variance_type=variance_type)
    x_T, z = request_noise(0, 2, (1, 8, 8), 50)
    ours = Pipeline(backend).sample(2, x_T=x_T, step_noise=z, output="float")
    ref = ddpm_reference_sample(lambda x, t: unet(x, t).sample, torch.from_numpy(x_T), torch.from_numpy(z),
                                ckpt.schedule, variance_type=variance_type, clip_sample=True)
    np.testing.assert_allclose(ours, ref.numpy(), atol=CHAIN_ATOL)


def test_seeds_match_across_backends_and_chunking(tiny_onnx, tiny_ckpt):
    pytest.importorskip("torch")
    from ddpm_deploy.app.opener import open_pipeline

    with load(tiny_onnx, backend="onnxruntime") as onnx_pipe, open_pipeline(tiny_ckpt) as torch_pipe:
        a = onnx_pipe.sample(5, seed=3, sampler="ddim", steps=8, eta=0.5, output="float")
        b = onnx_pipe.sample(5, seed=3, sampler="ddim", steps=8, eta=0.5, output="float", batch_size=2)
        c = torch_pipe.sample(5, seed=3, sampler="ddim", steps=8, eta=0.5, output="float")
        d = onnx_pipe.sample(5, seed=4, sampler="ddim", steps=8, eta=0.5, output="float")
        u8 = onnx_pipe.sample(5, seed=3, sampler="ddim", steps=8, eta=0.5)
    np.testing.assert_array_equal(a, b)  # chunking never changes images: exact
    np.testing.assert_allclose(a, c, atol=CHAIN_ATOL)
    assert np.abs(a - d).max() > 0.1
    assert u8.dtype == np.uint8 and u8.shape == (5, 8, 8, 1)


def test_noise_documented_generator():
    x_T, z = request_noise(11, 2, (1, 2, 2), 3)
    g = np.random.default_rng([11, 1])
    np.testing.assert_array_equal(x_T[1], g.standard_normal((1, 2, 2), dtype=np.float32))
    np.testing.assert_array_equal(z[:, 1], g.standard_normal((3, 1, 2, 2), dtype=np.float32))


@pytest.mark.parametrize("fused_step", [True, False])  # the fused step's own flag; the numpy host loop's
def test_non_finite_eps_is_reported(tiny_onnx, fused_step):
    """One loop, one refusal: the host loop names the step and image as the fused step does."""
    message = r"non-finite values at step 0 \(t=49\) on backend onnxruntime-cpu \(image 0 of the batch\)"
    # named: the default (auto) may pick OpenVINO
    with load(tiny_onnx, backend="onnxruntime", fused_step=fused_step) as pipe:
        x_T = np.full((1, 1, 8, 8), np.nan, dtype=np.float32)
        with pytest.raises(UserError, match=message):
            pipe.sample(1, x_T=x_T)


TORCH_FREE = r"""
import sys
sys.modules["torch"] = None  # any `import torch` now fails
from ddpm_deploy.runtime import load
with load(sys.argv[1]) as pipe:
    img = pipe.sample(3, seed=0, sampler="ddim", steps=5)
assert img.shape == (3, 8, 8, 1), img.shape
from ddpm_deploy.cli import main
main(["run", "--engine", sys.argv[1], "-n", "2", "--sampler", "ddim", "--steps", "4", "-o", sys.argv[2], "--quiet"])
"""


def test_runtime_and_run_work_without_torch(tiny_onnx, tmp_path):
    r = subprocess.run([sys.executable, "-c", TORCH_FREE, tiny_onnx, str(tmp_path / "s.png")], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "s.png").exists() and "wrote" in r.stdout


def test_run_cli_writes_png_and_npy(tiny_onnx, tmp_path):
    r = cli("run", "--engine", tiny_onnx, "-n", "5", "--batch-size", "2", "--sampler", "ddim", "--steps", "5",
            "-o", str(tmp_path / "g.png"), "--save-npy", str(tmp_path / "x.npy"), "--quiet")
    assert r.returncode == 0, r.stderr
    x = np.load(tmp_path / "x.npy")
    assert x.shape == (5, 1, 8, 8) and x.dtype == np.float32
    from PIL import Image

    assert Image.open(tmp_path / "g.png").size[0] > 8


@pytest.mark.parametrize("args,msg", [
    (["--engine", "{d}/missing.onnx"], "not found"),
    (["--engine", "{d}/corrupt.onnx"], "not a readable ONNX"),
    (["--engine", "{d}/bare.onnx"], "no ddpm-deploy manifest; re-export"),
    (["--engine", "{onnx}", "--steps", "51"], "between 1 and T=50"),
    (["--engine", "{onnx}", "--sampler", "euler"], "unknown sampler 'euler'"),  # the spec's line, as HTTP's
    (["--engine", "{onnx}", "-n", "0"], "-n must be positive"),
    (["--engine", "{onnx}", "-o", "{d}/nodir/s.png"], "does not exist"),
    (["--engine", "{onnx}", "--device", "cuda"], "CUDAExecutionProvider"),
    ([], "exactly one of --engine"),
])
def test_run_bad_input(tiny_onnx, tmp_path, args, msg):
    import onnx

    (tmp_path / "corrupt.onnx").write_bytes(b"\x00garbage")
    bare = onnx.load(tiny_onnx)
    del bare.metadata_props[:]
    onnx.save(bare, tmp_path / "bare.onnx")
    r = cli("run", *[a.replace("{d}", str(tmp_path)).replace("{onnx}", tiny_onnx) for a in args], "--quiet", cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and msg in lines[0], r.stderr
    assert not (tmp_path / "samples.png").exists()


def test_run_refuses_bad_sampling_before_compiling(tiny_onnx, tmp_path):
    """CI (session 5) saw `run --steps 51` print OpenVINO's bad-cache warning before the steps error: the options
    were checked only after the backend compiled. Reproduced with a poisoned cache (the blob of a model whose eps is
    inf stored under the tiny model's key): the error must be the only line, so nothing was compiled or probed."""
    pytest.importorskip("openvino")
    from test_finiteness import inject_eps_onnx

    from conftest import TINY_T
    from ddpm_deploy.runtime.backends.openvino_backend import OpenVinoBackend

    cache = tmp_path / "xdg" / "ddpm-deploy" / "openvino"
    bad = inject_eps_onnx(tiny_onnx, str(tmp_path / "bad.onnx"), TINY_T - 1, float("inf"))
    OpenVinoBackend(tiny_onnx, threads=1, cache_dir=str(cache)).close()
    (blob,) = list(cache.glob("*.blob"))
    with pytest.raises(UserError):
        OpenVinoBackend(bad, threads=1, cache_dir=str(tmp_path / "bad_cache"))
    (bad_blob,) = list((tmp_path / "bad_cache").glob("*.blob"))
    blob.write_bytes(bad_blob.read_bytes())
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    args = ["run", "--engine", tiny_onnx, "--backend", "openvino", "--threads", "1", "-o", str(tmp_path / "s.png")]
    r = cli(*args, "--steps", "51", env=env)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["error: steps must be between 1 and T=50, got 51"]
    r = cli(*args, "--sampler", "ddim", "--steps", "2", env=env)  # the cache really is poisoned: a good run warns
    assert r.returncode == 0 and "cached compiled model" in r.stderr, r.stderr
