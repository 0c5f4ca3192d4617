"""What the reverse loop refuses: plans not finite in float32, batches of the wrong shape, flagged steps and
non-finite results, each as one line naming the step, t and backend (numpy only)."""

from __future__ import annotations

import numpy as np

from ..errors import NonFiniteError, UserError
from ..artifact.manifest import Manifest
from ..fused_io import COEF_NAMES
from ..sampling.plan import SamplingPlan


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
    advice = ("OpenVINO's bf16 kernels gave NaN now and then on this project's CPUs (OpenVINO 2026.4.1): use "
              "--precision fp32" if backend.endswith("bf16") else
              "for fp16 re-export with `ddpm-deploy export --fp16` (audit on) or use fp32")
    return NonFiniteError(f"non-finite values at step {k} (t={t}) on backend {backend}{which}: the network output or "
                          f"the x_0-prediction overflowed and is refused rather than clipped into an image; {advice}")


def check_step_flags(flags: np.ndarray, timesteps, backend: str, k0: int = 0) -> None:
    """flags (K, B): the fused step's `nonfinite` output of steps k0.. (ddpm_deploy.graph.fused); refuse at the first
    step with a flagged image (anything but 0 counts: a NaN flag too)."""
    bad = np.asarray(flags) != 0
    if bad.any():
        j = int(np.argmax(bad.any(axis=1)))
        raise nonfinite_step(k0 + j, int(timesteps[k0 + j]), backend, np.flatnonzero(bad[j]).tolist())


def check_finite(out: np.ndarray, k: int, t: int, backend: str) -> None:
    if not np.isfinite(out).all():
        raise nonfinite_step(k, t, backend)


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
