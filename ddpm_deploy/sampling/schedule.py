"""Noise schedules and the closed-form coefficients derived from them.

Everything is computed once here, in float64 numpy, and cast at the edge (the trainer takes
`torch.from_numpy(...)`, the runtime casts per-step scalars to float32). Notation follows Ho et al. 2020:
beta_t, alpha_t = 1 - beta_t, alphas_cumprod = prod_{s<=t} alpha_s (a-bar_t), and the posterior
q(x_{t-1} | x_t, x_0) = N(mean_coef1 * x_0 + mean_coef2 * x_t, posterior_variance).
Index t runs 0..T-1 (diffusers' convention; the paper's t = index + 1).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

BETA_SCHEDULES = ("linear", "cosine", "geometric")
# Any other beta table (learned, hand-tuned, diffusers' `trained_betas`, `train --betas FILE.npy`): carried as the
# list itself with its hash, so it deploys like a named schedule.
CUSTOM = "custom"

# diffusers names for the same schedules, so its configs map onto ours.
DIFFUSERS_SCHEDULE_NAMES = {"linear": "linear", "squaredcos_cap_v2": "cosine"}
# Improved DDPM clips cosine betas at 0.999 so that the last step stays a proper Gaussian.
COSINE_MAX_BETA = 0.999
# diffusers clamps the posterior variance before taking its log (t = 0 has variance exactly 0).
MIN_POSTERIOR_VARIANCE = 1e-20
# Largest T a schedule may have (schedules are read from files anyone can edit). Published DDPMs use T <= 4000
# (Improved DDPM); every table is O(T) float64, the cosine one is built in a Python loop (0.3 s at T = 1e5 here,
# 12 s and 550 MB at 1e7), and t reaches the network as float32, exact for integers only up to 2**24.
MAX_TIMESTEPS = 100_000
# Smallest a-bar_t a schedule may reach. Step coefficients are cast to float32, where the x_0-prediction's
# 1/sqrt(a-bar_t) must stay finite with room for x_t (float32 max 3.4e38): 1e30 here. Linear 1e-4..0.02 over
# T = 1000 ends at 4e-5 and cosine at T = 1e5 at 2.4e-13; a beta near 1 underflows a-bar to 0 (division by 0).
MIN_ALPHAS_CUMPROD = 1e-60


class ScheduleError(ValueError):
    """A schedule description that cannot be built."""


def make_betas(kind: str, num_train_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """beta_1..beta_T in float64 for one of BETA_SCHEDULES (T and the beta range checked before any table is built)."""
    T = _check_timesteps(num_train_timesteps)
    for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or not math.isfinite(value):
            raise ScheduleError(f"{name} must be a finite number, got {value!r}")
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


def _check_timesteps(num_train_timesteps) -> int:
    """T as an int in 2..MAX_TIMESTEPS (a float, bool or string is refused: it was a typo or a tampered file)."""
    T = num_train_timesteps
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)):
        raise ScheduleError(f"num_train_timesteps must be an integer, got {T!r}")
    if not 2 <= T <= MAX_TIMESTEPS:
        raise ScheduleError(f"num_train_timesteps must be in 2..{MAX_TIMESTEPS}, got {T}")
    return int(T)


def check_alphas_cumprod(betas: np.ndarray) -> None:
    """Refuse a beta table whose a-bar_t = prod(1 - beta_s) is not strictly decreasing within
    [MIN_ALPHAS_CUMPROD, 1): such a schedule divides by 0 (a-bar underflowed, or 1 - a-bar_t rounded to 0) or gives
    step coefficients that overflow float32. Every Schedule is checked, whoever builds it (manifest, trainer)."""
    if len(betas) > MAX_TIMESTEPS:
        raise ScheduleError(f"num_train_timesteps must be at most {MAX_TIMESTEPS}, got {len(betas)}")
    b = np.asarray(betas, dtype=np.float64)
    bad = ~(np.isfinite(b) & (b > 0) & (b < 1))
    if bad.any():
        i = int(np.argmax(bad))
        raise ScheduleError(f"betas must be finite and in (0, 1), but beta[{i}] = {float(b[i])!r}")
    ac = np.cumprod(1.0 - b)
    if ac[-1] < MIN_ALPHAS_CUMPROD:
        i = int(np.argmax(ac < MIN_ALPHAS_CUMPROD))
        raise ScheduleError(f"alphas_cumprod falls to {float(ac[i]):.3g} at t = {i}, below {MIN_ALPHAS_CUMPROD:g} "
                            "(its step coefficients would overflow float32, or divide by 0): use smaller betas or "
                            "fewer timesteps")
    flat = np.diff(np.concatenate([[1.0], ac])) >= 0
    if flat.any():
        i = int(np.argmax(flat))
        raise ScheduleError(f"alphas_cumprod must decrease strictly from 1, but alphas_cumprod[{i}] = "
                            f"{float(ac[i])!r} (beta[{i}] = {float(b[i])!r} is below float64 resolution)")


def _cosine_betas(T: int, s: float = 0.008) -> np.ndarray:
    """Improved DDPM (Nichol & Dhariwal 2021, eq. 17): a-bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2)."""
    def alpha_bar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), COSINE_MAX_BETA) for i in range(T)]
    return np.asarray(betas, dtype=np.float64)


def check_betas(betas, num_train_timesteps: int | None = None) -> np.ndarray:
    """A custom beta table as float64 (T,): finite, each in (0, 1), 2 <= T <= MAX_TIMESTEPS (and T ==
    num_train_timesteps if given); Schedule's own check (check_alphas_cumprod) then judges a-bar."""
    if num_train_timesteps is not None:
        num_train_timesteps = _check_timesteps(num_train_timesteps)
    if isinstance(betas, (list, tuple)) and len(betas) > MAX_TIMESTEPS:  # before numpy copies a huge list
        raise ScheduleError(f"betas has {len(betas)} entries, more than {MAX_TIMESTEPS}")
    try:
        b = np.asarray(betas)
    except (TypeError, ValueError):  # ragged nested lists
        raise ScheduleError("betas must be a 1-D table of numbers") from None
    if b.ndim != 1 or b.dtype == bool or not (np.issubdtype(b.dtype, np.floating)
                                              or np.issubdtype(b.dtype, np.integer)):
        raise ScheduleError(f"betas must be a 1-D table of numbers, got shape {b.shape} of {b.dtype}")
    b = b.astype(np.float64)
    if not 2 <= len(b) <= MAX_TIMESTEPS:
        raise ScheduleError(f"betas must have 2..{MAX_TIMESTEPS} entries, got {len(b)}")
    if num_train_timesteps is not None and len(b) != num_train_timesteps:
        raise ScheduleError(f"betas has {len(b)} entries but num_train_timesteps is {num_train_timesteps}")
    bad = ~(np.isfinite(b) & (b > 0) & (b < 1))
    if bad.any():
        i = int(np.argmax(bad))
        raise ScheduleError(f"betas must be finite and in (0, 1); betas[{i}] = {b[i]!r}")
    return b


