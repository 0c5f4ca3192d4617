"""Reverse-process step math in numpy: DDPM ancestral (Ho et al. 2020) and DDIM (Song et al. 2021).

Every update here is affine in (x_t, eps, z) given per-step scalars, with one clip in between:

    x0_hat = clip(a_x * x_t - a_e * eps, -L, L)                      (prediction of x_0, Ho et al. eq. 15)
    x_prev = c_x * x_t + c_0 * x0_hat + c_e * eps + sigma * z
    sigma  = s_min * exp(s_log * (v + 1) / 2)                          (v: learned-variance channels, else 0)

so a sampler is a table of scalars per step (a "plan"), computed in float64 from the schedule. The same
table drives the numpy step here and the fused ONNX/TensorRT step graph (`ddpm_deploy.graph.fused`).
The scalars follow diffusers' DDPMScheduler / DDIMScheduler exactly (timestep spacing "leading",
set_alpha_to_one=True), which the tests check to float precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import UserError
from .schedule import MIN_POSTERIOR_VARIANCE, Schedule

SAMPLERS = ("ddpm", "ddim")
# Column order of a plan's coefficient table; the fused step graph takes one row as its `coefs` input.
COEF_NAMES = ("a_x", "a_e", "c_x", "c_0", "c_e", "s_min", "s_log", "clip")
N_COEFS = len(COEF_NAMES)
# "No clip" is a clip at float32's largest value: finite, so fp16/TensorRT graphs never see inf.
NO_CLIP = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class SamplingPlan:
    """Timesteps t_k (descending) and one row of COEF_NAMES scalars per step (float64)."""

    sampler: str
    timesteps: np.ndarray
    coefs: np.ndarray
    eta: float = 0.0
    learned_variance: bool = False

    @property
    def steps(self) -> int:
        return len(self.timesteps)


def leading_timesteps(T: int, steps: int) -> np.ndarray:
    """diffusers' default 'leading' spacing: t_k = k * (T // K), descending."""
    return (np.arange(0, steps) * (T // steps))[::-1].astype(np.int64)


def make_plan(schedule: Schedule, sampler: str = "ddpm", steps: int | None = None, eta: float = 0.0, *,
              variance_type: str = "fixed_small", clip_sample: bool = True,
              clip_sample_range: float = 1.0) -> SamplingPlan:
    """Per-step scalars for `sampler` over `steps` strided timesteps (None: all T for DDPM, 50 for DDIM)."""
    T = schedule.T
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    steps = steps if steps is not None else (T if sampler == "ddpm" else min(50, T))
    if not 1 <= steps <= T:
        raise UserError(f"--steps must be between 1 and T={T}, got {steps}")
    if eta < 0:
        raise UserError(f"--eta must be >= 0, got {eta}")
    timesteps = leading_timesteps(T, steps)
    ratio = T // steps
    clip = float(clip_sample_range) if clip_sample else NO_CLIP
    row = _ddpm_row if sampler == "ddpm" else _ddim_row
    rows = [row(schedule, int(t), int(t) - ratio, eta, variance_type) + (clip,) for t in timesteps]
    learned = variance_type == "learned_range" and sampler == "ddpm"
    return SamplingPlan(sampler, timesteps, np.asarray(rows, dtype=np.float64), float(eta), learned)


def _alphas(schedule: Schedule, t: int, prev_t: int) -> tuple[float, float]:
    ac = schedule.alphas_cumprod
    return float(ac[t]), float(ac[prev_t]) if prev_t >= 0 else 1.0


def _ddpm_row(schedule, t, prev_t, eta, variance_type):
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
    return (a_x, a_e, c_x, c_0, 0.0, s_min, s_log)


def _ddim_row(schedule, t, prev_t, eta, variance_type):
    """DDIM step, Song et al. eq. 12 with sigma_t(eta) from eq. 16."""
    ac_t, ac_prev = _alphas(schedule, t, prev_t)
    a_x, a_e = 1.0 / np.sqrt(ac_t), np.sqrt(1.0 - ac_t) / np.sqrt(ac_t)   # (1) x0_hat (eq. 12, "predicted x_0")
    var = (1.0 - ac_prev) / (1.0 - ac_t) * (1.0 - ac_t / ac_prev)         # (2) sigma_t^2 at eta = 1 (eq. 16)
    sigma = eta * np.sqrt(var)
    dir_coef = np.sqrt(max(1.0 - ac_prev - sigma ** 2, 0.0))              # (3) "direction pointing to x_t"
    # (4) x_prev = sqrt(ac_prev) x0_hat + dir_coef * eps + sigma z. Like diffusers' default
    # (use_clipped_model_output=False) eps is the network's, even when x0_hat was clipped.
    c_x, c_0, c_e = 0.0, np.sqrt(ac_prev), dir_coef
    return (a_x, a_e, c_x, c_0, c_e, sigma, 0.0)


def step(x_t: np.ndarray, model_output: np.ndarray, z: np.ndarray, coefs: np.ndarray) -> np.ndarray:
    """One reverse step x_t -> x_{t-1} from a plan row (float32 in, float32 out).

    `model_output` has C channels (eps) or 2C (eps, v) for learned variance; `z` is N(0, I) noise like x_t.
    """
    assert x_t.dtype == np.float32 and z.shape == x_t.shape, (x_t.dtype, z.shape, x_t.shape)
    c = x_t.shape[1]
    # python floats of float32 values: numpy keeps float32 arrays float32 with them (NEP 50) and they are cheaper
    # than numpy scalars in the loop
    a_x, a_e, c_x, c_0, c_e, s_min, s_log, clip = np.asarray(coefs, dtype=np.float32).tolist()
    eps = model_output[:, :c]
    x0_hat = np.minimum(np.maximum(a_x * x_t - a_e * eps, -clip), clip)   # (1) predicted x_0, clipped
    x_prev = c_x * x_t + c_0 * x0_hat + c_e * eps                          # (2) mean of p(x_{t-1} | x_t)
    if model_output.shape[1] == 2 * c and s_log != 0:                      # (3) learned sigma, per pixel
        sigma = s_min * np.exp(s_log * (model_output[:, c:] + 1.0) / 2.0)
    else:
        sigma = s_min
    return (x_prev + sigma * z).astype(np.float32, copy=False)             # (4) + sigma * z
