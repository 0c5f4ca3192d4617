"""Multistep solvers as plan rows: DPM-Solver++ (Lu et al. 2022) and UniPC (Zhao et al. 2023) in data-prediction
(x_0) form, following diffusers' DPMSolverMultistepScheduler and UniPCMultistepScheduler.

With alpha_s = sqrt(a-bar), sigma_s = sqrt(1 - a-bar) and lambda = log(alpha / sigma), each update is a linear
combination of the sample and the x_0-predictions m of the last few steps whose weights depend only on the
lambdas: a row of the table (`ddpm_deploy.sampling.step`). diffusers' edge rules are kept: the final step goes to
sigma = 0 (final_sigmas_type="zero": it returns the x_0-prediction), orders drop at the start (warm-up) and near the
end (lower_order_final), no thresholding (so no clip), learned-variance channels are dropped.
"""

from __future__ import annotations

import numpy as np

from ..errors import UserError
from .step import NO_CLIP, row
from .spec import SPACINGS
from .schedule import Schedule
from .timesteps import timesteps as grid


def _repeats(timesteps: np.ndarray, steps: int) -> bool:
    """The grid is not `steps` strictly descending timesteps (spacings round several steps onto one t)."""
    return len(timesteps) != steps or bool(np.any(np.diff(timesteps) >= 0))


def _repeat_advice(T: int, steps: int, spacing: str) -> str:
    """What does work: the other spacings that give `steps` distinct timesteps on this T, and the most steps below
    `steps` that this spacing gives distinct (trailing's float stride fails at scattered counts, not only at T)."""
    others = [s for s in SPACINGS if s != spacing and not _repeats(grid(T, steps, s, multistep=True), steps)]
    fewer = next((k for k in range(steps - 1, 0, -1) if not _repeats(grid(T, k, spacing, multistep=True), k)), 1)
    return f"use {fewer} steps" + (f" or spacing {' or '.join(others)}" if others else "")


def multistep_rows(schedule: Schedule, sampler: str, steps: int, order: int, variant: str | None,
                   spacing: str) -> tuple[np.ndarray, list[tuple]]:
    """(timesteps, one row per step) of dpmpp, dpmpp_sde or unipc on this schedule."""
    T = schedule.T
    timesteps = grid(T, steps, spacing, multistep=True)
    if _repeats(timesteps, steps):
        raise UserError(f"{steps} steps with {spacing!r} spacing repeat timesteps for T={T}: "
                        f"{_repeat_advice(T, steps, spacing)}")
    ac = schedule.alphas_cumprod[timesteps]
    alpha = np.append(np.sqrt(ac), 1.0)            # step k goes from index k to k + 1; index K is sigma = 0
    sigma = np.append(np.sqrt(1.0 - ac), 0.0)
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)        # lambda_K = +inf
    if sampler == "unipc":
        return timesteps, _unipc_rows(alpha, sigma, lam, order, variant)
    return timesteps, [_dpmpp_row(alpha, sigma, lam, k, _dpmpp_order(k, steps, order), sde=sampler == "dpmpp_sde")
                       for k in range(steps)]


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
