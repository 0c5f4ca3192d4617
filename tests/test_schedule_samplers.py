"""Schedules against closed forms and diffusers; numpy samplers against diffusers' schedulers and eq. 11."""

from __future__ import annotations

import numpy as np
import pytest

from ddpm_deploy.errors import UserError
from ddpm_deploy.sampling.plan import make_plan
from ddpm_deploy.sampling.step import step
from ddpm_deploy.sampling.schedule import Schedule, ScheduleError
from ddpm_deploy.tolerances import SAMPLER_ATOL, SAMPLER_RTOL, SAMPLER_VS_FLOAT32_TABLES_ATOL

try:  # the schedule and sampler math is numpy only; the comparisons with diffusers need torch
    import diffusers
    import torch
except ImportError:
    diffusers = torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="compares with diffusers: pip install 'ddpm-deploy[torch]'")

DIFFUSERS_NAME = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def test_linear_and_geometric_closed_forms():
    s = Schedule.build("linear", 1000)
    assert s.betas.dtype == np.float64
    np.testing.assert_allclose(s.betas[[0, -1]], [1e-4, 0.02], rtol=0, atol=1e-15)
    np.testing.assert_allclose(np.diff(s.betas), (0.02 - 1e-4) / 999, rtol=1e-9)
    g = Schedule.build("geometric", 1000)
    ratio = g.betas[1:] / g.betas[:-1]
    np.testing.assert_allclose(ratio, (0.02 / 1e-4) ** (1 / 999), rtol=1e-12)
    np.testing.assert_allclose(g.betas[[0, -1]], [1e-4, 0.02], rtol=1e-12)


def test_cosine_closed_form_and_posterior():
    s = Schedule.build("cosine", 1000)
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    t = np.arange(1, 1001) / 1000
    ac_closed = np.clip(f(t) / f(0), 0, None)
    # a-bar from the clipped betas equals the closed form except where beta hits the 0.999 cap (last step)
    np.testing.assert_allclose(s.alphas_cumprod[:-1], ac_closed[:-1], rtol=1e-9)
    assert s.betas.max() <= 0.999
    # posterior variance (eq. 7) and its mean coefficients satisfy the posterior identities
    np.testing.assert_allclose(s.posterior_variance[0], 0.0, atol=1e-20)
    lhs = s.posterior_mean_coef1 * np.sqrt(s.alphas_cumprod) + s.posterior_mean_coef2
    # E[x_{t-1} | x_0, x_t] for x_t = sqrt(ac) x0 (no noise) must be sqrt(ac_{t-1}) x0 / sqrt(ac_t) * ...: check on x0=1
    mean_given_x0 = s.posterior_mean_coef1 + s.posterior_mean_coef2 * np.sqrt(s.alphas_cumprod)
    np.testing.assert_allclose(mean_given_x0, np.sqrt(s.alphas_cumprod_prev), rtol=1e-9)
    assert lhs.shape == (1000,)


