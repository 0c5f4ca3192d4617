"""Fast samplers (issue 13): DPM-Solver++ (order 1-3, SDE order 1-2) and UniPC (bh1/bh2, order 1-3) as plan tables.

- teacher-forced single steps (diffusers' state in: x_t and its history, one step out) against diffusers'
  DPMSolverMultistepScheduler / UniPCMultistepScheduler on a tiny random UNet, every sampler/order/variant/spacing;
- whole chains from the same x_T (and per-step noise for the SDE) on the shipped digits model re-saved as a
  diffusers folder: diffusers' scheduler driving the PyTorch UNet vs our PyTorch reference and onnxruntime;
- the fused step graph against the numpy step along real multistep chains, and the IO-binding chain;
- bad input, and the fp16 audit sampling the named sampler's trajectory.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import assert_fused_walk_matches_numpy, assert_one_line_error, cli, fused_sessions

from ddpm_deploy.fused_io import N_HIST
from ddpm_deploy.sampling.plan import make_plan
from ddpm_deploy.sampling.step import step_with_history
from ddpm_deploy.tolerances import FAST_SAMPLER_CHAIN_X0_MAX_ABS, FAST_SAMPLER_STEP_ATOL, FUSED_CHAIN_ATOL

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

CONFIGS = [  # sampler, order, variant
    ("dpmpp", 1, None), ("dpmpp", 2, None), ("dpmpp", 3, None),
    ("dpmpp_sde", 1, None), ("dpmpp_sde", 2, None),
    ("unipc", 1, "bh1"), ("unipc", 2, "bh1"), ("unipc", 3, "bh1"),
    ("unipc", 1, "bh2"), ("unipc", 2, "bh2"), ("unipc", 3, "bh2"),
]
SPACINGS = ("linspace", "leading", "trailing")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def diffusers_scheduler(schedule, sampler, order, variant, spacing, float64_tables=False, prediction_type="epsilon"):
    """diffusers' scheduler for one of our samplers, on the schedule's betas, at its defaults otherwise."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    kw = {"num_train_timesteps": schedule.T, "trained_betas": np.asarray(schedule.betas), "solver_order": order,
          "timestep_spacing": spacing, "prediction_type": prediction_type}
    if sampler == "unipc":
        s = UniPCMultistepScheduler(solver_type=variant, **kw)
    else:
        s = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++" if sampler == "dpmpp_sde" else "dpmsolver++",
                                        **kw)
    if float64_tables:  # its sigmas then come from our float64 a-bar (still rounded to float32 by set_timesteps)
        s.alphas_cumprod = torch.from_numpy(np.asarray(schedule.alphas_cumprod))
    return s


def _finite_last_step(sched, prev: torch.Tensor, last: bool) -> torch.Tensor:
    """diffusers' UniPC bh1 returns NaN on the step to sigma = 0 (final_sigmas_type="zero"): B(h) = h = -inf
    multiplies a zero correction (-inf * 0). The step's limit, which our table holds, is the x_0-prediction m_k
    that diffusers keeps in model_outputs[-1]; only that case is replaced, and only there."""
    if last and torch.isnan(prev).any():
        assert isinstance(sched, diffusers.UniPCMultistepScheduler) and sched.config.solver_type == "bh1"
        assert torch.isnan(prev).all()
        return sched.model_outputs[-1]
    return prev


def _history(sched, like: torch.Tensor) -> np.ndarray:
    """diffusers' multistep state as our history (B, 4, C, H, W): [last_sample, m_1, m_2, m_3]."""
    zero = torch.zeros_like(like)
    past = [m if m is not None else zero for m in sched.model_outputs][::-1] + [zero] * 3
    last = getattr(sched, "last_sample", None)
    slots = [zero if last is None else last] + past[:3]
    return torch.stack(slots, dim=1).numpy().astype(np.float32)


