"""The variational bound in bits/dim (Ho et al. 2020, eq. 5), computed in numpy through any eps function.

L = L_T + sum_{t=2}^{T} L_{t-1} + L_0, with
  L_T     = KL(q(x_T | x_0) || N(0, I))
  L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)),  x_t ~ q(x_t | x_0)
  L_0     = -log p_theta(x_0 | x_1), a Gaussian discretized to 256 bins on [-1, 1] (eq. 13).
The model variance follows Ho et al.'s code: fixed_small uses beta-tilde with t=0 replaced by t=1,
fixed_large uses beta with t=0 replaced by beta-tilde_1; learned_range interpolates their logs.
Indices are 0-based (paper t = index + 1). x_t noise comes from a seeded numpy generator, so two engines
evaluated with the same seed see identical x_t.
"""

from __future__ import annotations

import math

import numpy as np

from .schedule import Schedule


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + np.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * np.exp(-logvar2))


def _approx_std_normal_cdf(x):
    # the tanh approximation Ho et al. use (from PixelCNN++), kept for comparability of the numbers
    return 0.5 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(x) for x in [-1, 1] quantized to 256 levels under N(means, e^(2 log_scales)) (eq. 13)."""
    centered = x - means
    inv_stdv = np.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = np.log(np.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = np.log(np.maximum(1.0 - cdf_min, 1e-12))
    log_probs = np.where(x < -0.999, log_cdf_plus,
                         np.where(x > 0.999, log_one_minus_cdf_min, np.log(np.maximum(cdf_plus - cdf_min, 1e-12))))
    return log_probs


def model_log_variance(schedule: Schedule, variance_type: str, t: int, v: np.ndarray | None) -> np.ndarray | float:
    min_log = schedule.posterior_log_variance_clipped[t]
    if variance_type == "fixed_small":
        return min_log
    large = np.log(np.concatenate([[schedule.posterior_variance[1]], schedule.betas[1:]]))[t]
    if variance_type == "fixed_large":
        return large
    frac = (v + 1.0) / 2.0                                      # learned_range (Improved DDPM eq. 15)
    return frac * np.log(schedule.betas[t]) + (1.0 - frac) * min_log


def predicted_x0(out: np.ndarray, x_t: np.ndarray, ac_t: float, prediction_type: str = "epsilon") -> np.ndarray:
    """x_0 from the network's output (eps: Ho et al. eq. 15; v: alpha x_t - sigma v; sample: the output itself)."""
    alpha, sigma = np.sqrt(ac_t), np.sqrt(1.0 - ac_t)
    if prediction_type == "epsilon":
        return (x_t - sigma * out) / alpha
    if prediction_type == "v_prediction":
        return alpha * x_t - sigma * out
    if prediction_type == "sample":
        return out
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def bits_per_dim(eps_fn, x_0: np.ndarray, schedule: Schedule, *, variance_type: str = "fixed_small",
                 clip_sample: bool = True, clip_sample_range: float = 1.0, prediction_type: str = "epsilon",
                 seed: int = 0, progress=None) -> dict:
    """Per-image bound terms for images x_0 (N, C, H, W) in [-1, 1]; eps_fn(x_t float32, t float32 (N,)) is the
    network (its output is eps, v or x_0 as `prediction_type` says)."""
    x_0 = x_0.astype(np.float64)
    n, c = x_0.shape[:2]
    dims = float(np.prod(x_0.shape[1:]))
    ac = schedule.alphas_cumprod
    rng = np.random.default_rng(seed)
    terms = np.zeros((schedule.T, n))
    for t in range(schedule.T - 1, -1, -1):
        noise = rng.standard_normal(x_0.shape)
        x_t = np.sqrt(ac[t]) * x_0 + np.sqrt(1.0 - ac[t]) * noise                # q(x_t | x_0), eq. 4
        out = eps_fn(x_t.astype(np.float32), np.full(n, t, np.float32)).astype(np.float64)
        pred, v = out[:, :c], (out[:, c:] if out.shape[1] == 2 * c else None)
        x0_hat = predicted_x0(pred, x_t, ac[t], prediction_type)                  # eq. 15 for eps
        if clip_sample:
            x0_hat = np.clip(x0_hat, -clip_sample_range, clip_sample_range)
        mean = schedule.posterior_mean_coef1[t] * x0_hat + schedule.posterior_mean_coef2[t] * x_t
        logvar = model_log_variance(schedule, variance_type, t, v)
        if t == 0:                                                                  # L_0, decoder NLL
            ll = discretized_gaussian_log_likelihood(x_0, mean, 0.5 * np.broadcast_to(logvar, mean.shape))
            terms[t] = -ll.reshape(n, -1).sum(1)
        else:                                                                       # L_{t-1}
            q_mean = schedule.posterior_mean_coef1[t] * x_0 + schedule.posterior_mean_coef2[t] * x_t
            kl = normal_kl(q_mean, schedule.posterior_log_variance_clipped[t], mean, logvar)
            terms[t] = kl.reshape(n, -1).sum(1)
        if progress is not None:
            progress.update(1)
    mean_T = np.sqrt(ac[-1]) * x_0                                                  # L_T, prior term
    prior = normal_kl(mean_T, np.log(1.0 - ac[-1]), 0.0, 0.0).reshape(n, -1).sum(1)
    to_bpd = 1.0 / (dims * math.log(2.0))
    total = (terms.sum(0) + prior) * to_bpd
    return {"bits_per_dim": float(total.mean()), "per_image": total.tolist(),
            "prior_bpd": float(prior.mean() * to_bpd), "decoder_bpd": float(terms[0].mean() * to_bpd),
            "kl_terms_bpd": float(terms[1:].sum(0).mean() * to_bpd),
            "per_t_bpd": (terms.mean(1) * to_bpd).tolist()}
