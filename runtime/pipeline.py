"""The embedding API: a Pipeline samples images from any backend with the numpy samplers and host noise."""
# tqdm (50 ms to import) is imported only when a progress bar is asked for.

from __future__ import annotations

import time

import numpy as np

from ..loop.run import StepInfo
from ..errors import UserError
from ..images import to_uint8
from ..sampling.noise import ChunkNoise, run_chunked
from ..sampling.spec import API_DEFAULT_SAMPLER, SamplerSpec, as_spec, default_sampler
from ..sampling.plan import SamplingPlan, model_plan

OUTPUTS = ("uint8", "float")


class Pipeline:
    """Wraps a backend; `sample` runs the reverse chain. Use as a context manager to free the backend."""

    def __init__(self, backend):
        self.backend = backend
        self.manifest = backend.manifest
        self.schedule = self.manifest.schedule
        self.image_shape = self.manifest.image_shape
        self.last_timing: dict = {}
        self._plans: dict = {}  # SamplerSpec -> SamplingPlan: T=1000 rows take ~8 ms to build

    def __enter__(self):
        self.backend.__enter__()
        return self

    def __exit__(self, *exc):
        return self.backend.__exit__(*exc)

    def close(self) -> None:
        self.backend.close()

    def plan(self, sampler: str | None = None, steps: int | None = None, eta: float = 0.0, *, order: int | None = None,
             variant: str | None = None, spacing: str | None = None, spec: SamplerSpec | None = None) -> SamplingPlan:
        """The sampler's table for this model (see `ddpm_deploy.sampling.plan.make_plan`), from `spec` or the same
        fields given separately. sampler None: a student's own sampler and grid ("distilled" or "lcm"), else "ddpm"
        (the paper's chain)."""
        spec = as_spec(spec, sampler=sampler, steps=steps, eta=eta, order=order, variant=variant, spacing=spacing)
        spec = spec.with_default(default_sampler(self.manifest.distilled, API_DEFAULT_SAMPLER))
        if spec not in self._plans:  # plans are frozen: one per request shape is shared by every later call
            self._plans[spec] = model_plan(self.manifest, spec)
        return self._plans[spec]

    def sample(self, n: int, *, seed: int = 0, sampler: str | None = None, steps: int | None = None, eta: float = 0.0,
               order: int | None = None, variant: str | None = None, spacing: str | None = None,
               spec: SamplerSpec | None = None, batch_size: int | None = None, x_T: np.ndarray | None = None,
               step_noise: np.ndarray | None = None, output: str = "uint8", progress: bool = False,
               callback=None) -> np.ndarray:
        """Draw n images. uint8 (N, H, W, C) by default; output="float" gives float32 (N, C, H, W) x_0.

        `spec`: a `ddpm_deploy.sampling.spec.SamplerSpec`, or its fields as separate keywords (not both):
        `sampler` is one of ddpm, ddim (`eta` 0-1), dpmpp (DPM-Solver++, `order` 1-3), dpmpp_sde (order 1-2),
        unipc (`order` 1-3, `variant` bh1/bh2) or lcm (consistency multistep sampling, LCMScheduler); `spacing`
        (linspace/leading/trailing) applies to the multistep ones. None: ddpm, or for a student (`ddpm-deploy
        distill`) its own sampler and grid: "distilled" (DDIM on the grid it was made for) or "lcm".

        `x_T` (N, C, H, W) and `step_noise` (K, N, C, H, W) replace the seeded noise (see ddpm_deploy.sampling.noise).
        `callback(info)` is called after every step with a `ddpm_deploy.loop.run.StepInfo` (k, t, x_t, model_output,
        x_prev, start: the request index of the chunk's first image, hist/hist_out for multistep plans), for
        verification.
        """
        if not isinstance(n, (int, np.integer)) or n <= 0:
            raise UserError(f"number of images must be a positive integer, got {n}")
        if output not in OUTPUTS:
            raise UserError(f"output must be one of {OUTPUTS}, got {output!r}")
        plan = self.plan(sampler, steps, eta, order=order, variant=variant, spacing=spacing, spec=spec)
        self._check_noise(n, plan, x_T, step_noise)
        batch = min(batch_size or self.backend.max_batch, self.backend.max_batch)
        if batch <= 0:
            raise UserError(f"batch size must be positive, got {batch_size}")
        bar = _progress(progress, plan.steps * -(-n // batch))

        def run(noise: ChunkNoise) -> np.ndarray:
            cb = None if callback is None else _offset_callback(callback, noise.start)
            return self.backend.run_chain(noise, plan, callback=cb, progress=bar)

        t0 = time.perf_counter()
        try:
            x0 = run_chunked(run, self.image_shape, n, batch, seed=seed, x_T=x_T, step_noise=step_noise)
        finally:
            if bar is not None:
                bar.close()
        self.last_timing = {"seconds": time.perf_counter() - t0, "steps": plan.steps, "images": n}
        return to_uint8(x0) if output == "uint8" else x0

    def _check_noise(self, n, plan, x_T, step_noise) -> None:
        if x_T is not None and x_T.shape != (n, *self.image_shape):
            raise UserError(f"x_T must have shape {(n, *self.image_shape)}, got {x_T.shape}")
        if step_noise is not None and step_noise.shape != (plan.steps, n, *self.image_shape):
            raise UserError(f"step_noise must have shape {(plan.steps, n, *self.image_shape)}, got {step_noise.shape}")
        if step_noise is not None and x_T is None:
            raise UserError("step_noise needs x_T as well")


def _offset_callback(callback, start: int):
    def offset(info: StepInfo) -> None:
        callback(info._replace(start=start))

    return offset


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="sampling", unit="step", leave=False)