@pytest.fixture(scope="module")
def tiny_unet(tiny_ckpt):
    from ddpm_deploy.nn import load_checkpoint

    ckpt = load_checkpoint(tiny_ckpt)
    return ckpt, ckpt.build_unet().eval()


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("sampler,order,variant", CONFIGS, ids=lambda v: str(v))
def test_teacher_forced_steps_match_diffusers(tiny_unet, sampler, order, variant, prediction_type):
    """Every step of diffusers' own chain: its x_t and history into our table's step, one step out, against its
    prev_sample and its new state; K = 3 and 8 (lower_order_final's < 15 branch) and 16, every spacing; the
    network's output read as eps, v or x_0 (diffusers' prediction_type; the tiny UNet is untrained, so one output
    serves all three)."""
    ckpt, unet = tiny_unet
    g = torch.Generator().manual_seed(0)
    for spacing in SPACINGS:
        for K in (3, 8, 16):
            plan = make_plan(ckpt.schedule, sampler, K, order=order, variant=variant, spacing=spacing,
                             prediction_type=prediction_type)
            sched = diffusers_scheduler(ckpt.schedule, sampler, order, variant or "bh2", spacing,
                                        prediction_type=prediction_type)
            sched.set_timesteps(K)
            assert np.array_equal(sched.timesteps.numpy(), plan.timesteps), (spacing, K)
            x = torch.randn(2, 1, 8, 8, generator=g)
            for k, t in enumerate(sched.timesteps):
                hist = _history(sched, x)
                with torch.no_grad():
                    eps = unet(x, t).sample
                z = torch.randn(x.shape, generator=g)
                extra = {"variance_noise": z} if sampler == "dpmpp_sde" else {}
                prev = _finite_last_step(sched, sched.step(eps, t, x, **extra).prev_sample, k == K - 1)
                ours, h_out = step_with_history(x.numpy(), eps.numpy(), z.numpy(), plan.coefs[k], hist)
                where = f"{spacing} K={K} step {k} t={int(t)}"
                np.testing.assert_allclose(ours, prev.numpy(), rtol=0, atol=FAST_SAMPLER_STEP_ATOL, err_msg=where)
                np.testing.assert_allclose(h_out[:, 1], sched.model_outputs[-1].numpy(), rtol=0,
                                           atol=FAST_SAMPLER_STEP_ATOL, err_msg=where)  # m_k, as diffusers keeps it
                if sampler == "unipc":  # the corrected sample the next corrector starts from
                    np.testing.assert_allclose(h_out[:, 0], sched.last_sample.numpy(), rtol=0,
                                               atol=FAST_SAMPLER_STEP_ATOL, err_msg=where)
                x = prev
            assert plan.coefs[-1][12] == 1.0 and plan.coefs[-1][11] == 0.0  # last step: x_0 = m (sigma 0)


def test_learned_variance_channels_are_dropped(tiny_unet):
    """A 2C-channel output (eps, v) gives the same step as eps alone: the solvers' noise is the schedule's."""
    ckpt, _ = tiny_unet
    rng = np.random.default_rng(0)
    x, eps, v, z = (rng.standard_normal((2, 1, 8, 8), dtype=np.float32) for _ in range(4))
    hist = rng.standard_normal((2, N_HIST, 1, 8, 8), dtype=np.float32)
    for sampler in ("dpmpp", "dpmpp_sde", "unipc"):
        plan = make_plan(ckpt.schedule, sampler, 6, variance_type="learned_range")
        assert not plan.learned_variance
        for k in range(plan.steps):
            a = step_with_history(x, np.concatenate([eps, v], axis=1), z, plan.coefs[k], hist)
            b = step_with_history(x, eps, z, plan.coefs[k], hist)
            assert all(np.array_equal(p, q) for p, q in zip(a, b))


