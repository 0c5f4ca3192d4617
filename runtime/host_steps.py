"""The fused reverse step on CPU engines: `run_device_chain`'s `DeviceSteps` with host memory as the device.

An engine on the CPU (onnxruntime, OpenVINO) runs the fused step graph (`ddpm_deploy.graph.fused`: eps_theta plus
the sampler update) with its inputs and outputs bound once per batch size to numpy buffers. A step copies its
rows of t, coefs and z into the bound inputs, runs, and the next step copies x_prev / hist_out back into
x_t / hist, so the host does a few small copies per step and no numpy arithmetic. Why: at batch 1 on a small
model the numpy step (about ten small array operations), its per-step finiteness check and their cold caches
after each engine call were 2-3 % of the chain (issue 17); inside the engine the same update costs about as much
on OpenVINO and less on onnxruntime, so the chain is no slower and the host loop's overhead drops to about 1 %
(README, Performance).

The same buffers serve `eps(x_t, t)` (verification, serving, bits/dim) with all-zero coefficients, so one
compiled graph does both. Finiteness is the fused step's own `nonfinite` output (before the x_0 clip, which
OpenVINO's Min/Max would turn NaN into), copied into a (K, B) host table each step (B floats) and read by
run_device_chain after the last step, as on every device loop. Backends still use this loop for fp32 ONNX files
(run in fp32 or bf16) and the numpy host loop for fp16 ones (fused_loop_for).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..chain import EngineTimer, check_batch
from ..manifest import Manifest
from ..noise import WINDOW_BYTES
from ..samplers import SamplingPlan
from .device_loop import input_shapes, output_shapes, run_device_chain

def fused_loop_for(manifest: Manifest, fused_step: bool = True) -> bool:
    """Whether a CPU backend runs this loop for `manifest`'s file: fp32 files only, unless the caller asked for the
    numpy host loop (`fused_step=False`)."""
    return bool(fused_step) and manifest.dtype == "float32"


# bind(batch, buffers) -> run: binds the fused graph's inputs and outputs (by FUSED_INPUTS / FUSED_OUTPUTS name)
# to `buffers` for that batch size and returns a no-argument call that runs one step. The engine keeps whatever
# it needs (request, IO binding) alive with the returned call.
Binder = Callable[[int, dict], Callable[[], object]]


class HostFusedSteps:
    """`DeviceSteps` (runtime.device_loop) for a CPU engine given as a `Binder`; also `eps` and `run_chain`."""

    def __init__(self, manifest: Manifest, name: str, engine_time: EngineTimer, bind: Binder):
        self.manifest, self.name, self.engine_time = manifest, name, engine_time
        self._bind = bind
        self._slots: dict = {}  # batch -> (buffers, run): bound once, reused by every later chain and eps call
        self._cur = None

    def _slot(self, batch: int):
        slot = self._slots.get(batch)
        if slot is None:
            shapes = {**input_shapes(self.manifest, batch), **output_shapes(self.manifest, batch)}
            buffers = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
            slot = self._slots[batch] = (buffers, self._bind(batch, buffers))
        return slot

    # -- DeviceSteps ------------------------------------------------------------------------------------------------

    def begin(self, x_T: np.ndarray, t_rows: np.ndarray, coef_rows: np.ndarray) -> None:
        B = len(x_T)
        buf, run = self._slot(B)
        np.copyto(buf["x_t"], x_T)
        buf["hist"].fill(0.0)
        # the tables in the bound inputs' shapes, one row per step (their rows may be padded: aligned_rows)
        self._t_tab = _as_rows(t_rows, buf["t"].shape)
        self._c_tab = _as_rows(coef_rows, buf["coefs"].shape)
        self._flags = np.zeros((len(t_rows), B), np.float32)  # row k: step k's `nonfinite` output
        self._cur, self._stepped, self._k = (buf, run), False, None

    def put_noise(self, z_rows: np.ndarray) -> None:
        self._z_tab = _as_rows(z_rows, self._cur[0]["z"].shape)

    def bind_step(self, k: int, j: int, d: int) -> None:
        """The state lives in fixed buffers, so slot `d` is implicit: after a step, x_prev/hist_out move back."""
        buf = self._cur[0]
        if self._stepped:
            np.copyto(buf["x_t"], buf["x_prev"])
            np.copyto(buf["hist"], buf["hist_out"])
        np.copyto(buf["t"], self._t_tab[k])
        np.copyto(buf["coefs"], self._c_tab[k])
        np.copyto(buf["z"], self._z_tab[j])
        self._k = k

    def launch(self, sync: bool) -> None:
        """One fused step; CPU engines return when it is done, so `sync` changes nothing."""
        with self.engine_time:
            self._cur[1]()
        self._stepped = True
        self._flags[self._k] = self._cur[0]["nonfinite"]

    def read_flags(self, k0: int, k1: int) -> np.ndarray:
        return self._flags[k0:k1].copy()

    def read(self, name: str) -> np.ndarray:
        # copied: the buffer is overwritten by the next step while callers (verify callbacks) may keep this one
        return self._cur[0][name].copy()

    def end(self) -> None:
        self._t_tab = self._c_tab = self._z_tab = self._flags = None  # the buffers stay bound for the next chain

    # -- Backend-like API -------------------------------------------------------------------------------------------

    def run_chain(self, noise, plan: SamplingPlan, callback=None, progress=None) -> np.ndarray:
        """x_T -> x_0 with every update inside the engine; noise is drawn in the host loop's windows."""
        check_batch(noise.x_T, self.manifest, self.manifest.max_batch)
        return run_device_chain(self, noise, plan, callback, progress, noise_window_bytes=WINDOW_BYTES)

    def eps(self, x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        """The network output alone (not timed here: Backend.eps times it): the fused step with zero coefficients,
        whose x_prev is then ignored."""
        buf, run = self._slot(len(x_t))
        np.copyto(buf["x_t"], x_t)
        np.copyto(buf["t"], t)
        buf["coefs"].fill(0.0)
        run()
        return buf["eps"].copy()

    def close(self) -> None:
        self._slots, self._cur = {}, None


def _as_rows(table: np.ndarray, shape: tuple) -> np.ndarray:
    """(K, row) table -> (K, *shape): each row's first prod(shape) values (a view unless rows are padded)."""
    return table[:, :int(np.prod(shape))].reshape(len(table), *shape)
