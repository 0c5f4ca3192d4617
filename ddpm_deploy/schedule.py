"""Noise schedules and the closed-form coefficients derived from them.

Everything is computed once here, in float64 numpy, and cast at the edge (the trainer takes
`torch.from_numpy(...)`, the runtime casts per-step scalars to float32). Notation follows Ho et al. 2020:
beta_t, alpha_t = 1 - beta_t, alphas_cumprod = prod_{s<=t} alpha_s (a-bar_t), and the posterior
q(x_{t-1} | x_t, x_0) = N(mean_coef1 * x_0 + mean_coef2 * x_t, posterior_variance).
Index t runs 0..T-1 (diffusers' convention; the paper's t = index + 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

BETA_SCHEDULES = ("linear", "cosine", "geometric")

# diffusers names for the same schedules, so its configs map onto ours.
DIFFUSERS_SCHEDULE_NAMES = {"linear": "linear", "squaredcos_cap_v2": "cosine"}
# Improved DDPM clips cosine betas at 0.999 so that the last step stays a proper Gaussian.
COSINE_MAX_BETA = 0.999
# diffusers clamps the posterior variance before taking its log (t = 0 has variance exactly 0).
MIN_POSTERIOR_VARIANCE = 1e-20


class ScheduleError(ValueError):
    """A schedule description that cannot be built."""


def make_betas(kind: str, num_train_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """beta_1..beta_T in float64 for one of BETA_SCHEDULES."""
    T = int(num_train_timesteps)
    if T < 2:
        raise ScheduleError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
    if kind == "linear":
        if not 0 < beta_start < beta_end < 1:
            raise ScheduleError(f"need 0 < beta_start < beta_end < 1, got {beta_start}, {beta_end}")
        return np.linspace(beta_start, beta_end, T, dtype=np.float64)
    if kind == "geometric":
        # beta_t = beta_start * (beta_end / beta_start) ** ((t - 1) / (T - 1)): a constant ratio between steps.
        if not 0 < beta_start < beta_end < 1:
            raise ScheduleError(f"need 0 < beta_start < beta_end < 1, got {beta_start}, {beta_end}")
        return np.geomspace(beta_start, beta_end, T, dtype=np.float64)
    if kind == "cosine":
        return _cosine_betas(T)
    raise ScheduleError(f"unknown beta schedule {kind!r}; choose one of {', '.join(BETA_SCHEDULES)}")


def _cosine_betas(T: int, s: float = 0.008) -> np.ndarray:
    """Improved DDPM (Nichol & Dhariwal 2021, eq. 17): a-bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2)."""
    def alpha_bar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), COSINE_MAX_BETA) for i in range(T)]
    return np.asarray(betas, dtype=np.float64)


@dataclass(frozen=True)
class Schedule:
    """A fixed variance schedule and every table the trainer and samplers need (all float64)."""

    kind: str
    num_train_timesteps: int
    beta_start: float
    beta_end: float
    betas: np.ndarray = field(repr=False)

    @classmethod
    def build(cls, kind: str = "linear", num_train_timesteps: int = 1000,
              beta_start: float = 1e-4, beta_end: float = 0.02) -> "Schedule":
        betas = make_betas(kind, num_train_timesteps, beta_start, beta_end)
        return cls(kind, int(num_train_timesteps), float(beta_start), float(beta_end), betas)

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        try:
            return cls.build(d["beta_schedule"], d["num_train_timesteps"], d["beta_start"], d["beta_end"])
        except KeyError as e:
            raise ScheduleError(f"schedule description lacks {e.args[0]!r}") from None

    def to_dict(self) -> dict:
        return {"beta_schedule": self.kind, "num_train_timesteps": self.num_train_timesteps,
                "beta_start": self.beta_start, "beta_end": self.beta_end}

    @property
    def T(self) -> int:
        return self.num_train_timesteps

    @property
    def alphas(self) -> np.ndarray:
        return 1.0 - self.betas

    @cached_property  # read on every plan row; computing it each time cost ~1% of a batch-1 step
    def alphas_cumprod(self) -> np.ndarray:
        return np.cumprod(self.alphas)

    @property
    def alphas_cumprod_prev(self) -> np.ndarray:
        return np.concatenate([[1.0], self.alphas_cumprod[:-1]])

    @property
    def posterior_variance(self) -> np.ndarray:
        """beta-tilde_t = (1 - a-bar_{t-1}) / (1 - a-bar_t) * beta_t (Ho et al. eq. 7)."""
        return (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod) * self.betas

    @property
    def posterior_mean_coef1(self) -> np.ndarray:
        """Coefficient of x_0 in the posterior mean (eq. 7)."""
        return np.sqrt(self.alphas_cumprod_prev) * self.betas / (1.0 - self.alphas_cumprod)

    @property
    def posterior_mean_coef2(self) -> np.ndarray:
        """Coefficient of x_t in the posterior mean (eq. 7)."""
        return np.sqrt(self.alphas) * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @property
    def posterior_log_variance_clipped(self) -> np.ndarray:
        """log beta-tilde_t with t = 0 (variance 0) replaced by t = 1, as in Improved DDPM."""
        v = self.posterior_variance
        return np.log(np.concatenate([[v[1]], v[1:]]))