def test_orders_drop_and_plans_are_well_formed(tiny_unet):
    ckpt, _ = tiny_unet
    # few steps with a high order is legal: the order drops (warm-up and lower_order_final), as in diffusers
    for sampler in ("dpmpp", "unipc"):
        plan = make_plan(ckpt.schedule, sampler, 2, order=3)
        assert plan.steps == 2 and np.isfinite(plan.coefs).all() and not plan.coefs[:, 14].any()  # no p_2 term
    assert make_plan(ckpt.schedule, "dpmpp", 6, order=3).coefs[2, 14] != 0  # third order in the middle
    assert make_plan(ckpt.schedule, "unipc").steps == 20 and make_plan(ckpt.schedule, "unipc").variant == "bh2"
    assert make_plan(ckpt.schedule, "dpmpp").order == 2 and make_plan(ckpt.schedule, "dpmpp").spacing == "linspace"
    assert not make_plan(ckpt.schedule, "ddim", 10).uses_history and make_plan(ckpt.schedule, "dpmpp", 10).uses_history
    sde = make_plan(ckpt.schedule, "dpmpp_sde", 10)
    assert sde.stochastic and not make_plan(ckpt.schedule, "dpmpp", 10).stochastic


# -- whole chains on the shipped model ------------------------------------------------------------------------

