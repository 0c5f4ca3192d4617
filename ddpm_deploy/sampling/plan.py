"""Reverse-process plans: DDPM ancestral (Ho et al. 2020), DDIM (Song et al. 2021), DPM-Solver++ multistep
(Lu et al. 2022), UniPC (Zhao et al. 2023) and consistency multistep sampling (LCM, Luo et al. 2023), all as tables
of per-step scalars ("plans").

A plan is a row of COEF_NAMES per step; `ddpm_deploy.sampling.step` says what a row does to x_t (and runs it in
numpy), `ddpm_deploy.sampling.multistep` writes the rows of the multistep solvers, this module those of DDPM, DDIM and a
distilled student's grid. Rows are computed in float64 from the schedule and follow diffusers' schedulers
(DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler, LCMScheduler), which the
tests check.

The network's output may be eps, v or x_0 (PREDICTION_TYPES, diffusers' `prediction_type`): with
alpha_t = sqrt(a-bar_t) and sigma_t = sqrt(1 - a-bar_t), both x_0 and eps are affine in (x_t, out), so a
prediction type changes only the rows (`_for_prediction`), never the step or the fused graph.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..config import PREDICTION_TYPES
from ..errors import UserError
from ..fused_io import CORRECTOR_COLS, HIST_COLS, COL
from .multistep import multistep_rows
from .step import NO_CLIP, row
from .spec import (API_DEFAULT_SAMPLER, DEFAULT_ORDER, DEFAULT_SPACING, DEFAULT_STEPS, DISTILLED, LCM, ORDERS,
                   SamplerSpec, as_spec, default_sampler, student_sampler)
from .schedule import MIN_POSTERIOR_VARIANCE, Schedule
from .timesteps import timesteps as grid


@dataclass(frozen=True)
class SamplingPlan:
    """Timesteps t_k (descending) and one row of COEF_NAMES scalars per step (float64)."""

    sampler: str
    timesteps: np.ndarray
    coefs: np.ndarray
    eta: float = 0.0
    learned_variance: bool = False
    order: int | None = None
    variant: str | None = None
    spacing: str = "leading"
    prediction_type: str = "epsilon"

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def uses_history(self) -> bool:
        """Whether any step reads the history (multistep samplers); if not, loops may skip carrying it."""
        return bool(np.any(self.coefs[:, HIST_COLS] != 0))

    @property
    def stochastic(self) -> bool:
        """Whether any step adds noise (z)."""
        return bool(np.any(self.coefs[:, COL["s_min"]] != 0))


def model_plan(manifest, spec: SamplerSpec) -> SamplingPlan:
    """The plan of `spec` for the model a `Manifest` describes (sampler left out: a student's own sampler and grid,
    "distilled" or "lcm", else "ddpm"). Needs only the manifest, so bad sampling options are refused before a
    backend compiles anything."""
    distilled = manifest.distilled
    spec = spec.with_default(default_sampler(distilled, API_DEFAULT_SAMPLER))
    own = student_sampler(distilled) == spec.sampler  # the recorded grid belongs to the sampler it was made for
    return make_plan(manifest.schedule, spec, **manifest.sampling_options,
                     distilled_timesteps=distilled["timesteps"] if own else None)


def make_plan(schedule: Schedule, sampler: str | SamplerSpec | None = API_DEFAULT_SAMPLER, steps: int | None = None,
              eta: float = 0.0, *, order: int | None = None, variant: str | None = None, spacing: str | None = None,
              variance_type: str = "fixed_small", clip_sample: bool = True,
              clip_sample_range: float = 1.0, prediction_type: str = "epsilon",
              distilled_timesteps=None) -> SamplingPlan:
    """Per-step scalars for a `SamplerSpec` (or its fields given separately; sampler None: ddpm) on this schedule:
    `steps` None is all T for DDPM, DEFAULT_STEPS otherwise.

    `order` (dpmpp 1-3, dpmpp_sde 1-2, unipc 1-3; default 2), `variant` (unipc: bh1/bh2, default bh2) and
    `spacing` (linspace/leading/trailing for the multistep samplers) follow diffusers' defaults when None.
    `prediction_type`: what the network outputs (epsilon, v_prediction or sample; the model's, see
    `Manifest.sampling_options`). `distilled_timesteps`: the grid of a student (Manifest.distilled), which sampler
    "distilled" runs, and "lcm" when its steps are left out or equal its length (LCMScheduler's custom timesteps).
    """
    if isinstance(sampler, SamplerSpec):
        spec = as_spec(sampler, steps=steps, eta=eta, order=order, variant=variant, spacing=spacing)
    else:
        spec = SamplerSpec(sampler, steps, eta, order, variant, spacing)
    spec = spec.with_default(API_DEFAULT_SAMPLER)
    if prediction_type not in PREDICTION_TYPES:
        raise UserError(f"unsupported prediction_type {prediction_type!r}: choose one of {', '.join(PREDICTION_TYPES)}")
    if spec.sampler == DISTILLED:
        plan = _distilled_plan(schedule, spec.steps, distilled_timesteps, clip_sample, clip_sample_range)
    elif spec.sampler == LCM:
        plan = _lcm_plan(schedule, spec.steps, distilled_timesteps, clip_sample, clip_sample_range)
    else:
        plan = _eps_plan(schedule, spec, variance_type, clip_sample, clip_sample_range)
    coefs = _for_prediction(plan.coefs, schedule, plan.timesteps, prediction_type)
    return dataclasses.replace(plan, coefs=coefs, prediction_type=prediction_type)


def _eps_plan(schedule, spec: SamplerSpec, variance_type, clip_sample, clip_sample_range) -> SamplingPlan:
    """The plan for a network that outputs eps (the rows below are written for it); `spec` is checked already."""
    T, sampler, eta = schedule.T, spec.sampler, spec.eta
    steps = spec.steps if spec.steps is not None else (T if sampler == "ddpm" else min(DEFAULT_STEPS[sampler], T))
    if steps > T:  # the one rule on steps that needs the model (SamplerSpec checked steps >= 1)
        raise UserError(f"steps must be between 1 and T={T}, got {steps}")
    spacing = spec.spacing or DEFAULT_SPACING[sampler]
    if sampler in ORDERS:
        return _multistep_plan(schedule, sampler, steps, spec.order or DEFAULT_ORDER,
                               spec.variant or ("bh2" if sampler == "unipc" else None), spacing)
    timesteps = grid(T, steps, "leading")  # diffusers' DDPM/DDIM default
    ratio = T // steps
    clip = float(clip_sample_range) if clip_sample else NO_CLIP
    make_row = _ddpm_row if sampler == "ddpm" else _ddim_row
    rows = [make_row(schedule, int(t), int(t) - ratio, eta, variance_type, clip) for t in timesteps]
    learned = variance_type == "learned_range" and sampler == "ddpm"
    return SamplingPlan(sampler, timesteps, np.asarray(rows, dtype=np.float64), float(eta), learned)


def _distilled_plan(schedule, steps, timesteps, clip_sample, clip_sample_range) -> SamplingPlan:
    """DDIM (eta 0) on exactly the grid a distilled student was trained for (Salimans & Ho 2022): step k goes from
    timesteps[k] to timesteps[k+1], the last one to x_0 (a-bar = 1, like diffusers' set_alpha_to_one)."""
    if timesteps is None:
        raise UserError("sampler distilled needs a model from `ddpm-deploy distill` (this one records no distilled "
                        "grid): choose another sampler")
    ts = np.asarray(timesteps, dtype=np.int64)
    if ts.ndim != 1 or len(ts) == 0 or np.any(np.diff(ts) >= 0) or ts[0] >= schedule.T or ts[-1] < 0:
        raise UserError(f"distilled timesteps {ts.tolist()} are not a descending grid in [0, {schedule.T - 1}]")
    if steps is not None and steps != len(ts):
        raise UserError(f"this model was distilled for {len(ts)} steps: drop steps (or give steps {len(ts)}) "
                        "with sampler distilled, or choose another sampler")
    clip = float(clip_sample_range) if clip_sample else NO_CLIP
    prevs = [*ts[1:].tolist(), -1]
    rows = [_ddim_row(schedule, int(t), int(p), 0.0, "fixed_small", clip) for t, p in zip(ts.tolist(), prevs)]
    return SamplingPlan(DISTILLED, ts, np.asarray(rows, dtype=np.float64), 0.0, False)


# LCMScheduler's defaults: the grid is picked from `original_inference_steps` evenly spaced training timesteps, and
# its boundary scalings c_skip / c_out (Song et al. 2023, Appendix C) take t * timestep_scaling against sigma_data.
LCM_ORIGINAL_STEPS = 50
LCM_TIMESTEP_SCALING = 10.0
LCM_SIGMA_DATA = 0.5


def lcm_timesteps(T: int, steps: int, original_steps: int = LCM_ORIGINAL_STEPS) -> np.ndarray:
    """diffusers' LCMScheduler.set_timesteps(steps, original_inference_steps): the original grid
    t = k * c - 1 (c = T // original, k = 1..original), descending, and `steps` of it at floor(linspace(0, original,
    steps, endpoint=False)). A model with T < original uses original = T (c = 1, every timestep), where diffusers
    refuses."""
    original = min(int(original_steps), T)
    if steps > original:
        raise UserError(f"sampler lcm takes at most {original} steps (LCM's original_inference_steps, evenly spaced "
                        f"over T={T}), got {steps}: use fewer steps")
    origin = (np.arange(1, original + 1) * (T // original) - 1)[::-1]
    return origin[np.floor(np.linspace(0, original, num=steps, endpoint=False)).astype(np.int64)].astype(np.int64)


def lcm_boundary_scalings(t) -> tuple:
    """LCMScheduler.get_scalings_for_boundary_condition_discrete: (c_skip, c_out) at timestep t, so that
    denoised = c_out * x0_hat + c_skip * x_t is x_t at t = 0 (the consistency boundary condition)."""
    st = np.asarray(t, dtype=np.float64) * LCM_TIMESTEP_SCALING
    return LCM_SIGMA_DATA ** 2 / (st ** 2 + LCM_SIGMA_DATA ** 2), st / np.sqrt(st ** 2 + LCM_SIGMA_DATA ** 2)


def _lcm_plan(schedule, steps, timesteps, clip_sample, clip_sample_range) -> SamplingPlan:
    """Consistency multistep sampling (LCMScheduler.step): on grid t_0 > ... > t_{K-1}, step k takes x0_hat (clipped
    when the model samples clipped), denoised = c_out x0_hat + c_skip x_t, and re-noises it to the next timestep with
    fresh z, x_{t_{k+1}} = sqrt(a-bar) denoised + sqrt(1 - a-bar) z; the last step returns denoised. `timesteps`: a
    consistency student's recorded grid, used when `steps` is left out or equal to its length."""
    T = schedule.T
    if timesteps is not None and steps in (None, len(timesteps)):
        ts = np.asarray(timesteps, dtype=np.int64)
    else:
        ts = lcm_timesteps(T, steps if steps is not None else DEFAULT_STEPS[LCM])
    clip = float(clip_sample_range) if clip_sample else NO_CLIP
    ac = schedule.alphas_cumprod
    rows = []
    for k, t in enumerate(ts.tolist()):
        c_skip, c_out = lcm_boundary_scalings(t)
        x0 = {"a_x": 1.0 / np.sqrt(ac[t]), "a_e": np.sqrt(1.0 - ac[t]) / np.sqrt(ac[t]), "clip": clip}
        if k == len(ts) - 1:                    # last step: no noise, x_0 = denoised (one step: just this)
            rows.append(row(**x0, p_c=c_skip, p_0=c_out))
            continue
        a_next = ac[ts[k + 1]]
        rows.append(row(**x0, p_c=np.sqrt(a_next) * c_skip, p_0=np.sqrt(a_next) * c_out, s_min=np.sqrt(1.0 - a_next)))
    return SamplingPlan(LCM, ts, np.asarray(rows, dtype=np.float64), 0.0, False)


def _for_prediction(coefs: np.ndarray, schedule: Schedule, timesteps: np.ndarray, prediction_type: str) -> np.ndarray:
    """Rows for a network that outputs v or x_0, from rows written for eps (Salimans & Ho 2022, sec. 4 / diffusers'
    `prediction_type`). With alpha = sqrt(a-bar_t), sigma = sqrt(1 - a-bar_t) both x_0 and eps are affine in
    (x_t, out):  v: x_0 = alpha x_t - sigma v, eps = sigma x_t + alpha v;  sample: x_0 = out,
    eps = (x_t - alpha x_0) / sigma. The eps rows hold m = a_x x_t - a_e eps = x_0 exactly (a_x = 1/alpha,
    a_e = sigma/alpha), so m's pair is replaced and the c_e eps term is rewritten; its x_t part joins p_c, which
    multiplies x_c = x_t on every row with an eps term (DDIM: no corrector). The clip of m stays where it was."""
    if prediction_type == "epsilon":
        return coefs
    ac = schedule.alphas_cumprod[np.asarray(timesteps)]
    alpha, sigma = np.sqrt(ac), np.sqrt(1.0 - ac)
    c = np.array(coefs, dtype=np.float64)
    assert np.allclose(c[:, COL["a_x"]], 1.0 / alpha, rtol=1e-12) and np.allclose(c[:, COL["a_e"]], sigma / alpha,
                                                                                   rtol=1e-12)
    if prediction_type == "v_prediction":
        x0_x, x0_o, e_x, e_o = alpha, -sigma, sigma, alpha
    else:  # "sample"
        x0_x, x0_o, e_x, e_o = np.zeros_like(alpha), np.ones_like(alpha), 1.0 / sigma, -alpha / sigma
    c_e = c[:, COL["c_e"]].copy()
    corrected = (c[:, COL["u_x"]] != 1.0) | np.any(c[:, CORRECTOR_COLS] != 0, axis=1)
    assert not np.any((c_e != 0) & corrected), "an eps term on a corrector row: x_c != x_t there"
    c[:, COL["a_x"]], c[:, COL["a_e"]] = x0_x, -x0_o
    c[:, COL["p_c"]] += c_e * e_x
    c[:, COL["c_e"]] = c_e * e_o
    return c


def _alphas(schedule: Schedule, t: int, prev_t: int) -> tuple[float, float]:
    ac = schedule.alphas_cumprod
    return float(ac[t]), float(ac[prev_t]) if prev_t >= 0 else 1.0


def _ddpm_row(schedule, t, prev_t, eta, variance_type, clip):
    """DDPM ancestral step, Ho et al. eq. 6-7 with x0_hat from eq. 15 (eq. 11 when x_0 is not clipped)."""
    ac_t, ac_prev = _alphas(schedule, t, prev_t)
    beta_t = 1.0 - ac_t / ac_prev                                     # (1) beta of this (possibly strided) step
    a_x, a_e = 1.0 / np.sqrt(ac_t), np.sqrt(1.0 - ac_t) / np.sqrt(ac_t)  # (2) x0_hat = (x_t - sqrt(1-ac) eps)/sqrt(ac)
    c_0 = np.sqrt(ac_prev) * beta_t / (1.0 - ac_t)                    # (3) posterior mean coef of x_0 (eq. 7)
    c_x = np.sqrt(1.0 - beta_t) * (1.0 - ac_prev) / (1.0 - ac_t)      # (4) posterior mean coef of x_t (eq. 7)
    var_small = max((1.0 - ac_prev) / (1.0 - ac_t) * beta_t, MIN_POSTERIOR_VARIANCE)  # (5) beta-tilde_t
    if t == 0:                                                        # (6) no noise on the last step
        s_min, s_log = 0.0, 0.0
    elif variance_type == "fixed_small":
        s_min, s_log = np.sqrt(var_small), 0.0
    elif variance_type == "fixed_large":
        s_min, s_log = np.sqrt(beta_t), 0.0
    elif variance_type == "learned_range":                            # (7) Improved DDPM eq. 15: log-interpolate
        s_min, s_log = np.sqrt(var_small), 0.5 * (np.log(beta_t) - np.log(var_small))
    else:
        raise UserError(f"unsupported variance_type {variance_type!r}")
    return row(a_x=a_x, a_e=a_e, clip=clip, s_min=s_min, s_log=s_log, p_c=c_x, p_0=c_0)


def _ddim_row(schedule, t, prev_t, eta, variance_type, clip):
    """DDIM step, Song et al. eq. 12 with sigma_t(eta) from eq. 16."""
    ac_t, ac_prev = _alphas(schedule, t, prev_t)
    a_x, a_e = 1.0 / np.sqrt(ac_t), np.sqrt(1.0 - ac_t) / np.sqrt(ac_t)   # (1) x0_hat (eq. 12, "predicted x_0")
    var = (1.0 - ac_prev) / (1.0 - ac_t) * (1.0 - ac_t / ac_prev)         # (2) sigma_t^2 at eta = 1 (eq. 16)
    sigma = eta * np.sqrt(var)
    dir_coef = np.sqrt(max(1.0 - ac_prev - sigma ** 2, 0.0))              # (3) "direction pointing to x_t"
    # (4) x_prev = sqrt(ac_prev) x0_hat + dir_coef * eps + sigma z. Like diffusers' default
    # (use_clipped_model_output=False) eps is the network's, even when x0_hat was clipped.
    return row(a_x=a_x, a_e=a_e, clip=clip, s_min=sigma, p_0=np.sqrt(ac_prev), c_e=dir_coef)


def _multistep_plan(schedule, sampler, steps, order, variant, spacing) -> SamplingPlan:
    timesteps, rows = multistep_rows(schedule, sampler, steps, order, variant, spacing)
    # learned-variance channels are dropped (as diffusers does): these solvers' noise is fixed by the schedule
    return SamplingPlan(sampler, timesteps, np.asarray(rows, dtype=np.float64), 0.0, False, order, variant, spacing)
