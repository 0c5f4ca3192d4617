"""Seeded noise drawn in windows (ddpm_deploy.sampling.noise) gives exactly the documented per-step streams."""

from __future__ import annotations

import numpy as np
import pytest

from ddpm_deploy.sampling.noise import ChunkNoise, request_noise


def _documented(seed: int, start: int, n: int, shape: tuple, steps: int):
    """x_T then z_0..z_{K-1}, one (C, H, W) standard_normal draw at a time from default_rng([seed, i])."""
    gens = [np.random.default_rng([seed, start + i]) for i in range(n)]
    x_T = np.stack([g.standard_normal(shape, dtype=np.float32) for g in gens])
    z = np.stack([np.stack([g.standard_normal(shape, dtype=np.float32) for g in gens]) for _ in range(steps)])
    return x_T, z


@pytest.mark.parametrize("n, shape, steps", [(1, (1, 16, 16), 200), (3, (3, 5, 7), 130), (2, (1, 1, 1), 3)])
def test_windows_equal_one_draw_per_step(n, shape, steps):
    want_x, want_z = _documented(11, 4, n, shape, steps)
    noise = ChunkNoise(shape, 4, n, seed=11)
    assert noise._window > 1 and (steps > noise._window or steps < 5)  # crosses windows, or ends inside one
    assert np.array_equal(noise.x_T, want_x)
    for k in range(steps):
        z = noise.z(k)
        assert z.flags.c_contiguous and z.dtype == np.float32 and np.array_equal(z, want_z[k]), k
        assert np.array_equal(noise.z(k), z)  # asking again within the window gives the same z


def test_request_noise_and_going_back():
    want_x, want_z = _documented(2, 0, 2, (1, 4, 4), 70)
    x_T, z = request_noise(2, 2, (1, 4, 4), 70)
    assert np.array_equal(x_T, want_x) and np.array_equal(z, want_z)
    noise = ChunkNoise((1, 4, 4), 0, 1, seed=2)
    noise.z(noise._window + 1)
    with pytest.raises(AssertionError, match="drawn in order"):
        noise.z(0)


def test_steps_in_one_draw_and_after_partial_use():
    """`steps(k0, k1)` (the device and fused loops' windows) gives the documented streams whether it draws the range
    at once (nothing past k0 drawn yet) or falls back to per-step windows (z already drawn past k0)."""
    _, want_z = _documented(5, 2, 3, (1, 4, 4), 150)
    fresh = ChunkNoise((1, 4, 4), 2, 3, seed=5)
    assert np.array_equal(fresh.steps(0, 100), want_z[:100]) and np.array_equal(fresh.steps(100, 150), want_z[100:])
    assert np.array_equal(fresh.z(120), want_z[120])  # z after steps: from the same drawn range
    used = ChunkNoise((1, 4, 4), 2, 3, seed=5)
    used.z(3)  # draws a whole window ahead
    assert np.array_equal(used.steps(3, 140), want_z[3:140])
    given = ChunkNoise((1, 4, 4), 1, 2, x_T=np.zeros((3, 1, 4, 4), np.float32), step_noise=want_z)
    assert np.array_equal(given.steps(10, 20), want_z[10:20, 1:3])