DIGITS_N = 2
CHAIN_CASES = [  # (sampler, order, variant, spacing, steps): every sampler/order/variant at some K, K in 5..50
    ("dpmpp", 1, None, "linspace", 10), ("dpmpp", 2, None, "linspace", 5), ("dpmpp", 2, None, "leading", 20),
    ("dpmpp", 2, None, "linspace", 50), ("dpmpp", 3, None, "trailing", 10), ("dpmpp", 3, None, "linspace", 20),
    ("dpmpp_sde", 1, None, "linspace", 5), ("dpmpp_sde", 2, None, "linspace", 20),
    ("dpmpp_sde", 2, None, "trailing", 50),
    ("unipc", 1, "bh2", "linspace", 20), ("unipc", 2, "bh2", "linspace", 10), ("unipc", 2, "bh2", "linspace", 50),
    ("unipc", 3, "bh2", "leading", 5), ("unipc", 2, "bh1", "trailing", 20), ("unipc", 3, "bh1", "linspace", 10),
    ("unipc", 1, "bh1", "leading", 50),
]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The shipped model three ways: a diffusers UNet folder, the PyTorch reference on it, and its fp32 ONNX."""
    from ddpm_deploy.export import onnx_from_checkpoint
    from ddpm_deploy.nn import load_checkpoint

    folder = tmp_path_factory.mktemp("digits") / "unet"
    ckpt = load_checkpoint("digits")
    unet = ckpt.build_unet().eval()
    unet.save_pretrained(folder)
    onnx_path = folder.parent / "digits.onnx"
    onnx_from_checkpoint("digits", onnx_path, max_batch=DIGITS_N, echo=lambda *_: None)
    return ckpt, unet, str(folder), str(onnx_path)


def _diffusers_chain(unet, sched, x_T, z, sde: bool):
    x = torch.from_numpy(x_T)
    for k, t in enumerate(sched.timesteps):
        with torch.no_grad():
            eps = unet(x, t).sample
        extra = {"variance_noise": torch.from_numpy(z[k])} if sde else {}
        x = _finite_last_step(sched, sched.step(eps, t, x, **extra).prev_sample, k == len(sched.timesteps) - 1)
    return x.numpy()


@pytest.fixture(scope="module")
def digits_pipes(digits):
    from ddpm_deploy.app.opener import open_pipeline

    ckpt, unet, folder, onnx_path = digits
    with open_pipeline(folder, backend="torch", threads=1) as ref, open_pipeline(onnx_path, backend="onnxruntime",
                                                                                 threads=1) as ort:
        assert ref.backend.name.startswith("torch") and "onnxruntime" in ort.backend.name
        yield ref, ort


@pytest.mark.parametrize("sampler,order,variant,spacing,steps", CHAIN_CASES, ids=lambda v: str(v))
def test_whole_chain_matches_diffusers_on_digits(digits, digits_pipes, sampler, order, variant, spacing, steps):
    """Final x_0 from the same x_T (and step noise) within 1e-3 of diffusers' scheduler driving the same UNet, on
    the PyTorch reference and on onnxruntime."""
    from ddpm_deploy.sampling.noise import request_noise

    ckpt, unet, _, _ = digits
    x_T, z = request_noise(7, DIGITS_N, (1, 16, 16), steps)
    sched = diffusers_scheduler(ckpt.schedule, sampler, order, variant or "bh2", spacing)
    sched.set_timesteps(steps)
    want = _diffusers_chain(unet, sched, x_T, z, sde=sampler == "dpmpp_sde")
    assert np.isfinite(want).all() and np.abs(want).max() < 3  # a trained model lands near the data range
    opts = {"sampler": sampler, "steps": steps, "order": order, "variant": variant, "spacing": spacing}
    for pipe in digits_pipes:
        got = pipe.sample(DIGITS_N, x_T=x_T, step_noise=z, output="float", **opts)
        err = float(np.abs(got - want).max())
        assert err <= FAST_SAMPLER_CHAIN_X0_MAX_ABS, (pipe.backend.name, err)


def test_openvino_runs_the_multistep_samplers(tiny_onnx):
    pytest.importorskip("openvino")
    from ddpm_deploy.runtime import load
    from ddpm_deploy.tolerances import OPENVINO_FP32_X0_MAX_ABS

    with load(tiny_onnx, backend="onnxruntime", threads=1) as ort, load(tiny_onnx, backend="openvino",
                                                                        threads=1) as ov:
        for opts in ({"sampler": "unipc", "order": 3}, {"sampler": "dpmpp_sde"}):
            a = ort.sample(2, seed=3, steps=8, output="float", **opts)
            b = ov.sample(2, seed=3, steps=8, output="float", **opts)
            assert np.abs(a - b).max() <= OPENVINO_FP32_X0_MAX_ABS


# -- the fused step graph ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler,order,variant", CONFIGS, ids=lambda v: str(v))
def test_fused_graph_matches_numpy_step(tiny_onnx, sampler, order, variant):
    """Along a real chain: the same (x_t, t, z, row, history) into the fused graph and the numpy step."""
    manifest, eps_sess, fused = fused_sessions(tiny_onnx)
    plan = make_plan(manifest.schedule, sampler, 10, order=order, variant=variant)
    assert_fused_walk_matches_numpy(manifest, eps_sess, fused, plan, np.random.default_rng(1))


@pytest.mark.parametrize("sampler,order", [("unipc", 3), ("dpmpp_sde", 2)])
def test_io_binding_chain_carries_the_history(tiny_onnx, sampler, order):
    """The device loop (onnxruntime IO binding, CPU) ping-pongs the history: same x_0 as the host loop, and its
    callback reports each step's history in and out."""
    from ddpm_deploy.loop.run import run_chain
    from ddpm_deploy.sampling.noise import ChunkNoise
    from ddpm_deploy.runtime import load
    from ddpm_deploy.runtime.backends.onnxruntime_iobinding import FusedIOBindingChain

    manifest, _, fused = fused_sessions(tiny_onnx)
    with load(tiny_onnx, backend="onnxruntime", threads=1, fused_step=False) as pipe:  # the numpy host loop
        plan = pipe.plan(sampler, 8, order=order)
        want = pipe.backend.run_chain(ChunkNoise(pipe.image_shape, 0, 2, seed=4), plan)
    chain = FusedIOBindingChain(fused, manifest, device="cpu", name="onnxruntime-fused-cpu")
    seen = []

    def check(info):
        assert info.hist.shape == (2, N_HIST, *manifest.image_shape)
        if seen:
            np.testing.assert_array_equal(info.hist, seen[-1].hist_out)  # the history handed on, step to step
        seen.append(info)

    got = run_chain(chain, manifest, ChunkNoise(manifest.image_shape, 0, 2, seed=4), plan, callback=check)
    np.testing.assert_allclose(got, want, rtol=0, atol=FUSED_CHAIN_ATOL)
    assert len(seen) == plan.steps and not seen[0].hist.any()


