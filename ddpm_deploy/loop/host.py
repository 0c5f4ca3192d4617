"""The host-memory devices of the loop: `SettlingSteps`, the pending/settle base shared with the CPU engines' fused
step (ddpm_deploy.runtime.cpu_steps), and `HostSteps`, the numpy host loop (any network plus numpy's update)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..fused_io import HIST_COLS, N_HIST
from ..sampling.step import step, step_with_history


class SettlingSteps:
    """The part of a host-memory `DeviceSteps` shared by the numpy host loop and the CPU engines' fused step: a
    launched step is finished (its outputs made the state) when the device is next used, so the loop's engine time
    holds the launch alone. Subclasses give the state buffers (`_state`) and the finishing (`_finish_step`)."""

    _pending = False
    _t = _c = _z = _flags = None

    def _state(self) -> tuple[np.ndarray, np.ndarray]:
        """The x_t (max_batch, C, H, W) and history (max_batch, N_HIST, C, H, W) buffers."""
        raise NotImplementedError

    def _finish_step(self) -> None:
        raise NotImplementedError

    def _settle(self) -> None:
        if self._pending:
            self._pending = False
            self._finish_step()

    def write_state(self, row: int, x: np.ndarray, hist) -> None:
        self._settle()
        x_buf, h_buf = self._state()
        x_buf[row:row + len(x)] = x
        h_buf[row:row + len(x)] = 0.0 if hist is None else hist

    def read_state(self, row: int, stop: int):
        self._settle()
        x_buf, h_buf = self._state()
        return x_buf[row:stop].copy(), h_buf[row:stop].copy()

    def read_flags(self, k0: int, k1: int) -> np.ndarray:
        self._settle()
        return self._flags[k0:k1].copy()

    def end(self) -> None:
        self._settle()
        self._t = self._c = self._z = self._flags = None


class HostSteps(SettlingSteps):
    """`DeviceSteps` whose launch is `net(x_t, t)` (any network: an engine's eps, the PyTorch reference) and whose
    update is numpy's (`sampling.step.step`), with numpy arrays as the device memory. fp16 files on the CPU backends
    run this (runtime.cpu_steps.fused_loop_for), as does the PyTorch reference. Like a device, it finishes a launched
    step when it is next used (bind, read, write), so the loop's engine time is the network's alone. Finiteness: an
    image is flagged when its network output is not finite, and every image of the step when the update overflows
    (numpy raises under errstate where the inf or NaN is made: before the x_0 clip, which would turn +-inf into the
    bound, but without telling which image)."""

    def __init__(self, net: Callable[[np.ndarray, np.ndarray], np.ndarray], image_shape: tuple, max_batch: int,
                 name: str, noise_window_bytes: int):
        self.net, self.name, self.max_batch = net, name, int(max_batch)
        self.noise_window_bytes = noise_window_bytes
        self._x = np.zeros((self.max_batch, *image_shape), np.float32)
        self._h = np.zeros((self.max_batch, N_HIST, *image_shape), np.float32)  # pages untouched until used
        self._B, self._pending = self.max_batch, False
        self._eps = self._t = self._c = self._z = self._flags = None

    def _state(self):
        return self._x, self._h

    def open(self, batch: int) -> None:
        self._settle()
        self._B = int(batch)

    def put_tables(self, t: np.ndarray, coefs: np.ndarray) -> None:
        self._settle()
        self._t, self._c = t, coefs
        self._history = bool(np.any(coefs[..., HIST_COLS] != 0))  # else the cheaper history-free numpy step
        self._flags = np.zeros(t.shape, np.float32)

    def put_noise(self, z: np.ndarray) -> None:
        self._settle()
        self._z = z

    def bind_step(self, k: int, j: int) -> None:
        self._settle()
        self._k, self._j = k, j

    def launch(self, sync: bool) -> None:
        self._eps = self.net(np.ascontiguousarray(self._x[:self._B]), self._t[self._k])
        self._pending = True

    def _finish_step(self) -> None:
        """The launched step's update and flags (B,)."""
        B, k, out = self._B, self._k, self._eps
        x_t = self._x[:B]
        bad = ~np.isfinite(out.reshape(B, -1)).all(axis=1)
        row = self._c[k]
        row = row[0] if (row == row[0]).all() else row  # one shared row: scalars, cheaper than per-image columns
        try:
            with np.errstate(over="raise", invalid="raise"):
                x_prev, h_out = self._update(x_t, out, self._z[self._j], row)
        except FloatingPointError:
            bad[:] = True
            with np.errstate(all="ignore"):
                x_prev, h_out = self._update(x_t, out, self._z[self._j], row)
        self._flags[k] = bad
        self._x[:B] = x_prev
        if h_out is not None:
            self._h[:B] = h_out

    def _update(self, x_t, out, z, row):
        if not self._history:
            return step(x_t, out, z, row), None
        return step_with_history(x_t, out, z, row, self._h[:self._B])

    def read_eps(self) -> np.ndarray:
        return np.array(self._eps, np.float32, copy=True)

    def close(self) -> None:
        self._pending = False
        self.end()
        self._eps = None