def betas_sha256(betas: np.ndarray) -> str:
    """sha256 of the table as little-endian float64 bytes (what a manifest's `betas_sha256` holds)."""
    return hashlib.sha256(np.ascontiguousarray(betas, dtype="<f8").tobytes()).hexdigest()


@dataclass(frozen=True)
class Schedule:
    """A fixed variance schedule and every table the trainer and samplers need (all float64)."""

    kind: str
    num_train_timesteps: int
    beta_start: float
    beta_end: float
    betas: np.ndarray = field(repr=False)

    def __post_init__(self):
        check_alphas_cumprod(self.betas)

    @classmethod
    def build(cls, kind: str = "linear", num_train_timesteps: int = 1000,
              beta_start: float = 1e-4, beta_end: float = 0.02) -> "Schedule":
        betas = make_betas(kind, num_train_timesteps, beta_start, beta_end)
        return cls(kind, int(num_train_timesteps), float(beta_start), float(beta_end), betas)

    @classmethod
    def from_betas(cls, betas) -> "Schedule":
        """A custom schedule from any valid beta table (see check_betas)."""
        b = check_betas(betas)
        b.setflags(write=False)
        return cls(CUSTOM, len(b), float(b[0]), float(b[-1]), b)

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        try:
            if d["beta_schedule"] == CUSTOM:
                return cls._custom_from_dict(d)
            return cls.build(d["beta_schedule"], d["num_train_timesteps"], d["beta_start"], d["beta_end"])
        except KeyError as e:
            raise ScheduleError(f"schedule description lacks {e.args[0]!r}") from None

    @classmethod
    def _custom_from_dict(cls, d: dict) -> "Schedule":
        """A custom table, checked: its entries (check_betas), its length against num_train_timesteps, its hash."""
        if not isinstance(d["betas"], list):
            raise ScheduleError("custom schedule's betas must be a list of numbers")
        b = check_betas(d["betas"], d["num_train_timesteps"])
        if betas_sha256(b) != d["betas_sha256"]:
            raise ScheduleError("custom schedule's betas do not match its betas_sha256 (the table was altered)")
        return cls.from_betas(b)

    def to_dict(self) -> dict:
        d = {"beta_schedule": self.kind, "num_train_timesteps": self.num_train_timesteps,
             "beta_start": self.beta_start, "beta_end": self.beta_end}
        if self.kind == CUSTOM:  # repr-exact floats in JSON: the table round-trips bit for bit
            d.update(betas=[float(b) for b in self.betas], betas_sha256=betas_sha256(self.betas))
        return d

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
