"""Reverse-process step math in numpy: DDPM ancestral (Ho et al. 2020), DDIM (Song et al. 2021), DPM-Solver++
multistep (Lu et al. 2022) and UniPC (Zhao et al. 2023), all as tables of per-step scalars ("plans").

One step, for a row r of COEF_NAMES and a history h = [last_sample, m_1, m_2, m_3] (m_j: the x_0-prediction
j steps ago; all zeros before the first step):

    m      = clip(a_x * x_t - a_e * eps, -clip, clip)                          x_0-prediction (Ho et al. eq. 15)
    x_c    = u_x * x_t + u_l * h0 + u_0 * m + u_1 * h1 + u_2 * h2 + u_3 * h3    UniPC's corrector (else x_c = x_t)
    sigma  = s_min * exp(s_log * (v + 1) / 2)                                  (v: learned-variance channels, else 0)
    x_prev = p_c * x_c + p_0 * m + p_1 * h1 + p_2 * h2 + c_e * eps + sigma * z
    h_out  = [x_c, m, h1, h2]

Every update is affine in (x_t, eps, z, h) given the row, with one clip in between, so the same table drives the
numpy step here and the fused ONNX/TensorRT step graph (`ddpm_deploy.graph.fused`). Rows are computed in float64
from the schedule and follow diffusers' schedulers (DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler,
UniPCMultistepScheduler), which the tests check.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import UserError
from .schedule import MIN_POSTERIOR_VARIANCE, Schedule

SAMPLERS = ("ddpm", "ddim")
# Column order of a plan's coefficient table; the fused step graph takes rows of it as its `coefs` input.
COEF_NAMES = ("a_x", "a_e", "clip", "s_min", "s_log", "u_x", "u_l", "u_0", "u_1", "u_2", "u_3",
              "p_c", "p_0", "p_1", "p_2", "c_e")
N_COEFS = len(COEF_NAMES)
COL = {name: i for i, name in enumerate(COEF_NAMES)}
# History slots carried between steps: [last_sample, m_1, m_2, m_3].
N_HIST = 4
# Columns that read the history; a plan whose rows have them all 0 needs no history (`step` runs it).
HISTORY_COLUMNS = ("u_l", "u_1", "u_2", "u_3", "p_1", "p_2")
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
    order: int | None = None
    variant: str | None = None
    spacing: str = "leading"

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def uses_history(self) -> bool:
        """Whether any step reads the history (multistep samplers); if not, loops may skip carrying it."""
        cols = [COL[n] for n in HISTORY_COLUMNS]
        return bool(np.any(self.coefs[:, cols] != 0))

    @property
    def stochastic(self) -> bool:
        """Whether any step adds noise (z)."""
        return bool(np.any(self.coefs[:, COL["s_min"]] != 0))


def row(**values: float) -> tuple:
    """One COEF_NAMES row from named values; the rest are the identity (u_x = 1, clip off, 0)."""
    unknown = set(values) - set(COEF_NAMES)
    assert not unknown, unknown
    base = {"clip": NO_CLIP, "u_x": 1.0}
    base.update(values)
    return tuple(float(base.get(n, 0.0)) for n in COEF_NAMES)


def leading_timesteps(T: int, steps: int) -> np.ndarray:
    """diffusers' DDPM/DDIM 'leading' spacing: t_k = k * (T // K), descending."""
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
    make_row = _ddpm_row if sampler == "ddpm" else _ddim_row
    rows = [make_row(schedule, int(t), int(t) - ratio, eta, variance_type, clip) for t in timesteps]
    learned = variance_type == "learned_range" and sampler == "ddpm"
    return SamplingPlan(sampler, timesteps, np.asarray(rows, dtype=np.float64), float(eta), learned)


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


# -- the step ---------------------------------------------------------------------------------------------------

