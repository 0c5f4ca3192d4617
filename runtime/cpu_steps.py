"""The fused reverse step on CPU engines: a `ddpm_deploy.loop.run.DeviceSteps` with host memory as the device.

An engine on the CPU (onnxruntime, OpenVINO) runs the fused step graph (`ddpm_deploy.graph.fused`: eps_theta plus
the sampler update) with its inputs and outputs bound once per batch size to numpy buffers allocated for the
largest batch (a batch of B binds rows 0..B-1 of each, so a row's state is the same memory at every batch size:
the HTTP batcher's rows stay put while requests join and leave). A step copies its rows of t, coefs and z into the
bound inputs, runs, and x_prev / hist_out go back into x_t / hist before the next use, so the host does a few small
copies per step and no numpy arithmetic. Why: at batch 1 on a small model the numpy step (about ten small array operations),
its per-step finiteness check and their cold caches after each engine call were 2-3 % of the chain;
inside the engine the same update costs about as much on OpenVINO and less on onnxruntime, so the chain is no
slower and the host loop's overhead drops to about 1 % (README, Performance).

Finiteness is the fused step's own `nonfinite` output (before the x_0 clip, which OpenVINO's Min/Max would turn
NaN into), copied into a (K, B) host table each step. Backends use this for fp32 ONNX files (run in fp32 or bf16)
and int8 OpenVINO files, and the numpy host loop (`ddpm_deploy.loop.host.HostSteps`, eps from this graph) for fp16
ones (fused_loop_for).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..fused_io import input_shapes, output_shapes
from ..loop.host import HostSteps, SettlingSteps
from ..loop.run import eps
from ..artifact.manifest import Manifest
from ..sampling.noise import WINDOW_BYTES


def fused_loop_for(manifest: Manifest, fused_step: bool = True) -> bool:
    """Whether a CPU backend runs this loop for `manifest`'s file: fp32 files only, unless the caller asked for the
    numpy host loop (`fused_step=False`). int8 files are the fused graph already, its update kept in float."""
    return bool(fused_step) and manifest.dtype in ("float32", "int8")


def cpu_steps(fused: "HostFusedSteps", fused_step: bool = True):
    """The loop's device for a CPU engine: `fused` itself for fp32 files, else the numpy host loop with `fused`
    (zero coefficients) as its network."""
    if fused_loop_for(fused.manifest, fused_step):
        return fused
    net = lambda x_t, t: eps(fused, fused.manifest, x_t, t)  # noqa: E731 - timed by the host loop's launch
    return HostSteps(net, fused.manifest.image_shape, fused.max_batch, fused.name, WINDOW_BYTES)


# bind(batch, buffers) -> run: binds the fused graph's inputs and outputs (by FUSED_INPUTS / FUSED_OUTPUTS name)
# to `buffers` (arrays of that batch size) and returns a no-argument call that runs one step. The engine keeps
# whatever it needs (request, IO binding) alive with the returned call.
Binder = Callable[[int, dict], Callable[[], object]]


class HostFusedSteps(SettlingSteps):
    """`DeviceSteps` for a CPU engine given as a `Binder`."""

    noise_window_bytes = WINDOW_BYTES  # host memory: draw ahead what the numpy loop always drew

    def __init__(self, manifest: Manifest, name: str, bind: Binder):
        self.manifest, self.name, self.max_batch = manifest, name, int(manifest.max_batch)
        self._bind = bind
        shapes = {**input_shapes(manifest, self.max_batch), **output_shapes(manifest, self.max_batch)}
        self._buf = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
        self._runs: dict = {}  # batch -> run: bound once, reused by every later chain and eps call
        self._B = self.max_batch

    def _state(self):
        return self._buf["x_t"], self._buf["hist"]

    def _view(self, batch: int) -> dict:
        return {name: a[:batch] for name, a in self._buf.items()}

    def open(self, batch: int) -> None:
        self._settle()
        if batch not in self._runs:
            self._runs[batch] = self._bind(batch, self._view(batch))
        self._B, self._run = batch, self._runs[batch]

    def put_tables(self, t: np.ndarray, coefs: np.ndarray) -> None:
        self._t, self._c = t, coefs
        self._flags = np.zeros(t.shape, np.float32)  # row k: step k's `nonfinite` output

    def put_noise(self, z: np.ndarray) -> None:
        self._z = z

    def bind_step(self, k: int, j: int) -> None:
        self._settle()
        B, buf = self._B, self._buf
        buf["t"][:B] = self._t[k]
        buf["coefs"][:B] = self._c[k]
        buf["z"][:B] = self._z[j]
        self._k = k

    def launch(self, sync: bool) -> None:
        """One fused step; CPU engines return when it is done, so `sync` changes nothing. Its outputs become the
        state when the device is next used (`_settle`), outside the loop's engine time, as on a GPU."""
        self._run()
        self._flags[self._k] = self._buf["nonfinite"][:self._B]
        self._pending = True

    def _finish_step(self) -> None:
        """x_prev / hist_out of the launched step back into the x_t / hist inputs."""
        B, buf = self._B, self._buf
        buf["x_t"][:B] = buf["x_prev"][:B]
        buf["hist"][:B] = buf["hist_out"][:B]

    def read_eps(self) -> np.ndarray:
        # copied: the buffer is overwritten by the next step while callers (verify callbacks) may keep this one
        return self._buf["eps"][:self._B].copy()

    def close(self) -> None:
        self.end()
        self._runs = {}
