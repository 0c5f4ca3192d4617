"""Shared fixtures: a tiny trained checkpoint (8x8 digits, T=50) and its ONNX exports, built once per session."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest


def cli(*args, cwd=None, env=None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `ddpm-deploy ARGS` in a fresh interpreter (the way users run it); text stdout/stderr captured."""
    return subprocess.run([sys.executable, "-m", "ddpm_deploy.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def fused_sessions(path: str):
    """(Manifest, eps-graph session, fused-step-graph session) of an exported ONNX, onnxruntime CPU, one thread."""
    import onnxruntime as ort

    from ddpm_deploy.artifact.manifest import Manifest
    from ddpm_deploy.runtime.backends.onnxruntime_iobinding import fused_model_bytes

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    manifest = Manifest.read(path)
    eps = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    fused = ort.InferenceSession(fused_model_bytes(path, manifest), opts, providers=["CPUExecutionProvider"])
    return manifest, eps, fused


def assert_fused_walk_matches_numpy(manifest, eps_sess, fused, plan, rng, label: str = "") -> None:
    """Along a real chain of `plan` (2 images from `rng`): the same (x_t, t, z, row, history) into the fused step
    graph and the numpy step give the same x_prev and history; the numpy result carries on to the next step."""
    from ddpm_deploy.fused_io import N_HIST
    from ddpm_deploy.sampling.step import step_with_history
    from ddpm_deploy.tolerances import FUSED_MULTISTEP_ATOL

    x = rng.standard_normal((2, *manifest.image_shape), dtype=np.float32)
    hist = np.zeros((2, N_HIST, *manifest.image_shape), np.float32)
    for k, t in enumerate(plan.timesteps):
        z = rng.standard_normal(x.shape, dtype=np.float32)
        t_vec = np.full(2, t, np.float32)
        out = eps_sess.run(None, {"x_t": x, "t": t_vec})[0]
        want, want_h = step_with_history(x, out, z, plan.coefs[k], hist)
        rows = np.repeat(plan.coefs[k][None].astype(np.float32), 2, axis=0)
        x_prev, h_out = fused.run(["x_prev", "hist_out"], {"x_t": x, "t": t_vec, "z": z, "coefs": rows, "hist": hist})
        np.testing.assert_allclose(x_prev, want, rtol=0, atol=FUSED_MULTISTEP_ATOL, err_msg=f"{label} step {k}")
        np.testing.assert_allclose(h_out, want_h, rtol=0, atol=FUSED_MULTISTEP_ATOL, err_msg=f"{label} step {k}")
        x, hist = want, want_h


def assert_one_line_error(r: subprocess.CompletedProcess, *words, code: int = 2) -> str:
    """A bad input ends in one `error: ...` line on stderr naming `words`, and exit status `code`."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def _has_cuda() -> bool:
    """The project's own CUDA probe (cuda-bindings, else nvidia-smi), not torch: the README installs CPU torch,
    which would call a GPU machine GPU-less and skip every `gpu` test there."""
    from ddpm_deploy.runtime.cuda import cuda_gpu_present

    return cuda_gpu_present()


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _user_cache(tmp_path_factory):
    """The user's cache folder (backend auto's choices, OpenVINO's compiled models) in a temp folder: tests never
    read or write the real ~/.cache, and every session measures afresh."""
    import os

    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


TINY_T = 50


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> str:
    """A tiny UNet (block_out_channels (8, 16), one attention block) trained 4 steps on 8x8 digits, T=50."""
    from ddpm_deploy.train.trainer import TrainConfig, Trainer

    out = tmp_path_factory.mktemp("tiny")
    cfg = TrainConfig(data="digits", out=str(out), preset="tiny", image_size=8, num_train_timesteps=TINY_T,
                      steps=4, batch_size=8, checkpoint_every=2, sample_n=0, threads=1)
    Trainer(cfg, progress=False).fit()
    return str(out / "model.pt")


@pytest.fixture(scope="session")
def tiny_onnx(request, tmp_path_factory) -> str:
    """The tiny checkpoint exported (max batch 4); $DDPM_DEPLOY_TEST_ONNX names one already exported this way
    (.ci/run's torch-free leg on the oldest Python, which has no torch to train and export with)."""
    import os

    given = os.environ.get("DDPM_DEPLOY_TEST_ONNX")
    if given:
        return given
    from ddpm_deploy.export import onnx_from_checkpoint

    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    onnx_from_checkpoint(request.getfixturevalue("tiny_ckpt"), out, max_batch=4, echo=lambda *_: None)
    return str(out)


@pytest.fixture(scope="session")
def tiny_onnx_fp16(tiny_ckpt, tmp_path_factory) -> str:
    from ddpm_deploy.export import onnx_from_checkpoint

    out = tmp_path_factory.mktemp("onnx16") / "tiny.fp16.onnx"
    onnx_from_checkpoint(tiny_ckpt, out, max_batch=4, fp16=True, echo=lambda *_: None)
    return str(out)


@pytest.fixture(scope="session")
def lv_onnx(tmp_path_factory) -> str:
    """A learned-variance model: tiny UNet with 2C output channels (random weights), as a bare diffusers folder
    exported with variance_type learned_range, T = TINY_T."""
    import torch

    from ddpm_deploy.config import unet_config
    from ddpm_deploy.export import onnx_from_checkpoint
    from ddpm_deploy.nn.unet import unet_from_config

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("lv") / "unet"
    unet_from_config(unet_config("tiny", sample_size=8, channels=1, learned_variance=True)).save_pretrained(folder)
    out = folder.parent / "lv.onnx"
    onnx_from_checkpoint(str(folder), out, max_batch=2, echo=lambda *_: None,
                         schedule_overrides={"variance_type": "learned_range", "num_train_timesteps": TINY_T})
    return str(out)


SERVE_MAX_N = 64   # the test server's --max-n: large enough for every request the serve tests send


@pytest.fixture(scope="module")
def server(tiny_onnx):
    """`ddpm-deploy serve` on the tiny model in a subprocess on 127.0.0.1, stopped by its PID after the module."""
    from ddpm_deploy.serve.process import ServeProcess

    s = ServeProcess("--engine", tiny_onnx, "--max-n", SERVE_MAX_N)
    yield s
    s.close()
