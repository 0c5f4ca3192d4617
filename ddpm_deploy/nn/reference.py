"""PyTorch reference for ancestral DDPM sampling (Ho et al. 2020, Algorithm 2 / eq. 11).

Written directly from the paper in torch, independent of the numpy samplers the runtime uses, so the two
can check each other. The network and all noise are passed in: the same x_T and z give the same chain.
"""
# torch (the torch extra) is imported where used: importing ddpm_deploy.nn needs no torch.

from __future__ import annotations

import numpy as np

from ..sampling.schedule import Schedule


def ddpm_reference_sample(eps_model, x_T, step_noise, schedule: Schedule, *, variance_type: str = "fixed_small",
                          clip_sample: bool = False, clip_sample_range: float = 1.0, callback=None):
    """Run x_T -> x_0 over all T steps. `eps_model(x_t, t)` returns eps (B,C,H,W); `step_noise[k]` is z at the
    k-th step (t = T-1-k). With clip_sample the x_0 prediction is clipped and the posterior mean (eq. 7) used,
    which equals eq. 11 when nothing is clipped."""
    import torch

    T = schedule.T
    assert step_noise.shape[0] == T and step_noise.shape[1:] == x_T.shape, (step_noise.shape, x_T.shape)
    tab = {k: torch.from_numpy(np.asarray(v)) for k, v in {
        "beta": schedule.betas, "alpha": schedule.alphas, "ac": schedule.alphas_cumprod,
        "coef1": schedule.posterior_mean_coef1, "coef2": schedule.posterior_mean_coef2,
        "post_var": schedule.posterior_variance}.items()}
    x_t = x_T.to(torch.float64)
    for k, t in enumerate(range(T - 1, -1, -1)):
        t_batch = torch.full((x_t.shape[0],), t, dtype=torch.float32)
        with torch.no_grad():
            eps = eps_model(x_t.to(torch.float32), t_batch).to(torch.float64)
        if clip_sample:
            x0 = (x_t - torch.sqrt(1 - tab["ac"][t]) * eps) / torch.sqrt(tab["ac"][t])
            x0 = x0.clamp(-clip_sample_range, clip_sample_range)
            mean = tab["coef1"][t] * x0 + tab["coef2"][t] * x_t
        else:  # eq. 11: 1/sqrt(alpha_t) * (x_t - beta_t / sqrt(1 - a-bar_t) * eps)
            mean = (x_t - tab["beta"][t] / torch.sqrt(1 - tab["ac"][t]) * eps) / torch.sqrt(tab["alpha"][t])
        var = tab["post_var"][t] if variance_type == "fixed_small" else tab["beta"][t]
        sigma = torch.sqrt(var) if t > 0 else torch.zeros((), dtype=torch.float64)
        x_t = mean + sigma * step_noise[k].to(torch.float64)
        if callback is not None:
            callback(k, t, x_t)
    return x_t.to(torch.float32)
