"""Reverse-process step math in numpy: DDPM ancestral (Ho et al. 2020), DDIM (Song et al. 2021), DPM-Solver++
multistep (Lu et al. 2022) and UniPC (Zhao et al. 2023), all as tables of per-step scalars ("plans").

One step, for a row r of COEF_NAMES and a history h = [last_sample, m_1, m_2, m_3] (m_j: the x_0-prediction
j steps ago; all zeros before the first step), with `out` the network's output (its first C channels):

    m      = clip(a_x * x_t - a_e * out, -clip, clip)                          x_0-prediction (Ho et al. eq. 15)
    x_c    = u_x * x_t + u_l * h0 + u_0 * m + u_1 * h1 + u_2 * h2 + u_3 * h3    UniPC's corrector (else x_c = x_t)
    sigma  = s_min * exp(s_log * (v + 1) / 2)                                  (v: learned-variance channels, else 0)
    x_prev = p_c * x_c + p_0 * m + p_1 * h1 + p_2 * h2 + c_e * out + sigma * z
    h_out  = [x_c, m, h1, h2]

Every update is affine in (x_t, out, z, h) given the row, with one clip in between, so the same table drives the
numpy step here and the fused ONNX/TensorRT step graph (`ddpm_deploy.graph.fused`). Rows are computed in float64
from the schedule and follow diffusers' schedulers (DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler,
UniPCMultistepScheduler), which the tests check.

The network's output may be eps, v or x_0 (PREDICTION_TYPES, diffusers' `prediction_type`): with
alpha_t = sqrt(a-bar_t) and sigma_t = sqrt(1 - a-bar_t), both x_0 and eps are affine in (x_t, out), so a
prediction type changes only the rows (`_for_prediction`), never the step or the fused graph.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .config import PREDICTION_TYPES
from .errors import UserError
from .fused_io import COEF_NAMES, COL, N_COEFS, N_HIST  # noqa: F401  (the fused step's coefficient layout)
from .sampler_spec import (DEFAULT_ORDER, DEFAULT_SAMPLER, DEFAULT_SPACING, DEFAULT_STEPS,  # noqa: F401
                           DISTILLED, ORDERS, SAMPLERS, SPACINGS, UNIPC_VARIANTS, SamplerSpec, as_spec,
                           default_sampler, off_grid_warning)  # (the sampler names and rules live there)
from .schedule import MIN_POSTERIOR_VARIANCE, Schedule

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
    prediction_type: str = "epsilon"

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


def make_plan(schedule: Schedule, sampler: str | SamplerSpec | None = "ddpm", steps: int | None = None,
              eta: float = 0.0, *, order: int | None = None, variant: str | None = None, spacing: str | None = None,
              variance_type: str = "fixed_small", clip_sample: bool = True,
              clip_sample_range: float = 1.0, prediction_type: str = "epsilon",
              distilled_timesteps=None) -> SamplingPlan:
    """Per-step scalars for a `SamplerSpec` (or its fields given separately; sampler None: ddpm) on this schedule:
    `steps` None is all T for DDPM, DEFAULT_STEPS otherwise.

    `order` (dpmpp 1-3, dpmpp_sde 1-2, unipc 1-3; default 2), `variant` (unipc: bh1/bh2, default bh2) and
    `spacing` (linspace/leading/trailing for the multistep samplers) follow diffusers' defaults when None.
    `prediction_type`: what the network outputs (epsilon, v_prediction or sample; the model's, see
    `Manifest.sampling_options`). `distilled_timesteps`: the grid of a distilled student (Manifest.distilled),
    which sampler "distilled" runs.
    """
    if isinstance(sampler, SamplerSpec):
        spec = as_spec(sampler, steps=steps, eta=eta, order=order, variant=variant, spacing=spacing)
    else:
        spec = SamplerSpec(sampler, steps, eta, order, variant, spacing)
    spec = spec.with_default("ddpm")
    if prediction_type not in PREDICTION_TYPES:
        raise UserError(f"unsupported prediction_type {prediction_type!r}: choose one of {', '.join(PREDICTION_TYPES)}")
    if spec.sampler == DISTILLED:
        plan = _distilled_plan(schedule, spec.steps, distilled_timesteps, clip_sample, clip_sample_range)
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
    timesteps = leading_timesteps(T, steps)
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
    corrected = (c[:, COL["u_x"]] != 1.0) | np.any(c[:, [COL[n] for n in ("u_l", "u_0", "u_1", "u_2", "u_3")]] != 0,
                                                    axis=1)
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


# -- multistep solvers: DPM-Solver++ and UniPC in data-prediction (x_0) form ------------------------------------
#
# With alpha_s = sqrt(a-bar), sigma_s = sqrt(1 - a-bar) and lambda = log(alpha / sigma), each update is a linear
# combination of the sample and the x_0-predictions m of the last few steps whose weights depend only on the
# lambdas: a row of the table. diffusers' edge rules are kept: the final step goes to sigma = 0
# (final_sigmas_type="zero": it returns the x_0-prediction), orders drop at the start (warm-up) and near the end
# (lower_order_final), no thresholding (so no clip), learned-variance channels are dropped.

def multistep_timesteps(T: int, steps: int, spacing: str) -> np.ndarray:
    """diffusers' DPMSolverMultistep/UniPCMultistep `set_timesteps` (lambda_min_clipped = -inf, steps_offset 0)."""
    if spacing == "linspace":
        t = np.linspace(0, T - 1, steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        t = (np.arange(0, steps + 1) * (T // (steps + 1))).round()[::-1][:-1]
    else:  # trailing
        t = np.arange(T, 0, -T / steps).round() - 1
    return t.copy().astype(np.int64)


def _multistep_plan(schedule, sampler, steps, order, variant, spacing) -> SamplingPlan:
    T = schedule.T
    timesteps = multistep_timesteps(T, steps, spacing)
    if len(timesteps) != steps or np.any(np.diff(timesteps) >= 0):
        raise UserError(f"{steps} steps with {spacing!r} spacing repeat timesteps for T={T}: use fewer steps or "
                        "spacing linspace")
    ac = schedule.alphas_cumprod[timesteps]
    alpha = np.append(np.sqrt(ac), 1.0)            # step k goes from index k to k + 1; index K is sigma = 0
    sigma = np.append(np.sqrt(1.0 - ac), 0.0)
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)        # lambda_K = +inf
    if sampler == "unipc":
        rows = _unipc_rows(alpha, sigma, lam, order, variant)
    else:
        rows = [_dpmpp_row(alpha, sigma, lam, k, _dpmpp_order(k, steps, order), sde=sampler == "dpmpp_sde")
                for k in range(steps)]
    # learned-variance channels are dropped (as diffusers does): these solvers' noise is fixed by the schedule
    return SamplingPlan(sampler, timesteps, np.asarray(rows, dtype=np.float64), 0.0, False, order, variant, spacing)


def _x0_pred(alpha, sigma, k) -> dict:
    """m = (x_t - sigma eps) / alpha, unclipped (diffusers' thresholding=False)."""
    return {"a_x": 1.0 / alpha[k], "a_e": sigma[k] / alpha[k], "clip": NO_CLIP}


def _dpmpp_order(k: int, steps: int, order: int) -> int:
    """The order diffusers' DPMSolverMultistepScheduler.step uses at step k (0-based)."""
    warm = min(k, order)                                    # lower_order_nums: steps taken so far, capped
    if order == 1 or warm < 1 or k == steps - 1:            # last step: final_sigmas_type="zero" -> first order
        return 1
    if order == 2 or warm < 2 or (k == steps - 2 and steps < 15):  # lower_order_final's second-to-last step
        return 2
    return 3


def _dpmpp_row(alpha, sigma, lam, k, order, sde):
    """DPM-Solver++ (Lu et al. 2022, "midpoint" form) from index k to k + 1, as weights on x, m_k, m_{k-1}, m_{k-2}."""
    a_t = alpha[k + 1]
    if sigma[k + 1] == 0.0:                                  # (0) to sigma = 0: the update is x_0 = m (e^{-h} = 0)
        return row(**_x0_pred(alpha, sigma, k), p_c=0.0, p_0=1.0)
    h = lam[k + 1] - lam[k]
    # D0, D1, D2 as weight vectors over (m_k, m_{k-1}, m_{k-2})
    D0 = np.array([1.0, 0.0, 0.0])
    D1 = D2 = np.zeros(3)
    if order >= 2:
        r0 = (lam[k] - lam[k - 1]) / h
        D1_0 = np.array([1.0, -1.0, 0.0]) / r0
        D1 = D1_0
    if order == 3:
        r1 = (lam[k - 1] - lam[k - 2]) / h
        D1_1 = np.array([0.0, 1.0, -1.0]) / r1
        D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)
        D2 = (D1_0 - D1_1) / (r0 + r1)
    if sde:                                                  # sde-dpmsolver++: noise sigma_t sqrt(1 - e^{-2h})
        one_m = -np.expm1(-2.0 * h)                          # 1 - e^{-2h}
        p_c = sigma[k + 1] / sigma[k] * np.exp(-h)
        w = a_t * one_m * D0 + 0.5 * a_t * one_m * D1        # order <= 2 (the dpmpp_sde range)
        s_min = sigma[k + 1] * np.sqrt(one_m)
    else:
        em1 = np.expm1(-h)                                   # e^{-h} - 1
        p_c = sigma[k + 1] / sigma[k]
        if order < 3:
            w = -a_t * em1 * D0 - 0.5 * a_t * em1 * D1
        else:
            w = -a_t * em1 * D0 + a_t * (em1 / h + 1.0) * D1 - a_t * ((em1 + h) / h ** 2 - 0.5) * D2
        s_min = 0.0
    return row(**_x0_pred(alpha, sigma, k), s_min=s_min, p_c=p_c, p_0=w[0], p_1=w[1], p_2=w[2])


def _unipc_orders(steps: int, order: int) -> list[int]:
    """UniPCMultistepScheduler's `this_order` per step: warm-up, then lower_order_final near the end."""
    return [min(order, steps - k, min(k, order) + 1) for k in range(steps)]


def _unipc_rhos(lam, k_s0, h, rk_index, order, variant, corrector):
    """UniPC's rho coefficients: the small linear solve of `multistep_uni_{p,c}_bh_update`, in float64.

    rks = [(lambda_{s_j} - lambda_{s0}) / h for the older steps s_j] + [1]; R[i] = rks^i, b from the phi-functions.
    """
    rks = np.array([(lam[i] - lam[k_s0]) / h for i in rk_index] + [1.0])
    hh = -h                                                 # predict_x0
    h_phi_1 = np.expm1(hh)
    B_h = hh if variant == "bh1" else np.expm1(hh)
    h_phi_k, fact, R, b = h_phi_1 / hh - 1.0, 1, [], []
    for i in range(1, order + 1):
        R.append(rks ** (i - 1))
        b.append(h_phi_k * fact / B_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    R, b = np.array(R), np.array(b)
    if corrector:
        rhos = np.array([0.5]) if order == 1 else np.linalg.solve(R, b)
    else:
        rhos = np.array([0.5]) if order == 2 else (np.linalg.solve(R[:-1, :-1], b[:-1]) if order > 2 else np.zeros(0))
    return rks, rhos, h_phi_1, B_h


def _unipc_rows(alpha, sigma, lam, order, variant) -> list[tuple]:
    """UniPC (Zhao et al. 2023, B(h) variants, predict_x0): corrector UniC on entering step k (k >= 1, order of the
    previous predictor), then predictor UniP with this step's order. History slots: h0 = the previous step's
    corrected sample, h_j = m_{k-j}."""
    steps = len(alpha) - 1
    orders = _unipc_orders(steps, order)
    rows = []
    for k in range(steps):
        u = {"u_x": 1.0}
        if k >= 1:                                           # (1) UniC: x_c from h0, m_k and m_{k-1..k-3}
            pc = orders[k - 1]
            h = lam[k] - lam[k - 1]
            rks, rhos, h_phi_1, B_h = _unipc_rhos(lam, k - 1, h, [k - 1 - j for j in range(1, pc)], pc, variant,
                                                  corrector=True)
            a = alpha[k]
            w = np.zeros(4)                                  # weights on m_{k-1}, m_{k-2}, m_{k-3} (slots 1..3)
            w[1] = -a * h_phi_1 + a * B_h * rhos[-1]
            for j in range(1, pc):                           # D1_j = (m_{k-1-j} - m_{k-1}) / rk_j
                w[1 + j] += -a * B_h * rhos[j - 1] / rks[j - 1]
                w[1] += a * B_h * rhos[j - 1] / rks[j - 1]
            u = {"u_x": 0.0, "u_l": sigma[k] / sigma[k - 1], "u_0": -a * B_h * rhos[-1], "u_1": w[1], "u_2": w[2],
                 "u_3": w[3]}
        po = orders[k]                                       # (2) UniP from x_c, m_k and m_{k-1..k-2}
        if sigma[k + 1] == 0.0:                              # to sigma = 0 (order 1 here): x_0 = m_k
            rows.append(row(**_x0_pred(alpha, sigma, k), **u, p_c=0.0, p_0=1.0))
            continue
        h = lam[k + 1] - lam[k]
        rks, rhos, h_phi_1, B_h = _unipc_rhos(lam, k, h, [k - j for j in range(1, po)], po, variant, corrector=False)
        a = alpha[k + 1]
        p = np.zeros(3)                                      # weights on m_k, m_{k-1}, m_{k-2}
        p[0] = -a * h_phi_1
        for j in range(1, po):                               # D1_j = (m_{k-j} - m_k) / rk_j
            p[j] += -a * B_h * rhos[j - 1] / rks[j - 1]
            p[0] += a * B_h * rhos[j - 1] / rks[j - 1]
        rows.append(row(**_x0_pred(alpha, sigma, k), **u, p_c=sigma[k + 1] / sigma[k], p_0=p[0], p_1=p[1], p_2=p[2]))
    return rows


# -- the step ---------------------------------------------------------------------------------------------------

def eps_gain(coefs) -> np.ndarray:
    """|d x_{t-1} / d out| of a step, from its row (N_COEFS,) or rows (..., N_COEFS): how much an error in the
    network's output (eps, v or x_0, whichever the plan's rows are for) moves x_{t-1}, through m = a_x x_t - a_e out,
    the corrector's u_0 m, the predictor's p_c x_c + p_0 m and its c_e out term. On a pixel whose m is clipped, m no
    longer moves and only c_e out does: the gain there is |c_e| (DDIM: sqrt(1 - a-bar_{t-1}), far above the
    unclipped gain, where the two terms almost cancel), so with clipping on it is the larger of the two (x_{t-1} is
    piecewise linear in out, so that is its Lipschitz constant). Verify scales its per-step bound by it."""
    c = np.asarray(coefs, dtype=np.float64)
    col = lambda name: c[..., COL[name]]  # noqa: E731
    unclipped = np.abs(col("c_e") - col("a_e") * (col("p_0") + col("p_c") * col("u_0")))
    return np.where(col("clip") < NO_CLIP, np.maximum(unclipped, np.abs(col("c_e"))), unclipped)


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
    x_prev = p_c * x_c + p_0 * m                                             # (3) mean of p(x_{t-1} | x_t)
    if not (isinstance(c_e, float) and c_e == 0.0):  # DDPM has no eps term: skip it (host loop, issue 17)
        x_prev += c_e * eps
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
