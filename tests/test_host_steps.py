"""CPU backends run the fused step (runtime.cpu_steps): every step's update equals numpy's, the whole chain equals
the numpy host loop's, eps equals the exported graph's, and noise windows, batch sizes and reuse change nothing."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnxruntime as ort
import pytest

from ddpm_deploy.runtime import load, request_noise
from ddpm_deploy.fused_io import N_HIST
from ddpm_deploy.sampling.step import step, step_with_history
from ddpm_deploy.tolerances import (FUSED_CHAIN_ATOL, FUSED_MULTISTEP_ATOL, FUSED_STEP_ATOL,
                                    OPENVINO_FP32_EPS_MAX_ABS, OPENVINO_FP32_X0_MAX_ABS)

from conftest import TINY_T

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
# (backend, options, eps bound vs the exported graph on onnxruntime, whole chain bound vs the numpy host loop)
BACKENDS = [pytest.param("onnxruntime", {}, FUSED_STEP_ATOL, FUSED_CHAIN_ATOL, id="onnxruntime")]
if HAS_OPENVINO:  # fp32 only: bf16 is checked by auto's verification, not against fp32 bounds
    BACKENDS.append(pytest.param("openvino", {"cache_dir": ""}, OPENVINO_FP32_EPS_MAX_ABS, OPENVINO_FP32_X0_MAX_ABS,
                                 id="openvino-fp32"))
    # one compiled model with the ONNX's dynamic batch axis: one infer request per batch size bound to it
    BACKENDS.append(pytest.param("openvino", {"cache_dir": "", "static_shapes": False}, OPENVINO_FP32_EPS_MAX_ABS,
                                 OPENVINO_FP32_X0_MAX_ABS, id="openvino-fp32-dynamic"))
SAMPLERS = [("ddpm", None, {}), ("ddim", 10, {"eta": 1.0}), ("dpmpp", 8, {"order": 2}),
            ("dpmpp_sde", 8, {"order": 2}), ("unipc", 8, {"order": 3, "variant": "bh2"}), ("lcm", 4, {})]



def _open(path, backend, options, **more):
    return load(path, backend=backend, threads=1, **options, **more)


@pytest.mark.parametrize("backend,options,eps_tol,chain_tol", BACKENDS)
def test_fp32_runs_fused_fp16_keeps_the_host_loop(tiny_onnx, tiny_onnx_fp16, backend, options, eps_tol, chain_tol):
    with _open(tiny_onnx, backend, options) as pipe:
        assert pipe.backend.fused_loop
    with _open(tiny_onnx, backend, options, fused_step=False) as pipe:
        assert not pipe.backend.fused_loop
    # fp16: only the host loop checks every step's eps for overflow (the fused loop checks x_0)
    with _open(tiny_onnx_fp16, backend, options) as pipe:
        assert not pipe.backend.fused_loop
        assert np.isfinite(pipe.sample(2, seed=0, sampler="ddim", steps=5, output="float")).all()


@pytest.mark.parametrize("backend,options,eps_tol,chain_tol", BACKENDS)
@pytest.mark.parametrize("sampler,steps,kw", SAMPLERS, ids=[s[0] for s in SAMPLERS])
def test_every_step_is_numpys_step(tiny_onnx, backend, options, eps_tol, chain_tol, sampler, steps, kw):
    """Teacher-forced, so chaos on random weights cannot hide or fake a difference: each step's x_prev and history
    from the engine equal numpy's step on that step's x_t, eps, z and row, and the state is handed on intact."""
    n = 3
    with _open(tiny_onnx, backend, options) as pipe:
        plan = pipe.plan(sampler, steps, **kw)
        x_T, z = request_noise(7, n, pipe.image_shape, plan.steps)
        seen = []
        got = pipe.sample(n, x_T=x_T, step_noise=z, sampler=sampler, steps=steps, **kw, output="float",
                          callback=seen.append)
        again = pipe.sample(n, x_T=x_T, step_noise=z, sampler=sampler, steps=steps, **kw, output="float")
    assert [s.k for s in seen] == list(range(plan.steps))
    tol = FUSED_MULTISTEP_ATOL if plan.uses_history else FUSED_STEP_ATOL
    for s in seen:
        assert s.t == plan.timesteps[s.k]
        if s.k:
            np.testing.assert_array_equal(s.x_t, seen[s.k - 1].x_prev)  # the state is handed on unchanged
        if plan.uses_history:
            want_hist = seen[s.k - 1].hist_out if s.k else np.zeros((n, N_HIST, *pipe.image_shape), np.float32)
            np.testing.assert_array_equal(s.hist, want_hist)
            want_x, want_h = step_with_history(s.x_t, s.model_output, z[s.k], plan.coefs[s.k], s.hist)
            np.testing.assert_allclose(s.hist_out, want_h, rtol=0, atol=tol, err_msg=f"step {s.k}")
        else:
            assert s.hist is None and s.hist_out is None  # as on the host loop
            want_x = step(s.x_t, s.model_output, z[s.k], plan.coefs[s.k])
        np.testing.assert_allclose(s.x_prev, want_x, rtol=0, atol=tol, err_msg=f"step {s.k}")
    np.testing.assert_array_equal(got, seen[-1].x_prev)
    np.testing.assert_array_equal(again, got)  # verification's per-step reads change nothing


@pytest.mark.parametrize("backend,options,eps_tol,chain_tol", BACKENDS)
@pytest.mark.parametrize("model", ["tiny", "lv"])
def test_whole_chain_equals_the_numpy_host_loop(request, backend, options, eps_tol, chain_tol, model):
    """Stochastic DDPM over every step (stable on random weights) and a learned-variance model (sigma from v)."""
    path = request.getfixturevalue({"tiny": "tiny_onnx", "lv": "lv_onnx"}[model])
    with _open(path, backend, options) as fused, _open(path, backend, options, fused_step=False) as host:
        n = fused.backend.max_batch
        want = host.sample(n, seed=3, output="float")
        got = fused.sample(n, seed=3, output="float")
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=chain_tol)


@pytest.mark.parametrize("backend,options,eps_tol,chain_tol", BACKENDS)
def test_eps_is_the_exported_graphs(tiny_onnx, backend, options, eps_tol, chain_tol):
    """eps() runs the fused graph with zero coefficients: the same output as the eps ONNX itself, at any batch,
    before and after chains (which leave other values in the shared buffers)."""
    plain = ort.InferenceSession(tiny_onnx, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    with _open(tiny_onnx, backend, options) as pipe:
        for batch in (1, 3, 4, 1):
            x = rng.standard_normal((batch, 1, 8, 8), dtype=np.float32)
            t = rng.integers(0, TINY_T, batch).astype(np.float32)
            first = pipe.backend.eps(x, t)
            kept = first.copy()
            pipe.sample(batch, seed=batch, sampler="dpmpp", steps=4)
            np.testing.assert_array_equal(first, kept)  # a returned eps is the caller's, not a shared buffer
            np.testing.assert_array_equal(pipe.backend.eps(x, t), first)
            np.testing.assert_allclose(first, plain.run(None, {"x_t": x, "t": t})[0], rtol=0, atol=eps_tol)


@pytest.mark.parametrize("backend,options,eps_tol,chain_tol", BACKENDS)
def test_noise_windows_chunks_and_reuse(tiny_onnx, backend, options, eps_tol, chain_tol, monkeypatch):
    """Noise taken 3 steps at a time, requests chunked 2 + 2 + 1 (two batch sizes, each bound once) and chains run
    back to back: the same images as one window over one request."""
    from ddpm_deploy.runtime import cpu_steps

    with _open(tiny_onnx, backend, options) as pipe:
        want = pipe.sample(5, seed=9, sampler="ddim", steps=10, eta=1.0, output="float", batch_size=2)
        monkeypatch.setattr(cpu_steps, "WINDOW_BYTES", 3 * 2 * 8 * 8 * 4)  # 3 steps of a 2-image chunk
        got = pipe.sample(5, seed=9, sampler="ddim", steps=10, eta=1.0, output="float", batch_size=2)
        other = pipe.sample(5, seed=1, sampler="ddpm", output="float", batch_size=2)
        again = pipe.sample(5, seed=9, sampler="ddim", steps=10, eta=1.0, output="float", batch_size=2)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(again, want)
    assert not np.allclose(other, want)


def _cpu_has_bf16() -> bool:
    if not HAS_OPENVINO:
        return False
    import openvino

    from ddpm_deploy.runtime.backends.openvino_backend import device_supports_bf16

    return device_supports_bf16(openvino.Core(), "CPU")


@pytest.mark.skipif(not _cpu_has_bf16(), reason="needs OpenVINO on a CPU with bf16")
@pytest.mark.parametrize("sampler,steps,kw", [SAMPLERS[0], SAMPLERS[4]], ids=["ddpm", "unipc"])
def test_bf16_runs_the_update_in_fp32(tiny_onnx, sampler, steps, kw):
    """In bf16 only the network may lose precision: OpenVINO keeps the graph's tail after the last convolution in
    fp32, so each step's x_prev is numpy's float32 step on the engine's own (bf16) eps. Were the update run in bf16,
    x_t would lose all but 8 bits of mantissa every step (errors ~1e-2, not ~1e-6)."""
    n = 2
    with _open(tiny_onnx, "openvino", {"cache_dir": "", "precision": "bf16"}) as pipe:
        assert pipe.backend.fused_loop
        plan = pipe.plan(sampler, steps, **kw)
        x_T, z = request_noise(5, n, pipe.image_shape, plan.steps)
        seen = []
        pipe.sample(n, x_T=x_T, step_noise=z, sampler=sampler, steps=steps, **kw, output="float", callback=seen.append)
    for s in seen:
        if plan.uses_history:
            want = step_with_history(s.x_t, s.model_output, z[s.k], plan.coefs[s.k], s.hist)[0]
        else:
            want = step(s.x_t, s.model_output, z[s.k], plan.coefs[s.k])
        np.testing.assert_allclose(s.x_prev, want, rtol=0, atol=FUSED_STEP_ATOL, err_msg=f"step {s.k}")


@pytest.mark.parametrize("backend,options,eps_tol,chain_tol", BACKENDS)
def test_weights_in_an_external_file(tiny_onnx, tmp_path, backend, options, eps_tol, chain_tol):
    """An ONNX whose weights live in a side file (onnx's external data, as large models are saved) builds the same
    fused graph: its weights are read from the file's folder, whatever the working directory."""
    import onnx

    ext = tmp_path / "ext" / "tiny.onnx"
    ext.parent.mkdir()
    onnx.save(onnx.load(tiny_onnx), ext, save_as_external_data=True, all_tensors_to_one_file=True,
              location="tiny.onnx.data", size_threshold=0)
    with _open(str(ext), backend, options) as a, _open(tiny_onnx, backend, options) as b:
        np.testing.assert_array_equal(a.sample(2, seed=4, output="float"), b.sample(2, seed=4, output="float"))


@pytest.mark.parametrize("backend,options,eps_tol,chain_tol", BACKENDS)
def test_serve_batcher_rows_in_the_bound_buffers(tiny_onnx, backend, options, eps_tol, chain_tol):
    """The HTTP batcher on a fused CPU backend: rows of three requests (three samplers, 6 rows for 3 slots, so rows
    give up their slots and come back) live in the engine's bound buffers, and each request's images equal `run`'s."""
    from ddpm_deploy.serve.batcher import StepBatcher
    from ddpm_deploy.tolerances import SERVE_BATCHING_X0_ATOL

    requests = [(3, 1, dict(sampler="ddim", steps=10, eta=1.0)), (2, 2, dict(sampler="dpmpp", steps=6, order=2)),
                (1, 3, dict(sampler="unipc", steps=5, order=3))]
    with _open(tiny_onnx, backend, options) as pipe:
        assert pipe.backend.fused_loop
        batcher = StepBatcher(pipe.backend, max_batch=3)
        if getattr(pipe.backend, "static_shapes", False):  # compiled before the first request, not during it
            assert {1, 2, 3} <= set(pipe.backend.compiled_batches)
        try:
            jobs = [batcher.submit(n, seed, pipe.plan(**kw)) for n, seed, kw in requests]
            results = [job.future.result(timeout=120) for job in jobs]
        finally:
            batcher.close()
        for (n, seed, kw), got in zip(requests, results):
            want = pipe.sample(n, seed=seed, output="float", **kw)
            np.testing.assert_allclose(got, want, rtol=0, atol=SERVE_BATCHING_X0_ATOL)
