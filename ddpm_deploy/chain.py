"""What every backend provides, and the host-side reverse loop (numpy only): the PyTorch reference's, and the CPU
backends' for fp16 files or with fused_step=False (otherwise they and the GPU backends run runtime.device_loop).

A backend wraps one loaded network (onnxruntime, OpenVINO, TensorRT, the PyTorch reference); `run_chain` drives
the plan x_T -> x_0, calling `callback(StepInfo)` after each step when one is given (verification).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np

from .errors import NonFiniteError, UserError
from .manifest import Manifest
from .samplers import COEF_NAMES, N_HIST, SamplingPlan, step, step_with_history


class StepInfo(NamedTuple):
    """One reverse step as a callback sees it: step index k (0 = first, at t = T-1 for DDPM), timestep t,
    the step's input x_t (B, C, H, W), the network output (B, C_out, H, W), the result x_prev, the index of
    the first image of this chunk within the request (`start`, so images of chunked requests can be placed),
    and for plans that carry a history (multistep samplers) the history that went into the step and the one
    that came out (B, N_HIST, C, H, W); None for history-free plans."""

    k: int
    t: int
    x_t: np.ndarray
    model_output: np.ndarray
    x_prev: np.ndarray
    start: int = 0
    hist: np.ndarray | None = None
    hist_out: np.ndarray | None = None


class EngineTimer:
    """Time spent in engine calls, counted by the backend around each call of the network (for a device loop:
    each step's launch). Totals always; with `record()` also each call's (start, seconds), which benchmarks read."""

    def __init__(self):
        self.seconds, self.count, self.calls = 0.0, 0, None

    def record(self) -> list:
        """Start keeping (start, seconds) per call; returns the list that fills."""
        self.calls = []
        return self.calls

    def stop(self) -> None:
        self.calls = None

    def __enter__(self):
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        dt = time.perf_counter() - self._t0
        self.seconds += dt
        self.count += 1
        if self.calls is not None:
            self.calls.append((self._t0, dt))
        return False


class Backend:
    """A context manager around one loaded network. Subclasses set `name`, `manifest`, `max_batch`, implement
    `_eps(x_t, t)`, and may override `run_chain` to keep the whole loop on the device."""

    name = "backend"
    manifest: Manifest
    max_batch: int = 1

    def __init__(self):
        self.engine_time = EngineTimer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self) -> None:
        pass

    def eps(self, x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Network output for float32 x_t (B, C, H, W) and float32 t (B,); time spent is added to engine_time."""
        with self.engine_time:
            return self._eps(x_t, t)

    def _eps(self, x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def eps_batched(self, x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        """`eps` for any number of images, in chunks of at most `max_batch`."""
        outs = [self.eps(np.ascontiguousarray(x_t[s:s + self.max_batch]), t[s:s + self.max_batch])
                for s in range(0, len(x_t), self.max_batch)]
        return np.concatenate(outs)

    def run_chain(self, noise, plan: SamplingPlan, callback=None, progress=None) -> np.ndarray:
        """x_T -> x_0 on the host: eps on the backend, the step in numpy. Returns float32 (B, C, H, W)."""
        check_plan(plan)
        x_t = noise.x_T
        t_vec = np.empty((len(x_t),), dtype=np.float32)
        # the history (last sample, past x_0-predictions) only for multistep plans: keeps DDPM/DDIM loops cheap
        hist = np.zeros((len(x_t), N_HIST, *x_t.shape[1:]), np.float32) if plan.uses_history else None
        hist_out = None
        for k, t in enumerate(plan.timesteps):
            t_vec.fill(t)
            out = self.eps(x_t, t_vec)
            check_finite(out, k, int(t), self.name)
            x_prev, hist_out = host_step(x_t, out, noise.z(k), plan.coefs[k], hist, k, int(t), self.name)
            if callback is not None:
                callback(StepInfo(k, int(t), x_t, out, x_prev, 0, hist, hist_out))
            x_t, hist = x_prev, hist_out
            if progress is not None:
                progress.update(1)
        return check_final(x_t, plan.steps, self.name)


def host_step(x_t: np.ndarray, out: np.ndarray, z: np.ndarray, coefs: np.ndarray, hist, k: int, t: int,
              backend: str) -> tuple:
    """(x_prev, hist_out) of numpy step k (`step`, hist_out None, when `hist` is None; else `step_with_history`),
    refused as NonFiniteError naming the step when it makes an inf or NaN. Its inputs are finite (the caller checked
    eps; x_t and hist come from earlier such steps), so any non-finite value is made here, and it is caught where
    it is made: before the x_0 clip, which turns +-inf into the bound (issue 21)."""
    try:
        with np.errstate(over="raise", invalid="raise"):
            if hist is None:
                return step(x_t, out, z, coefs), None
            return step_with_history(x_t, out, z, coefs, hist)
    except FloatingPointError:
        raise nonfinite_step(k, t, backend) from None


def check_plan(plan: SamplingPlan) -> None:
    """Refuse, before the first step, a plan with a coefficient that is not finite in float32 (what every engine
    and the numpy step compute with: a float64 1e39 is inf there). A schedule whose alphas_cumprod underflows (huge
    T) or whose betas reach 1 makes one; run, the step would clip or propagate it into an image."""
    with np.errstate(over="ignore", invalid="ignore"):
        bad = ~np.isfinite(np.asarray(plan.coefs, dtype=np.float32))
    if not bad.any():
        return
    where = tuple(int(i) for i in np.argwhere(bad)[0])  # (k, col) or, for per-image rows, (k, image, col)
    k, name, value = where[0], COEF_NAMES[where[-1]], float(plan.coefs[where])
    raise UserError(f"the {plan.sampler} plan has a non-finite coefficient {name} = {value:g} (in float32) at step "
                    f"{k} (t={int(plan.timesteps[k])}): the model's schedule overflows there (alphas_cumprod near 0 "
                    "or betas near 1); use fewer num_train_timesteps or another beta schedule")


def nonfinite_step(k: int, t: int, backend: str, images=None) -> NonFiniteError:
    """The error for step k whose network output, x_0-prediction (before its clip) or x_prev is not finite."""
    which = f" (image {', '.join(map(str, images))} of the batch)" if images is not None else ""
    return NonFiniteError(f"non-finite values at step {k} (t={t}) on backend {backend}{which}: the network output or "
                          "the x_0-prediction overflowed and is refused rather than clipped into an image; for fp16 "
                          "re-export with `ddpm-deploy export --fp16` (audit on) or use fp32")


def check_step_flags(flags: np.ndarray, timesteps, backend: str, k0: int = 0) -> None:
    """flags (K, B): the fused step's `nonfinite` output of steps k0.. (ddpm_deploy.graph.fused); refuse at the first
    step with a flagged image (anything but 0 counts: a NaN flag too)."""
    bad = np.asarray(flags) != 0
    if bad.any():
        j = int(np.argmax(bad.any(axis=1)))
        raise nonfinite_step(k0 + j, int(timesteps[k0 + j]), backend, np.flatnonzero(bad[j]).tolist())


def check_finite(out: np.ndarray, k: int, t: int, backend: str) -> None:
    if not np.isfinite(out).all():
        raise NonFiniteError(f"non-finite eps at step {k} (t={t}) on backend {backend}: the engine overflowed; "
                             "for fp16 re-export with `ddpm-deploy export --fp16` (audit on) or use fp32")


def check_final(x0: np.ndarray, steps: int, backend: str) -> np.ndarray:
    """The last line of defence on the result; the steps' own checks (per-step flags, the host loop's floating-point
    errors) name the failing step first."""
    if not np.isfinite(x0).all():
        raise NonFiniteError(f"non-finite x_0 after {steps} steps on backend {backend}: the model overflowed; for "
                             "fp16 re-export with `ddpm-deploy export --fp16` (audit on) or use the fp32 ONNX")
    return x0


def check_batch(x_t: np.ndarray, manifest: Manifest, max_batch: int) -> None:
    assert x_t.dtype == np.float32 and x_t.shape[1:] == manifest.image_shape, (x_t.dtype, x_t.shape)
    assert 1 <= len(x_t) <= max_batch, (len(x_t), max_batch)
