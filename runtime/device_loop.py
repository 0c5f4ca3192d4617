"""What device-resident reverse loops (TensorRT, onnxruntime IO binding) share: the fused step graph's per-step
inputs as tables uploaded once, and the step noise in windows that bound device memory."""

from __future__ import annotations

import numpy as np

from ..noise import ChunkNoise
from ..samplers import N_COEFS, SamplingPlan

# Step noise on the device at once: (K, B, C, H, W) float32 is 1000 x 16 x 3 x 32 x 32 x 4 B = 197 MB for a
# 1000-step CIFAR-size batch but 12.6 GB at 256x256; above this it goes up in windows of steps.
NOISE_WINDOW_BYTES = 512 << 20


def step_tables(plan: SamplingPlan, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """t (K, B) and coefs (K, 8) as the fused graph takes them: float32, C-contiguous, one row per step."""
    t = np.ascontiguousarray(np.repeat(plan.timesteps.astype(np.float32)[:, None], batch, axis=1))
    coefs = np.ascontiguousarray(plan.coefs.astype(np.float32))
    assert coefs.shape == (plan.steps, N_COEFS), coefs.shape
    return t, coefs


def window_steps(steps: int, step_bytes: int, budget: int = NOISE_WINDOW_BYTES) -> int:
    """Steps of noise per upload: all of them when they fit in `budget`, else as many as fit (at least 1)."""
    return max(1, min(steps, budget // max(step_bytes, 1)))


def noise_windows(noise: ChunkNoise, steps: int, window: int):
    """Yield (k0, k1, z[k0:k1]) float32 (k1 - k0, B, C, H, W) in step order; drawing in order keeps the seeded
    streams identical to `noise.all_z(steps)`."""
    for k0 in range(0, steps, window):
        k1 = min(steps, k0 + window)
        yield k0, k1, np.ascontiguousarray(np.stack([noise.z(k) for k in range(k0, k1)]), dtype=np.float32)