def _columns(coefs, ndim: int):
    """A row's scalars: python floats of float32 values for one (N_COEFS,) row (numpy keeps float32 arrays
    float32 with them, NEP 50, and they are cheaper than numpy scalars in the loop); for per-image rows
    (B, N_COEFS), float32 columns shaped (B, 1, ..., 1) that broadcast against images."""
    c = np.asarray(coefs, dtype=np.float32)
    if c.ndim == 1:
        return c.tolist()
    return [col.reshape((-1,) + (1,) * (ndim - 1)) for col in c.T]


def _sigma(model_output: np.ndarray, c: int, s_min, s_log):
    """s_min, or per pixel s_min * exp(s_log * (v + 1) / 2) when the network has learned-variance channels."""
    if model_output.shape[1] == 2 * c and np.any(s_log != 0):
        return s_min * np.exp(s_log * (model_output[:, c:] + 1.0) / 2.0)
    return s_min


def step(x_t: np.ndarray, model_output: np.ndarray, z: np.ndarray, coefs: np.ndarray) -> np.ndarray:
    """One reverse step x_t -> x_{t-1} from a plan row with an all-zero history (float32 in, float32 out).

    That is every step of a history-free plan (DDPM, DDIM) and the first step of a multistep one.
    `model_output` has C channels (eps) or 2C (eps, v) for learned variance; `z` is N(0, I) noise like x_t;
    `coefs` is one row (N_COEFS,) or one per image (B, N_COEFS).
    """
    assert x_t.dtype == np.float32 and z.shape == x_t.shape, (x_t.dtype, z.shape, x_t.shape)
    c = x_t.shape[1]
    a_x, a_e, clip, s_min, s_log, u_x, _, u_0, _, _, _, p_c, p_0, _, _, c_e = _columns(coefs, x_t.ndim)
    eps = model_output[:, :c]
    m = np.minimum(np.maximum(a_x * x_t - a_e * eps, -clip), clip)        # (1) predicted x_0, clipped
    x_c = x_t if (isinstance(u_x, float) and u_x == 1.0 and u_0 == 0.0) else u_x * x_t + u_0 * m  # (2) h = 0
    x_prev = p_c * x_c + p_0 * m + c_e * eps                                 # (3) mean of p(x_{t-1} | x_t)
    return (x_prev + _sigma(model_output, c, s_min, s_log) * z).astype(np.float32, copy=False)  # (4) + sigma z


def step_with_history(x_t: np.ndarray, model_output: np.ndarray, z: np.ndarray, coefs: np.ndarray,
                      hist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One reverse step of a multistep plan: (x_{t-1}, h_out) from x_t, the network output, z, a row (or per-image
    rows) and the history h (B, N_HIST, C, H, W) = [last_sample, m_1, m_2, m_3]; float32 throughout."""
    assert x_t.dtype == np.float32 and hist.shape == (len(x_t), N_HIST, *x_t.shape[1:]), hist.shape
    c = x_t.shape[1]
    a_x, a_e, clip, s_min, s_log, u_x, u_l, u_0, u_1, u_2, u_3, p_c, p_0, p_1, p_2, c_e = _columns(coefs, x_t.ndim)
    eps = model_output[:, :c]
    h0, h1, h2, h3 = hist[:, 0], hist[:, 1], hist[:, 2], hist[:, 3]
    m = np.minimum(np.maximum(a_x * x_t - a_e * eps, -clip), clip)                # (1) x_0-prediction
    x_c = u_x * x_t + u_l * h0 + u_0 * m + u_1 * h1 + u_2 * h2 + u_3 * h3          # (2) corrector (UniPC)
    x_prev = p_c * x_c + p_0 * m + p_1 * h1 + p_2 * h2 + c_e * eps                 # (3) predictor
    x_prev = (x_prev + _sigma(model_output, c, s_min, s_log) * z).astype(np.float32, copy=False)
    h_out = np.empty_like(hist)                                                    # (4) shift the history
    h_out[:, 0], h_out[:, 1], h_out[:, 2:] = x_c, m, hist[:, 1:3]
    return x_prev, h_out