@needs_torch
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_matches_diffusers(kind):
    from diffusers import DDPMScheduler

    s = Schedule.build(kind, 1000)
    d = DDPMScheduler(num_train_timesteps=1000, beta_schedule=DIFFUSERS_NAME[kind])
    # diffusers stores float32 tables: agreement to float32 precision
    np.testing.assert_allclose(s.betas, d.betas.numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(s.alphas_cumprod, d.alphas_cumprod.numpy(), rtol=2e-5, atol=1e-9)
    # posterior variance: diffusers' formula on our float64 tables (its float32 tables lose ~4e-4 relative to
    # cancellation in 1 - a-bar near t = 0, which says nothing about the formula)
    _, d64 = _float64_ddpm(kind)
    var = np.array([float(d64._get_variance(t)) for t in range(1, 1000)])
    np.testing.assert_allclose(s.posterior_variance[1:], var, rtol=1e-12)


def test_bad_schedules():
    with pytest.raises(ScheduleError):
        Schedule.build("quadratic", 1000)
    with pytest.raises(ScheduleError):
        Schedule.build("linear", 1)
    with pytest.raises(ScheduleError):
        Schedule.build("linear", 100, 0.02, 1e-4)


def _float64_ddpm(kind, **kw):
    """A diffusers scheduler whose tables are our float64 ones, so only the step formulas are compared."""
    from diffusers import DDIMScheduler, DDPMScheduler

    cls = DDIMScheduler if kw.pop("ddim", False) else DDPMScheduler
    sch = cls(num_train_timesteps=1000, beta_schedule=DIFFUSERS_NAME.get(kind, "linear"), **kw)
    s = Schedule.build(kind, 1000)
    sch.betas = torch.from_numpy(s.betas)
    sch.alphas = torch.from_numpy(s.alphas)
    sch.alphas_cumprod = torch.from_numpy(s.alphas_cumprod)
    if hasattr(sch, "final_alpha_cumprod"):
        sch.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    sch.one = torch.tensor(1.0, dtype=torch.float64)
    return s, sch


def _io(rng, channels_out=1):
    x = rng.standard_normal((3, 1, 4, 4)).astype(np.float32)
    out = rng.standard_normal((3, channels_out, 4, 4)).astype(np.float32)
    return x, out


@needs_torch
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("kind", ["linear", "cosine", "geometric"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("steps", [1000, 100])
def test_ddpm_step_matches_diffusers(kind, variance_type, clip, steps, prediction_type):
    s, sch = _float64_ddpm(kind, variance_type=variance_type, clip_sample=clip, prediction_type=prediction_type)
    sch.set_timesteps(steps)
    plan = make_plan(s, "ddpm", steps, variance_type=variance_type, clip_sample=clip, prediction_type=prediction_type)
    np.testing.assert_array_equal(plan.timesteps, sch.timesteps.numpy())
    rng = np.random.default_rng(0)
    for k in sorted({0, 1, steps // 2, steps - 2, steps - 1}):
        t = int(plan.timesteps[k])
        x, out = _io(rng, 2 if variance_type == "learned_range" else 1)
        # what diffusers draws for float64 inputs
        z = torch.randn((3, 1, 4, 4), generator=torch.Generator().manual_seed(k), dtype=torch.float64).float()
        ours = step(x, out, z.numpy(), plan.coefs[k])
        ref = sch.step(torch.from_numpy(out).double(), t, torch.from_numpy(x).double(),
                       generator=torch.Generator().manual_seed(k)).prev_sample.numpy()
        np.testing.assert_allclose(ours, ref, rtol=SAMPLER_RTOL, atol=SAMPLER_ATOL, err_msg=f"k={k} t={t}")


@needs_torch
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", [True, False])
def test_ddim_step_matches_diffusers(kind, eta, clip, prediction_type):
    s, sch = _float64_ddpm(kind, ddim=True, clip_sample=clip, prediction_type=prediction_type)
    sch.set_timesteps(50)
    plan = make_plan(s, "ddim", 50, eta, clip_sample=clip, prediction_type=prediction_type)
    np.testing.assert_array_equal(plan.timesteps, sch.timesteps.numpy())
    rng = np.random.default_rng(1)
    for k in range(50):
        x, out = _io(rng)
        z = rng.standard_normal(x.shape).astype(np.float32)
        ours = step(x, out, z, plan.coefs[k])
        ref = sch.step(torch.from_numpy(out).double(), int(plan.timesteps[k]), torch.from_numpy(x).double(), eta=eta,
                       variance_noise=torch.from_numpy(z).double()).prev_sample.numpy()
        np.testing.assert_allclose(ours, ref, rtol=SAMPLER_RTOL, atol=SAMPLER_ATOL, err_msg=f"k={k}")


@needs_torch
def test_ddpm_matches_stock_diffusers_float32_tables():
    """The stock scheduler (float32 tables) agrees within the documented float32-table tolerance."""
    from diffusers import DDPMScheduler

    s = Schedule.build("linear", 1000)
    sch = DDPMScheduler(num_train_timesteps=1000)
    sch.set_timesteps(1000)
    plan = make_plan(s, "ddpm")
    rng = np.random.default_rng(2)
    for k in (0, 500, 999):
        x, out = _io(rng)
        ours = step(x, out, torch.randn((3, 1, 4, 4), generator=torch.Generator().manual_seed(k)).numpy(), plan.coefs[k])
        ref = sch.step(torch.from_numpy(out), int(plan.timesteps[k]), torch.from_numpy(x),
                       generator=torch.Generator().manual_seed(k)).prev_sample.numpy()
        np.testing.assert_allclose(ours, ref, atol=SAMPLER_VS_FLOAT32_TABLES_ATOL)


@needs_torch
def test_ddpm_eq11_without_clip_matches_torch_reference():
    """The numpy plan chain and the torch eq.-11 reference agree over a whole chain with the same noise."""
    from ddpm_deploy.nn.reference import ddpm_reference_sample

    s = Schedule.build("linear", 60, 1e-3, 0.2)
    w = np.random.default_rng(3).standard_normal((1, 1, 4, 4)).astype(np.float32) * 0.3
    eps_fn = lambda x, t: (np.tanh(x) * w + 0.01 * t[:, None, None, None] / 60).astype(np.float32)  # noqa: E731
    x_T = np.random.default_rng(4).standard_normal((2, 1, 4, 4)).astype(np.float32)
    zs = np.random.default_rng(5).standard_normal((60, 2, 1, 4, 4)).astype(np.float32)
    for clip, vt in [(False, "fixed_small"), (False, "fixed_large"), (True, "fixed_small")]:
        plan = make_plan(s, "ddpm", variance_type=vt, clip_sample=clip)
        x = x_T
        for k, t in enumerate(plan.timesteps):
            x = step(x, eps_fn(x, np.full(2, t, np.float32)), zs[k], plan.coefs[k])
        ref = ddpm_reference_sample(lambda xt, t: torch.from_numpy(eps_fn(xt.numpy(), t.numpy())), torch.from_numpy(x_T),
                                    torch.from_numpy(zs), s, variance_type=vt, clip_sample=clip).numpy()
        np.testing.assert_allclose(x, ref, rtol=1e-4, atol=1e-4)


def test_plan_bad_inputs():
    s = Schedule.build("linear", 100)
    with pytest.raises(UserError, match="between 1 and T=100"):
        make_plan(s, "ddim", 101)
    with pytest.raises(UserError, match="unknown sampler"):
        make_plan(s, "euler")
    with pytest.raises(UserError, match="eta"):
        make_plan(s, "ddim", 10, -1.0)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("sampler,steps,kw", [("ddpm", None, {}), ("ddim", 10, {"eta": 0.5}),
                                             ("dpmpp", 8, {"order": 3}), ("dpmpp_sde", 8, {"order": 2}),
                                             ("unipc", 8, {"order": 3, "variant": "bh1"})])
def test_eps_gain_is_the_steps_derivative(sampler, steps, kw, prediction_type):
    """samplers.eps_gain (verify's per-step bound) is the largest |d x_{t-1} / d out| of the step itself (out: eps,
    v or x_0): finite differences in the network's output (float64 through the float32 step) where the
    x_0-prediction m is inside the clip and, for clipped plans, where it is clipped (x_{t-1} is piecewise linear in
    out)."""
    from ddpm_deploy.fused_io import COL, N_HIST
    from ddpm_deploy.sampling.step import NO_CLIP, eps_gain, step_with_history

    plan = make_plan(Schedule.build("linear", 1000), sampler, steps, prediction_type=prediction_type, **kw)
    x = np.zeros((1, 1, 4, 4), np.float32)
    z, hist = np.zeros_like(x), np.zeros((1, N_HIST, 1, 4, 4), np.float32)

    def slope(row, out0):
        delta = np.float32(1e-3 * max(1.0, abs(out0)))
        base = step_with_history(x, np.full_like(x, out0), z, row, hist)[0].astype(np.float64)
        moved = step_with_history(x, np.full_like(x, out0 + delta), z, row, hist)[0].astype(np.float64)
        return float(np.max(np.abs(moved - base))) / float(delta)

    for k in range(plan.steps):
        row = plan.coefs[k]
        slopes = [slope(row, 0.0)]  # m = -a_e * out = 0: inside the clip
        if row[COL["clip"]] < NO_CLIP:
            slopes.append(slope(row, 10.0 / row[COL["a_e"]]))  # m = -10: clipped
        np.testing.assert_allclose(max(slopes), eps_gain(row), rtol=1e-3, atol=1e-5, err_msg=f"step {k}")


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_one_timestep_grid_is_diffusers_for_ddim_and_the_multistep_solvers(spacing):
    """sampling.timesteps is the one grid function (samplers, multistep solvers, distillation): diffusers'
    DDIMScheduler lays K points, DPMSolverMultistepScheduler K + 1 and drops the last."""
    diffusers = pytest.importorskip("diffusers")   # this file also runs with torch blocked (tests/test_layers.py)
    DDIMScheduler, DPMSolverMultistepScheduler = diffusers.DDIMScheduler, diffusers.DPMSolverMultistepScheduler

    from ddpm_deploy.sampling.timesteps import timesteps

    for T in (1000, 50, 37):
        for K in (1, 2, 3, 4, 7, 10, 20, 25):
            ddim = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
            ddim.set_timesteps(K)
            np.testing.assert_array_equal(timesteps(T, K, spacing), ddim.timesteps.numpy())
            dpm = DPMSolverMultistepScheduler(num_train_timesteps=T, timestep_spacing=spacing)
            dpm.set_timesteps(K)
            np.testing.assert_array_equal(timesteps(T, K, spacing, multistep=True), dpm.timesteps.numpy())
