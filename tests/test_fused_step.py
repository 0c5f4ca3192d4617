"""The fused reverse-step graph (eps_theta + sampler update in one ONNX) against the eps graph + numpy `step`, and
the IO-binding chain that runs it with x kept in onnxruntime's memory (CPU here; the same code binds CUDA)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from ddpm_deploy.artifact.manifest import Manifest
from ddpm_deploy.errors import NonFiniteError
from ddpm_deploy.loop import run as loop
from ddpm_deploy.loop.run import noise_windows, step_tables, window_steps
from ddpm_deploy.runtime.backends.onnxruntime_iobinding import FusedIOBindingChain
from ddpm_deploy.fused_io import FUSED_INPUTS, FUSED_OUTPUTS
from ddpm_deploy.graph.fused import fused_model
from ddpm_deploy.graph.toposort import toposort
from ddpm_deploy.sampling.noise import ChunkNoise
from ddpm_deploy.fused_io import COL, N_COEFS, N_HIST
from ddpm_deploy.sampling.plan import make_plan
from ddpm_deploy.sampling.step import step
from ddpm_deploy.tolerances import FUSED_CHAIN_ATOL, FUSED_STEP_ATOL

from conftest import TINY_T, fused_sessions


CASES = [  # model, sampler, variance_type, clip_sample, eta
    ("tiny", "ddpm", "fixed_small", True, 0.0),
    ("tiny", "ddpm", "fixed_small", False, 0.0),
    ("tiny", "ddpm", "fixed_large", True, 0.0),
    ("tiny", "ddpm", "fixed_large", False, 0.0),
    ("tiny", "ddim", "fixed_small", True, 0.0),
    ("tiny", "ddim", "fixed_small", False, 0.0),
    ("tiny", "ddim", "fixed_small", True, 1.0),
    ("tiny", "ddim", "fixed_small", False, 1.0),
    ("lv", "ddpm", "learned_range", True, 0.0),
    ("lv", "ddpm", "learned_range", False, 0.0),
    ("lv", "ddim", "learned_range", True, 1.0),
    ("fp16", "ddpm", "fixed_small", True, 0.0),
    ("fp16", "ddim", "fixed_small", False, 1.0),
]


@pytest.mark.parametrize("model,sampler,variance_type,clip,eta", CASES, ids=lambda v: str(v))
def test_fused_step_matches_eps_graph_plus_numpy_step(request, model, sampler, variance_type, clip, eta):
    path = request.getfixturevalue({"tiny": "tiny_onnx", "lv": "lv_onnx", "fp16": "tiny_onnx_fp16"}[model])
    manifest, eps_sess, fused = fused_sessions(path)
    c = manifest.channels
    plan = make_plan(manifest.schedule, sampler, None if sampler == "ddpm" else 10, eta,
                     variance_type=variance_type, clip_sample=clip)
    rng = np.random.default_rng(0)
    clipped = learned = 0
    for k, t in enumerate(plan.timesteps):
        x_t = 2.0 * rng.standard_normal((2, *manifest.image_shape), dtype=np.float32)  # wide: clip engages
        z = rng.standard_normal(x_t.shape, dtype=np.float32)
        t_vec = np.full((2,), t, np.float32)
        out = eps_sess.run(None, {"x_t": x_t, "t": t_vec})[0]
        want = step(x_t, out, z, plan.coefs[k])
        rows = np.repeat(plan.coefs[k].astype(np.float32)[None], 2, axis=0)
        hist = np.zeros((2, N_HIST, *manifest.image_shape), np.float32)
        eps, x_prev, h_out = fused.run(["eps", "x_prev", "hist_out"], {"x_t": x_t, "t": t_vec, "z": z,
                                                                       "coefs": rows, "hist": hist})
        np.testing.assert_allclose(eps, out, rtol=0, atol=FUSED_STEP_ATOL)
        np.testing.assert_allclose(x_prev, want, rtol=0, atol=FUSED_STEP_ATOL, err_msg=f"step {k} t={t}")
        np.testing.assert_array_equal(h_out[:, 0], x_t)  # u_x = 1: the history's last sample is x_t
        a_x, a_e = plan.coefs[k][COL["a_x"]], plan.coefs[k][COL["a_e"]]
        clipped += int((np.abs(a_x * x_t - a_e * out[:, :c]) > 1).any())
        learned += int(out.shape[1] == 2 * c and plan.coefs[k][COL["s_log"]] != 0)
    assert not clip or clipped, "the clip branch was never exercised"
    assert (learned > 0) == plan.learned_variance, "learned-variance sigma exercised exactly when the plan has it"


def test_fused_graph_io(tiny_onnx, lv_onnx):
    for path, out_c in ((tiny_onnx, 1), (lv_onnx, 2)):
        m = fused_model(path, Manifest.read(path))
        assert tuple(i.name for i in m.graph.input) == FUSED_INPUTS == ("x_t", "t", "z", "coefs", "hist")
        assert tuple(o.name for o in m.graph.output) == FUSED_OUTPUTS == ("eps", "x_prev", "hist_out", "nonfinite")
        assert m.graph.output[0].type.tensor_type.shape.dim[1].dim_value == out_c


def test_toposort_makes_fp16_export_checkable(tiny_onnx, tiny_onnx_fp16):
    fp32 = onnx.load(tiny_onnx)
    before = [n.name for n in fp32.graph.node]
    assert toposort(fp32) == 0 and [n.name for n in fp32.graph.node] == before  # sorted graphs stay as they are
    fp16 = onnx.load(tiny_onnx_fp16)
    names = sorted(n.name for n in fp16.graph.node)
    toposort(fp16)
    onnx.checker.check_model(fp16)  # the float16 converter leaves its input Casts last; sorted, it passes
    assert sorted(n.name for n in fp16.graph.node) == names


def test_fused_graph_of_an_edited_eps_graph(tiny_onnx):
    """An eps graph that already uses a name the fused graph adds (here an edit left an inner tensor "eps" and renamed
    the output) still fuses: the inner tensor is renamed, and the fused eps is the graph's output."""
    from onnx import helper

    m = onnx.load(tiny_onnx)
    g = m.graph
    g.node.append(helper.make_node("Identity", [g.output[0].name], ["eps_edited"]))
    g.output[0].name = "eps_edited"
    manifest, eps_sess, _ = fused_sessions(tiny_onnx)
    fused = fused_model(m, manifest)
    onnx.checker.check_model(fused)
    sess = ort.InferenceSession(fused.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((2, 1, 8, 8), dtype=np.float32)
    t = np.array([4, 30], np.float32)
    zeros = {"z": np.zeros_like(x), "coefs": np.zeros((2, N_COEFS), np.float32),
             "hist": np.zeros((2, N_HIST, 1, 8, 8), np.float32)}
    eps = sess.run(["eps"], {"x_t": x, "t": t, **zeros})[0]
    np.testing.assert_array_equal(eps, eps_sess.run(None, {"x_t": x, "t": t})[0])


def test_step_tables_and_noise_windows():
    plan = make_plan(_manifest_stub().schedule, "ddim", 7, 1.0)
    t, coefs = step_tables(plan, 3)
    assert t.dtype == coefs.dtype == np.float32 and t.shape == (7, 3) and coefs.shape == (7, 3, N_COEFS)
    assert (t == plan.timesteps[:, None]).all() and (coefs == plan.coefs.astype(np.float32)[:, None]).all()
    assert window_steps(7, 100, 1000) == 7 and window_steps(7, 100, 250) == 2 and window_steps(7, 100, 10) == 1
    whole = ChunkNoise((1, 4, 4), 2, 3, seed=5).all_z(7)
    for window in (1, 3, 7):
        parts = list(noise_windows(ChunkNoise((1, 4, 4), 2, 3, seed=5), 7, window))
        assert [p[:2] for p in parts] == [(k, min(7, k + window)) for k in range(0, 7, window)]
        assert np.array_equal(np.concatenate([p[2] for p in parts]), whole)  # same seeded streams, same order


def _manifest_stub():
    from ddpm_deploy.sampling.schedule import Schedule

    return Manifest(channels=1, height=4, width=4, out_channels=1, schedule=Schedule.build("linear", TINY_T))


def _host_chain(path, sampler, eta, n=3, seed=1):
    from ddpm_deploy.runtime import load

    with load(path, backend="onnxruntime", threads=1, fused_step=False) as pipe:  # the numpy host loop
        plan = pipe.plan(sampler, None if sampler == "ddpm" else 10, eta)
        return plan, pipe.backend.run_chain(ChunkNoise(pipe.image_shape, 0, n, seed=seed), plan)


@pytest.mark.parametrize("model,sampler,eta", [("tiny", "ddpm", 0.0), ("tiny", "ddim", 1.0), ("lv", "ddpm", 0.0)])
def test_io_binding_chain_matches_host_loop(request, model, sampler, eta):
    path = request.getfixturevalue({"tiny": "tiny_onnx", "lv": "lv_onnx"}[model])
    manifest, eps_sess, fused = fused_sessions(path)
    n = min(3, manifest.max_batch)
    plan, want = _host_chain(path, sampler, eta, n)
    shape = manifest.image_shape
    chain = FusedIOBindingChain(fused, manifest, device="cpu", name="onnxruntime-fused-cpu")
    noise = ChunkNoise(shape, 0, n, seed=1)
    x_T = noise.x_T.copy()
    fast = loop.run_chain(chain, manifest, noise, plan)
    assert np.array_equal(noise.x_T, x_T), "the chain must not write into the caller's x_T"
    np.testing.assert_allclose(fast, want, rtol=0, atol=FUSED_CHAIN_ATOL)

    z_all = ChunkNoise(shape, 0, n, seed=1).all_z(plan.steps)
    seen = []

    def check(info):  # every step: eps as the eps graph gives it, x_prev as numpy's step
        k, t, x_t, out, x_prev = info[:5]
        assert info.hist is None and info.hist_out is None  # history-free plans carry none
        assert t == plan.timesteps[k]
        ref = eps_sess.run(None, {"x_t": x_t, "t": np.full((n,), t, np.float32)})[0]
        np.testing.assert_allclose(out, ref, rtol=0, atol=FUSED_STEP_ATOL)
        np.testing.assert_allclose(x_prev, step(x_t, out, z_all[k], plan.coefs[k]), rtol=0, atol=FUSED_STEP_ATOL)
        seen.append(k)

    slow = loop.run_chain(chain, manifest, ChunkNoise(shape, 0, n, seed=1), plan, callback=check)
    assert seen == list(range(plan.steps))
    assert np.array_equal(slow, fast)  # same graph, same inputs: the verification path changes nothing
    chain.noise_window_bytes = 3 * fast[0].nbytes * n  # 3 steps of noise per upload
    assert np.array_equal(loop.run_chain(chain, manifest, ChunkNoise(shape, 0, n, seed=1), plan), fast)


def test_io_binding_chain_eps_and_nonfinite(tiny_onnx):
    manifest, eps_sess, fused = fused_sessions(tiny_onnx)
    chain = FusedIOBindingChain(fused, manifest, device="cpu", name="onnxruntime-fused-cpu")
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8), dtype=np.float32)
    t = np.array([3, 40], np.float32)
    assert np.array_equal(loop.eps(chain, manifest, x, t), eps_sess.run(None, {"x_t": x, "t": t})[0])
    plan = make_plan(manifest.schedule, "ddim", 5)
    bad = ChunkNoise((1, 8, 8), 0, 2, x_T=np.full((2, 1, 8, 8), np.nan, np.float32),
                     step_noise=np.zeros((5, 2, 1, 8, 8), np.float32))
    with pytest.raises(NonFiniteError, match="onnxruntime-fused-cpu"):
        loop.run_chain(chain, manifest, bad, plan)
    with pytest.raises(NonFiniteError, match=r"step 0 .*onnxruntime-fused-cpu"):
        loop.run_chain(chain, manifest, bad, plan, callback=lambda *a: None)