# -- bad input, the audit ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,words", [
    (("--sampler", "plms"), ("plms",)),
    (("--sampler", "dpmpp", "--order", "4"), ("order for dpmpp", "between 1 and 3")),
    (("--sampler", "dpmpp_sde", "--order", "3"), ("order for dpmpp_sde", "between 1 and 2")),
    (("--sampler", "ddim", "--order", "2"), ("ddim has no order",)),
    (("--sampler", "dpmpp", "--variant", "bh1"), ("dpmpp has no variant",)),
    (("--sampler", "ddim", "--spacing", "linspace"), ("leading",)),
    (("--sampler", "unipc", "--eta", "0.5"), ("eta applies to sampler ddim only",)),
])
def test_bad_sampler_options_are_one_line(tiny_onnx, tmp_path, args, words):
    r = cli("run", "--engine", tiny_onnx, "-n", "1", *args, "-o", str(tmp_path / "s.png"), "--quiet")
    assert_one_line_error(r, *words)
    assert not (tmp_path / "s.png").exists()


def test_run_with_a_high_order_and_few_steps(tiny_onnx, tmp_path):
    r = cli("run", "--engine", tiny_onnx, "-n", "2", "--sampler", "unipc", "--order", "3", "--steps", "2",
            "--variant", "bh1", "-o", str(tmp_path / "s.png"), "--quiet", "--backend", "onnxruntime")
    assert r.returncode == 0, r.stderr
    assert "unipc 2 steps" in r.stdout and (tmp_path / "s.png").exists()


def test_audit_samples_the_named_samplers_trajectory(tiny_onnx, tiny_unet):
    import onnxruntime as ort

    from ddpm_deploy.graph.precision_audit import trajectory_inputs

    ckpt, _ = tiny_unet
    sess = ort.InferenceSession(tiny_onnx, providers=["CPUExecutionProvider"])
    named = {"sampler": "dpmpp", "steps": 10, "order": 3}
    x, t = trajectory_inputs(sess, ckpt, sampler=named)
    plan = make_plan(ckpt.schedule, "dpmpp", 10, order=3)
    assert set(t.astype(int).tolist()) <= set(plan.timesteps.tolist()) and np.isfinite(x).all()
    assert int(t.max()) == plan.timesteps[0] and int(t.min()) == plan.timesteps[-1]
    _, t_ddpm = trajectory_inputs(sess, ckpt)
    assert set(t_ddpm.astype(int).tolist()) != set(t.astype(int).tolist())


# -- whole chains with v- and x_0-prediction ------------------------------------------------------------------

def as_prediction_type(unet, schedule, prediction_type):
    """The shipped eps model re-expressed as a v- or x_0-predictor: v = (eps - sigma_t x_t) / alpha_t,
    x_0 = (x_t - sigma_t eps) / alpha_t. The same trained model, so a whole deterministic chain is meaningful (an
    untrained UNet's chain is not) and must land where the eps chain lands."""
    ac = torch.from_numpy(np.asarray(schedule.alphas_cumprod)).float()

    def f(x, t):
        with torch.no_grad():
            eps = unet(x, t).sample
        tt = torch.as_tensor(t).long().reshape(-1)
        a, s = ac[tt].sqrt().view(-1, 1, 1, 1), (1 - ac[tt]).sqrt().view(-1, 1, 1, 1)
        return (eps - s * x) / a if prediction_type == "v_prediction" else (x - s * eps) / a

    return f


