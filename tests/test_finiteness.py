"""A non-finite value never becomes an image (issue 21 item 9), on every backend available here.

The attack: a value goes non-finite in the x_0-prediction, before its clip. OpenVINO's Min/Max (and every
backend's for +-inf) turn it into the clip bound, so x_prev stays finite and the chain used to write an image.
Each backend must refuse instead, in one line naming the first failing step (index k and timestep t); a plan whose
coefficients are non-finite in float32 is refused before the first step.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ddpm_deploy.errors import NonFiniteError, UserError
from ddpm_deploy.artifact.manifest import Manifest
from ddpm_deploy.sampling.noise import ChunkNoise
from ddpm_deploy.fused_io import COL
from ddpm_deploy.sampling.plan import SamplingPlan, make_plan

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
# float32-finite, but |HUGE * x| overflows for |x| > 1.14: the x_0-prediction a_x x_t - a_e eps goes to +-inf
# (a_x alone) or NaN (a_x and a_e: inf - inf) on some pixels, and the clip that follows hides it.
HUGE = 3e38
BAD_STEP = 3


def _openvino_bf16_reason() -> str | None:
    if not HAS_OPENVINO:
        return "openvino is not installed"
    import openvino as ov

    from ddpm_deploy.runtime.backends.openvino_backend import device_supports_bf16

    core = ov.Core()
    if not device_supports_bf16(core, "CPU"):
        caps = ", ".join(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        return f"this CPU has no bf16 (OpenVINO reports {caps})"
    return None


BF16_SKIP = _openvino_bf16_reason()
BACKENDS = [
    "onnxruntime-fused",
    "onnxruntime-host-loop",
    "onnxruntime-iobinding",
    "onnxruntime-fp16-host-loop",
    pytest.param("openvino-fp32", marks=pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed")),
    pytest.param("openvino-bf16", marks=pytest.mark.skipif(BF16_SKIP is not None, reason=BF16_SKIP or "")),
]



def open_backend(kind: str, path: str, fp16_path: str | None = None):
    """The backend object (run_chain, engine_time, close) for one of BACKENDS on the ONNX at `path`."""
    from ddpm_deploy.runtime import load

    if kind == "onnxruntime-fused":
        backend = load(path, backend="onnxruntime", threads=1).backend
        assert backend.fused_loop
        return backend
    if kind == "onnxruntime-host-loop":
        backend = load(path, backend="onnxruntime", threads=1, fused_step=False).backend
        assert not backend.fused_loop
        return backend
    if kind == "onnxruntime-fp16-host-loop":
        backend = load(fp16_path, backend="onnxruntime", threads=1).backend
        assert not backend.fused_loop  # fp16 files always take the numpy host loop
        return backend
    if kind == "onnxruntime-iobinding":  # the device-resident chain, bound to host memory ("cpu")
        import onnxruntime as ort

        from ddpm_deploy.runtime.backends.onnxruntime_iobinding import FusedIOBindingChain, fused_model_bytes

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        manifest = Manifest.read(path)
        session = ort.InferenceSession(fused_model_bytes(path, manifest), opts, providers=["CPUExecutionProvider"])
        from ddpm_deploy.loop.run import Backend

        backend = Backend()  # the loop's backend around it: eps, run_chain and engine time as every backend has
        backend.name, backend.manifest, backend.max_batch = "onnxruntime-iobinding", manifest, manifest.max_batch
        backend.steps = FusedIOBindingChain(session, manifest, device="cpu", name="onnxruntime-iobinding")
        return backend
    precision = kind.split("-")[1]
    backend = load(path, backend="openvino", threads=1, cache_dir="", precision=precision).backend
    assert backend.fused_loop
    return backend


def ddim_plan(manifest: Manifest, steps: int = 6) -> SamplingPlan:
    return make_plan(manifest.schedule, "ddim", steps, 0.0, **manifest.sampling_options)


def with_coefs(plan: SamplingPlan, k: int, **values: float) -> SamplingPlan:
    coefs = plan.coefs.copy()
    for name, value in values.items():
        coefs[k, COL[name]] = value
    return SamplingPlan(plan.sampler, plan.timesteps, coefs, plan.eta, plan.learned_variance)


def _run(backend, plan, n: int = 2, seed: int = 0):
    return backend.run_chain(ChunkNoise(backend.manifest.image_shape, 0, n, seed=seed), plan)


def _assert_names_step(err: pytest.ExceptionInfo, plan: SamplingPlan, k: int) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    assert f"step {k} (t={int(plan.timesteps[k])})" in msg, msg
    return msg


def inject_eps_onnx(path: str, out: str, t_bad: int, value: float) -> str:
    """The eps ONNX at `path` with `value` added to its output for every image at timestep `t_bad` (manifest kept)."""
    m = onnx.load(path)
    g = m.graph
    y = g.output[0].name
    assert g.output[0].type.tensor_type.elem_type == TensorProto.FLOAT  # fp16 files keep fp32 IO
    for node in g.node:
        node.output[:] = [f"{y}__raw" if o == y else o for o in node.output]
    g.initializer.extend([numpy_helper.from_array(np.array(t_bad, np.float32), "inject/t_bad"),
                          numpy_helper.from_array(np.array(value, np.float32), "inject/value"),
                          numpy_helper.from_array(np.array(0.0, np.float32), "inject/zero"),
                          numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "inject/shape")])
    g.node.extend([helper.make_node("Equal", ["t", "inject/t_bad"], ["inject/hit"]),
                   helper.make_node("Where", ["inject/hit", "inject/value", "inject/zero"], ["inject/add"]),
                   helper.make_node("Reshape", ["inject/add", "inject/shape"], ["inject/add4"]),
                   helper.make_node("Add", [f"{y}__raw", "inject/add4"], [y])])
    onnx.checker.check_model(m)
    onnx.save(m, out)
    return out


def overflow_attack(plan: SamplingPlan, attack: str) -> SamplingPlan:
    """`plan` made to overflow the x_0-prediction a_x x_t - a_e eps at BAD_STEP, with eps shifted by +4 there
    (inject_eps_onnx: the tiny model's own eps stays below 1 in size). "inf": a_e = HUGE, so x_0 = -inf on every
    pixel, which min/max clamp to the bound by IEEE rules on every engine. "nan": x_t scaled by 10 one step before
    (a finite step) and a_x = a_e = HUGE, so inf - inf = NaN where x_t > 1.14, which OpenVINO's Min/Max clamp.
    Every coefficient stays finite in float32, and so do eps, z and x_prev of every step: only the clip hides it."""
    coefs = plan.coefs.copy()
    coefs[BAD_STEP, COL["a_e"]] = HUGE
    if attack == "nan":
        coefs[BAD_STEP, COL["a_x"]] = HUGE
        coefs[BAD_STEP - 1, [COL["p_0"], COL["c_e"]]] *= 10  # DDIM: x_prev = p_0 m + c_e eps + sigma z
        coefs[BAD_STEP - 1, COL["s_min"]] = 0.0
    bad = SamplingPlan(plan.sampler, plan.timesteps, coefs, plan.eta, plan.learned_variance)
    assert np.isfinite(bad.coefs.astype(np.float32)).all()
    return bad


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("attack", ["inf", "nan"])
def test_overflowing_x0_prediction_is_refused_at_its_step(tiny_onnx, tiny_onnx_fp16, tmp_path, kind, attack):
    """Fails on the old main for every backend: the clip hid the non-finite x_0-prediction and an image came out."""
    plan = ddim_plan(Manifest.read(tiny_onnx))
    t_bad = int(plan.timesteps[BAD_STEP])
    paths = {k: inject_eps_onnx(p, str(tmp_path / f"{k}.onnx"), t_bad, 4.0)
             for k, p in (("fp32", tiny_onnx), ("fp16", tiny_onnx_fp16))}
    backend = open_backend(kind, paths["fp32"], paths["fp16"])
    try:
        assert np.isfinite(_run(backend, plan)).all()  # the same model and chain without the attack are fine
        bad = overflow_attack(plan, attack)
        with pytest.raises(NonFiniteError) as err:
            _run(backend, bad)
        _assert_names_step(err, bad, BAD_STEP)
    finally:
        backend.close()


@pytest.mark.parametrize("kind", [k for k in BACKENDS if not (isinstance(k, str) and "fp16" in k)])
def test_nan_eps_names_the_first_failing_step(tiny_onnx, tmp_path, kind):
    """An eps graph that returns NaN at one timestep: every later step is NaN too (x_t is), but the refusal names
    the first one, not "after N steps"."""
    plan = ddim_plan(Manifest.read(tiny_onnx))
    path = inject_eps_onnx(tiny_onnx, str(tmp_path / "nan.onnx"), int(plan.timesteps[BAD_STEP]), np.nan)
    backend = open_backend(kind, path)
    try:
        with pytest.raises(NonFiniteError) as err:
            _run(backend, plan)
        _assert_names_step(err, plan, BAD_STEP)
    finally:
        backend.close()


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("value", [np.inf, np.nan, 1e39], ids=["inf", "nan", "float32-overflow"])
def test_nonfinite_plan_is_refused_before_the_first_step(tiny_onnx, tiny_onnx_fp16, kind, value):
    """A coefficient that is not finite in float32 (1e39 is finite in float64 only): one line naming it and its
    step, and the engine never ran."""
    backend = open_backend(kind, tiny_onnx, tiny_onnx_fp16)
    try:
        bad = with_coefs(ddim_plan(backend.manifest), 2, p_0=value)
        calls = backend.engine_time.count
        with pytest.raises(UserError) as err:
            _run(backend, bad)
        msg = _assert_names_step(err, bad, 2)
        assert "p_0" in msg and "non-finite" in msg, msg
        assert backend.engine_time.count == calls, "refused after the engine ran"
    finally:
        backend.close()


def test_flag_output_per_row_before_the_clip(tiny_onnx, tmp_path):
    """The fused graph's `nonfinite` output flags exactly the rows whose step went non-finite, including a
    x_0-prediction the clip turned finite; on onnxruntime and (when installed) OpenVINO fp32."""
    from ddpm_deploy.graph.fused import fused_model
    from ddpm_deploy.fused_io import N_COEFS, N_HIST

    manifest = Manifest.read(tiny_onnx)
    plan = ddim_plan(manifest)
    rng = np.random.default_rng(0)
    B = 3
    coefs = np.repeat(plan.coefs[1].astype(np.float32)[None], B, axis=0)
    coefs[1, COL["a_x"]] = HUGE  # row 1: x_0-prediction overflows; rows 0 and 2 are fine
    feeds = {"x_t": 2 * rng.standard_normal((B, *manifest.image_shape), dtype=np.float32),
             "t": np.full((B,), plan.timesteps[1], np.float32), "coefs": coefs,
             "z": rng.standard_normal((B, *manifest.image_shape), dtype=np.float32),
             "hist": np.zeros((B, N_HIST, *manifest.image_shape), np.float32)}
    assert coefs.shape == (B, N_COEFS)
    model = fused_model(tiny_onnx, manifest)
    runs = {}
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    runs["onnxruntime"] = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    if HAS_OPENVINO:
        import openvino as ov

        onnx.save(model, tmp_path / "fused.onnx")
        core = ov.Core()
        compiled = core.compile_model(core.read_model(tmp_path / "fused.onnx"), "CPU",
                                      {"INFERENCE_PRECISION_HINT": "f32"})
        res = compiled(feeds)
        runs["openvino"] = {name: res[compiled.output(name)] for name in ("x_prev", "nonfinite")}
    for name, out in runs.items():
        assert np.isfinite(out["x_prev"]).all(), name  # the clip hid it: x_prev alone cannot tell
        np.testing.assert_array_equal(out["nonfinite"], [0, 1, 0], err_msg=name)


@pytest.mark.parametrize("attack", ["inf", "nan"])
def test_server_batcher_refuses_overflowing_x0_prediction(tiny_onnx, tmp_path, attack):
    """The HTTP server's step batcher runs the numpy step itself: the same attack must fail the request naming the
    step (it used to clip the inf into an image), and a non-finite plan is refused at submit, before any step."""
    from ddpm_deploy.runtime import load
    from ddpm_deploy.serve.batcher import StepBatcher

    plan = ddim_plan(Manifest.read(tiny_onnx))
    path = inject_eps_onnx(tiny_onnx, str(tmp_path / "inj.onnx"), int(plan.timesteps[BAD_STEP]), 4.0)
    pipe = load(path, backend="onnxruntime", threads=1)
    batcher = StepBatcher(pipe.backend, max_batch=2)
    try:
        assert np.isfinite(batcher.submit(2, 0, plan).future.result(timeout=60)).all()
        bad = overflow_attack(plan, attack)
        with pytest.raises(NonFiniteError) as err:
            batcher.submit(2, 0, bad).future.result(timeout=60)
        _assert_names_step(err, bad, BAD_STEP)
        with pytest.raises(UserError) as err:
            batcher.submit(1, 0, with_coefs(plan, 2, p_0=np.inf))
        _assert_names_step(err, plan, 2)
    finally:
        batcher.close()
        pipe.close()


def test_the_refusal_advises_for_the_backend_that_failed():
    """The tour's refusal on OpenVINO bf16 (session 6) advised an fp16 re-export, which does not apply there."""
    from ddpm_deploy.loop.checks import check_step_flags

    flags = np.array([[0, 0], [0, 1]], np.uint8)
    with pytest.raises(NonFiniteError, match=r"step 1 \(t=7\) on backend openvino-bf16 \(image 1 .*--precision fp32"):
        check_step_flags(flags, [9, 7], "openvino-bf16")
    with pytest.raises(NonFiniteError, match=r"export --fp16"):
        check_step_flags(flags, [9, 7], "onnxruntime-cpu")