def _random_rows(rng, n):
    """Rows with every coefficient in play (a finite clip that engages, nonzero history and corrector terms)."""
    rows = rng.uniform(-1.0, 1.0, (n, N_COEFS)).astype(np.float32)
    rows[:, COL["a_x"]] = rng.uniform(1.0, 3.0, n)
    rows[:, COL["clip"]] = rng.uniform(0.5, 1.5, n)
    rows[:, COL["s_min"]] = rng.uniform(0.0, 0.5, n)
    rows[:, COL["s_log"]] = rng.uniform(0.0, 0.5, n)
    return rows


@pytest.mark.parametrize("model", ["tiny", "lv"])
def test_fused_step_with_history_and_per_image_rows(request, model):
    """Every column of the v2 row, per-image rows and a nonzero history: fused graph == numpy step_with_history,
    and `step` (no history) == step_with_history on a zero history."""
    from ddpm_deploy.sampling.step import step_with_history

    manifest, eps_sess, fused = fused_sessions(request.getfixturevalue({"tiny": "tiny_onnx", "lv": "lv_onnx"}[model]))
    rng = np.random.default_rng(3)
    b, shape = 2, manifest.image_shape
    for t in (3, 27, 49):
        x_t = 2.0 * rng.standard_normal((b, *shape), dtype=np.float32)
        z = rng.standard_normal(x_t.shape, dtype=np.float32)
        hist = rng.standard_normal((b, N_HIST, *shape), dtype=np.float32)
        rows = _random_rows(rng, b)
        t_vec = np.array([t, t // 2], np.float32)  # rows of one batch at different steps
        out = eps_sess.run(None, {"x_t": x_t, "t": t_vec})[0]
        want, want_h = step_with_history(x_t, out, z, rows, hist)
        eps, x_prev, h_out, nonfinite = fused.run(None, {"x_t": x_t, "t": t_vec, "z": z, "coefs": rows,
                                                         "hist": hist})
        np.testing.assert_array_equal(nonfinite, np.zeros(b, np.float32))  # a finite step flags nothing
        np.testing.assert_allclose(x_prev, want, rtol=0, atol=FUSED_STEP_ATOL)
        np.testing.assert_allclose(h_out, want_h, rtol=0, atol=FUSED_STEP_ATOL)
        np.testing.assert_array_equal(h_out[:, 2:], hist[:, 1:3])  # the history shifts by one slot
        per_image = [step_with_history(x_t[i:i + 1], out[i:i + 1], z[i:i + 1], rows[i], hist[i:i + 1])[0]
                     for i in range(b)]  # a (B, 16) table is B independent rows
        np.testing.assert_allclose(np.concatenate(per_image), want, rtol=0, atol=1e-6)
        zero = np.zeros_like(hist)
        np.testing.assert_allclose(step(x_t, out, z, rows), step_with_history(x_t, out, z, rows, zero)[0],
                                   rtol=0, atol=1e-6)
