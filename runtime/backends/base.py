"""What every backend provides, and the host-side reverse loop most of them use."""

from __future__ import annotations

import numpy as np

from ...errors import UserError
from ...samplers import SamplingPlan, step


class NonFiniteError(UserError):
    pass


class Backend:
    """A context manager around one loaded network. Subclasses set `name`, `manifest`, `max_batch`, implement
    `eps(x_t, t)`, and may override `run_chain` to keep the whole loop on the device."""

    name = "backend"
    manifest: dict
    max_batch: int = 1
    # Methods that run the network once. Benchmarks time exactly these to split engine time from loop overhead;
    # a backend whose run_chain calls something else per step (a fused or device loop) lists that method too.
    engine_calls: tuple = ("eps",)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self) -> None:
        pass

    def eps(self, x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Network output for float32 x_t (B, C, H, W) and float32 t (B,)."""
        raise NotImplementedError

    def eps_batched(self, x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        """`eps` for any number of images, in chunks of at most `max_batch`."""
        outs = [self.eps(np.ascontiguousarray(x_t[s:s + self.max_batch]), t[s:s + self.max_batch])
                for s in range(0, len(x_t), self.max_batch)]
        return np.concatenate(outs)

    def run_chain(self, noise, plan: SamplingPlan, callback=None, progress=None) -> np.ndarray:
        """x_T -> x_0 on the host: eps on the backend, the step in numpy. Returns float32 (B, C, H, W)."""
        x_t = noise.x_T
        t_vec = np.empty((len(x_t),), dtype=np.float32)
        for k, t in enumerate(plan.timesteps):
            t_vec.fill(t)
            out = self.eps(x_t, t_vec)
            check_finite(out, k, int(t), self.name)
            z = noise.z(k)
            x_prev = step(x_t, out, z, plan.coefs[k])
            if callback is not None:
                callback(k, int(t), x_t, out, x_prev)
            x_t = x_prev
            if progress is not None:
                progress.update(1)
        return x_t


def check_finite(out: np.ndarray, k: int, t: int, backend: str) -> None:
    if not np.isfinite(out).all():
        raise NonFiniteError(f"non-finite eps at step {k} (t={t}) on backend {backend}: the engine overflowed; "
                             "for fp16 re-export with `ddpm-deploy export --fp16` (audit on) or use fp32")


def check_batch(x_t: np.ndarray, manifest: dict, max_batch: int) -> None:
    c, h, w = (manifest["image"][k] for k in ("channels", "height", "width"))
    assert x_t.dtype == np.float32 and x_t.shape[1:] == (c, h, w), (x_t.dtype, x_t.shape)
    assert 1 <= len(x_t) <= max_batch, (len(x_t), max_batch)
