"""The timestep grids of diffusers' `set_timesteps`, descending, in one place: samplers, multistep solvers and
distillation's student grids all take them from here."""

from __future__ import annotations

import numpy as np

from .spec import SPACINGS


def timesteps(T: int, steps: int, spacing: str, multistep: bool = False) -> np.ndarray:
    """`steps` timesteps of 0..T-1 spaced as diffusers does (steps_offset 0). DDPMScheduler/DDIMScheduler lay
    `steps` points; the multistep solvers (DPMSolverMultistep, UniPCMultistep) lay steps + 1 and drop the last (t
    near 0) for linspace and leading. 'trailing' (Lin et al. 2024) is round(arange(T, 0, -T/K)) - 1 for both: it
    starts at t = T - 1, so even one step starts from pure noise."""
    if spacing == "trailing":
        t = np.round(np.arange(T, 0, -T / steps)) - 1
    else:
        n = steps + 1 if multistep else steps
        if spacing == "linspace":
            t = np.linspace(0, T - 1, n).round()[::-1]
        elif spacing == "leading":
            t = (np.arange(0, n) * (T // n))[::-1]
        else:
            raise ValueError(f"unknown timestep spacing {spacing!r}: one of {', '.join(SPACINGS)}")
        t = t[:steps]
    return np.ascontiguousarray(t).astype(np.int64)