PRED_CHAIN_CASES = [  # (sampler, order, variant, spacing, steps)
    ("ddim", None, None, "leading", 10), ("dpmpp", 2, None, "linspace", 10), ("dpmpp", 3, None, "trailing", 10),
    ("dpmpp_sde", 2, None, "linspace", 20), ("unipc", 2, "bh2", "linspace", 10), ("unipc", 3, "bh1", "leading", 10),
]


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
@pytest.mark.parametrize("sampler,order,variant,spacing,steps", PRED_CHAIN_CASES, ids=lambda v: str(v))
def test_whole_chain_v_and_x0_prediction_match_diffusers(digits, prediction_type, sampler, order, variant, spacing,
                                                         steps):
    """Whole chains from the same x_T (and step noise) with the digits model as a v- or x_0-predictor: our rows for
    that prediction type (numpy step, as the runtime's host loop) against diffusers' scheduler with the same
    prediction_type driving the same network, within the eps chains' bound; and against our own eps chain."""
    ckpt, unet, _, _ = digits
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 3 chains of the 16x16 UNet: 2 torch threads on a busy 2-core machine are ~10x slower
    try:
        _v_and_x0_chains(ckpt, unet, prediction_type, sampler, order, variant, spacing, steps)
    finally:
        torch.set_num_threads(threads)


def _v_and_x0_chains(ckpt, unet, prediction_type, sampler, order, variant, spacing, steps):
    from diffusers import DDIMScheduler

    from ddpm_deploy.sampling.noise import request_noise

    f = as_prediction_type(unet, ckpt.schedule, prediction_type)
    x_T, z = request_noise(7, DIGITS_N, (1, 16, 16), steps)
    if sampler == "ddim":
        sched = DDIMScheduler(num_train_timesteps=ckpt.schedule.T, trained_betas=np.asarray(ckpt.schedule.betas),
                              clip_sample=ckpt.clip_sample, prediction_type=prediction_type)
    else:
        sched = diffusers_scheduler(ckpt.schedule, sampler, order, variant or "bh2", spacing,
                                    prediction_type=prediction_type)
    sched.set_timesteps(steps)
    x = torch.from_numpy(x_T)
    for k, t in enumerate(sched.timesteps):
        extra = {"variance_noise": torch.from_numpy(z[k])} if sampler == "dpmpp_sde" else {}
        x = _finite_last_step(sched, sched.step(f(x, t), t, x, **extra).prev_sample, k == steps - 1)
    want = x.numpy()
    assert np.isfinite(want).all() and np.abs(want).max() < 3

    def ours(pt, net):
        opts = {"order": order, "variant": variant, "spacing": None if sampler == "ddim" else spacing}
        plan = make_plan(ckpt.schedule, sampler, steps, clip_sample=ckpt.clip_sample, prediction_type=pt, **opts)
        x, hist = x_T, np.zeros((DIGITS_N, N_HIST, 1, 16, 16), np.float32)
        for k, t in enumerate(plan.timesteps):
            out = net(torch.from_numpy(x), torch.full((DIGITS_N,), int(t))).numpy()
            x, hist = step_with_history(x, out, z[k], plan.coefs[k], hist)
        return x

    got = ours(prediction_type, f)
    assert float(np.abs(got - want).max()) <= FAST_SAMPLER_CHAIN_X0_MAX_ABS
    eps_chain = ours("epsilon", lambda x, t: unet(x, t).sample.detach())
    assert float(np.abs(got - eps_chain).max()) <= FAST_SAMPLER_CHAIN_X0_MAX_ABS


@pytest.mark.parametrize("T,steps,spacing", [(50, 50, "linspace"), (50, 50, "leading"), (50, 29, "trailing")])
def test_repeated_timesteps_advise_what_works(T, steps, spacing):
    """A grid that rounds two steps onto one t is refused; the advice names only settings that do work (it said
    "spacing linspace" to a linspace grid)."""
    from ddpm_deploy.errors import UserError
    from ddpm_deploy.sampling.schedule import Schedule

    s = Schedule.build("linear", T)
    with pytest.raises(UserError) as e:
        make_plan(s, "dpmpp", steps, spacing=spacing)
    msg = str(e.value)
    assert f"spacing {spacing}" not in msg, msg
    fewer = int(msg.split("use ")[1].split()[0])
    make_plan(s, "dpmpp", fewer, spacing=spacing)  # the advice works
    for other in msg.split("spacing ")[-1].split(" or ") if "or spacing" in msg else []:
        make_plan(s, "dpmpp", steps, spacing=other)
