"""Host-side noise with a documented generator, so every backend and machine sees the same numbers.

Image i of a request with seed s owns the stream `numpy.random.default_rng([s, i])` (PCG64). From it, in
order: x_T = standard_normal((C, H, W), float32), then z_k = standard_normal((C, H, W), float32) for each
step k = 0..K-1 of the plan (z of the last step is drawn but unused when sigma = 0). Because each image has
its own stream, chunking and batch size never change the images.

The host loop takes z in windows of several steps, drawn with one generator call per image: a draw of
(W, C, H, W) gives exactly the numbers of W successive (C, H, W) draws (tested), at a fraction of the per-call
cost, which at batch 1 on a small model is a visible part of each step.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

WINDOW_BYTES = 1 << 22   # z drawn ahead per chunk: up to 4 MB ...
MAX_WINDOW = 64          # ... and at most this many steps (a short chain draws little past its end)


class ChunkNoise:
    """x_T and per-step z for images [start, start + n) of a seeded request, or slices of given arrays."""

    def __init__(self, shape: tuple, start: int, n: int, seed: int | None = None,
                 x_T: np.ndarray | None = None, step_noise: np.ndarray | None = None):
        self.shape, self.start, self.n = tuple(shape), start, n
        self._given_z = None if step_noise is None else step_noise[:, start:start + n]
        self._gens = None if seed is None else [np.random.default_rng([seed, start + i]) for i in range(n)]
        step_bytes = 4 * n * int(np.prod(self.shape))
        self._window = int(max(1, min(MAX_WINDOW, WINDOW_BYTES // max(step_bytes, 1))))
        self._win_start, self._win = 0, None  # the drawn window: z_k for k in [start, start + len(win))
        if x_T is not None:
            self.x_T = np.ascontiguousarray(x_T[start:start + n], dtype=np.float32)
        else:
            self.x_T = self._draw()  # consumes the first draw of each stream, as documented

    def _draw(self) -> np.ndarray:
        assert self._gens is not None, "need a seed or explicit noise"
        return np.stack([g.standard_normal(self.shape, dtype=np.float32) for g in self._gens])

    def z(self, k: int) -> np.ndarray:
        """z_k (n, C, H, W) float32, contiguous; seeded steps are read in order (k never goes back a window)."""
        if self._given_z is not None:
            return np.ascontiguousarray(self._given_z[k], dtype=np.float32)
        win = self._win
        while win is None or k >= self._win_start + len(win):
            self._win_start += 0 if win is None else len(win)
            win = self._win = self._draw_window()
        assert k >= self._win_start, f"seeded noise is drawn in order: z({k}) after z({self._win_start})"
        return win[k - self._win_start]

    def _draw_window(self) -> np.ndarray:
        """(W, n, C, H, W): the next W steps of every image's stream, one generator call per image."""
        assert self._gens is not None, "need a seed or explicit noise"
        size = (self._window, *self.shape)
        return np.stack([g.standard_normal(size, dtype=np.float32) for g in self._gens], axis=1)

    def steps(self, k0: int, k1: int) -> np.ndarray:
        """z_k for k in [k0, k1) as (k1 - k0, n, C, H, W) float32 (for loops that take noise a window at a time).
        When nothing past k0 has been drawn yet, seeded streams draw the range with one call per image (the same
        numbers, see the module's docstring) instead of stacking per-step draws."""
        if self._given_z is not None:
            return np.ascontiguousarray(self._given_z[k0:k1], dtype=np.float32)
        drawn_to = self._win_start + (0 if self._win is None else len(self._win))
        if k0 != drawn_to:
            return np.stack([self.z(k) for k in range(k0, k1)])
        size = (k1 - k0, *self.shape)
        self._win_start, self._win = k0, np.stack([g.standard_normal(size, dtype=np.float32) for g in self._gens],
                                                  axis=1)
        return self._win

    def all_z(self, steps: int) -> np.ndarray:
        """(K, n, C, H, W) at once (for device-resident loops)."""
        return self.steps(0, steps)


def request_chunks(shape: tuple, n: int, batch: int, *, start: int = 0, seed: int | None = None,
                   x_T: np.ndarray | None = None, step_noise: np.ndarray | None = None) -> Iterator[ChunkNoise]:
    """ChunkNoise for images [start, start + n) of a request, `batch` images at a time (the last chunk may be
    smaller). `x_T` and `step_noise` are indexed by request index, like ChunkNoise's."""
    for a in range(start, start + n, batch):
        yield ChunkNoise(shape, a, min(batch, start + n - a), seed=seed, x_T=x_T, step_noise=step_noise)


def run_chunked(run: Callable[[ChunkNoise], np.ndarray], shape: tuple, n: int, batch: int, **noise) -> np.ndarray:
    """`run(chunk)` for every chunk of `request_chunks(shape, n, batch, **noise)`, concatenated: images of a request
    larger than an engine call. Each image has its own stream, so `batch` never changes them."""
    return np.concatenate([run(chunk) for chunk in request_chunks(shape, n, batch, **noise)])


def request_noise(seed: int, n: int, shape: tuple, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The full (x_T, step_noise) a seeded request uses: x_T (n, C, H, W), step_noise (K, n, C, H, W)."""
    chunk = ChunkNoise(shape, 0, n, seed=seed)
    return chunk.x_T, chunk.all_z(steps)
