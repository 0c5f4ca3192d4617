"""The one reverse loop of device-resident backends (TensorRT, onnxruntime IO binding; the CPU backends through
runtime.host_steps, with host memory as the device), and what it feeds them.

The fused step graph (`ddpm_deploy.graph.fused`) takes the state (x_t, hist) and per-step inputs (t, z, coefs) and
gives (eps, x_prev, hist_out). `run_device_chain` owns everything that is the same for every device backend:
per-step tables uploaded once with 256-byte aligned rows, step noise in windows that bound device memory, the
state ping-pong (x_t -> x_prev, hist -> hist_out), the per-step callback (verification) and finiteness: a plan that
is not finite in float32 is refused before the first step, and each step's `nonfinite` output (B,) goes into row k
of a (K, B) flags table on the device, read once after the last step (or every step with a callback), which names
the first failing step (a per-step row, not a counter kept in the graph: 0/1 is exact in bf16, and no sync per
step). A backend implements `DeviceSteps`: upload tables, upload a noise window, bind one step, launch it, read an
output or the flags back, release.

Ordering rules the loop keeps, so implementations need no more care than stream order:
- the last step of every noise window syncs before the next window is uploaded, so a backend may release (or
  reuse) the previous window's device memory in `put_noise` (an allocator that recycles freed memory, such as
  onnxruntime's arena, could otherwise hand it to the next window while queued steps still read it);
- on failure the device is released without letting a second error (a sticky CUDA error fails every call
  after it) replace the first one.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..chain import EngineTimer, StepInfo, check_final, check_finite, check_plan, check_step_flags
from ..fused_io import N_COEFS, N_HIST, input_shapes, output_shapes  # noqa: F401  (backends import the shapes here)
from ..noise import ChunkNoise
from ..samplers import SamplingPlan

# Step noise on the device at once: (K, B, C, H, W) float32 is 1000 x 16 x 3 x 32 x 32 x 4 B = 197 MB for a
# 1000-step CIFAR-size batch but 12.6 GB at 256x256; above this it goes up in windows of steps.
NOISE_WINDOW_BYTES = 512 << 20
# TensorRT's setTensorAddress needs 256-byte aligned pointers (NvInferRuntime.h) and onnxruntime's TensorRT
# provider ignores its return value (a rejected address silently keeps the old one): every table row starts at a
# multiple of this from a 256-aligned base.
ROW_ALIGN = 256
# With a progress bar, sync every this many steps so it shows finished steps, not queued launches.
PROGRESS_SYNC_STEPS = 20


def step_tables(plan: SamplingPlan, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """t (K, B) and coefs (K, B, N_COEFS) as the fused graph takes them, float32: one slice per step (per-image
    coefficient rows, (K, B, N_COEFS), are taken as they are: step-level batching)."""
    t = np.repeat(plan.timesteps.astype(np.float32)[:, None], batch, axis=1)
    coefs = plan.coefs.astype(np.float32)
    if coefs.ndim == 2:
        coefs = np.repeat(coefs[:, None, :], batch, axis=1)
    assert coefs.shape == (plan.steps, batch, N_COEFS), coefs.shape
    return np.ascontiguousarray(t), np.ascontiguousarray(coefs)


def row_stride(nbytes: int) -> int:
    """Bytes from one table row to the next: `nbytes` rounded up to ROW_ALIGN."""
    return -(-int(nbytes) // ROW_ALIGN) * ROW_ALIGN


def aligned_rows(a: np.ndarray) -> np.ndarray:
    """(K, ...) float32 -> (K, row_stride / 4) float32, row k = a[k] flattened then zero padding: row k starts
    k * row_stride bytes from the start of the table."""
    rows = np.ascontiguousarray(a.reshape(len(a), -1), dtype=np.float32)
    if rows.shape[1] * 4 == row_stride(rows.shape[1] * 4):  # already a multiple of ROW_ALIGN: no padding
        return rows
    out = np.zeros((len(a), row_stride(rows.shape[1] * 4) // 4), np.float32)
    out[:, :rows.shape[1]] = rows
    return out


def window_steps(steps: int, step_bytes: int, budget: int = NOISE_WINDOW_BYTES) -> int:
    """Steps of noise per upload: all of them when they fit in `budget`, else as many as fit (at least 1)."""
    return max(1, min(steps, budget // max(step_bytes, 1)))


def noise_windows(noise: ChunkNoise, steps: int, window: int):
    """Yield (k0, k1, z[k0:k1]) float32 (k1 - k0, B, C, H, W) in step order; drawing in order keeps the seeded
    streams identical to `noise.all_z(steps)`."""
    for k0 in range(0, steps, window):
        k1 = min(steps, k0 + window)
        yield k0, k1, noise.steps(k0, k1)


class DeviceSteps(Protocol):
    """What a device backend does for `run_device_chain`. Tables come as `aligned_rows` arrays: row k of a table
    is the per-step input of step k (t: (B,), coefs: (B, N_COEFS), z: (B, C, H, W)), `row_stride` bytes apart."""

    name: str
    engine_time: EngineTimer

    def begin(self, x_T: np.ndarray, t_rows: np.ndarray, coef_rows: np.ndarray) -> None:
        """Set the batch, put x_T in state slot 0 with a zero history, upload the t and coefs tables, and make a
        flags table of len(t_rows) rows (one `row_stride(4 * B)` apart) for the steps' `nonfinite` outputs."""

    def put_noise(self, z_rows: np.ndarray) -> None:
        """Upload one noise window (rows 0.. are its steps); the previous window's steps have all completed."""

    def bind_step(self, k: int, j: int, d: int) -> None:
        """Step k: t and coefs from table row k, z from window row j, state read from slot d and written to 1 - d."""

    def launch(self, sync: bool) -> None:
        """Run the bound step (asynchronously unless `sync`), inside `self.engine_time`; its `nonfinite` output lands
        in row k (of bind_step) of the flags table, in stream order, without a sync."""

    def read(self, name: str) -> np.ndarray:
        """Wait for the device and return the last step's output `name` ("eps", "x_prev", "hist_out") on the host."""

    def read_flags(self, k0: int, k1: int) -> np.ndarray:
        """Wait for the device and return rows k0..k1 of the flags table on the host, (k1 - k0, B) float32."""

    def end(self) -> None:
        """Release the tables and noise windows (the stream is idle first). Raises on a device error."""


def run_device_chain(dev: DeviceSteps, noise: ChunkNoise, plan: SamplingPlan, callback=None, progress=None,
                     noise_window_bytes: int = NOISE_WINDOW_BYTES) -> np.ndarray:
    """x_T -> x_0 on the device; `callback(StepInfo)` (verification) syncs each step and gets host copies."""
    check_plan(plan)  # before anything is uploaded or run
    x_T = noise.x_T
    B, K = len(x_T), plan.steps
    t_tab, c_tab = step_tables(plan, B)
    window = window_steps(K, row_stride(x_T[0].nbytes * B), noise_window_bytes)
    multistep = plan.uses_history
    try:
        dev.begin(x_T, aligned_rows(t_tab), aligned_rows(c_tab))
        d, x_host = 0, x_T
        h_host = np.zeros((B, N_HIST, *x_T.shape[1:]), np.float32) if multistep else None
        for k0, k1, z in noise_windows(noise, K, window):
            dev.put_noise(aligned_rows(z))
            for k in range(k0, k1):
                dev.bind_step(k, k - k0, d)
                progress_sync = progress is not None and (k + 1) % PROGRESS_SYNC_STEPS == 0
                dev.launch(sync=callback is not None or k == k1 - 1 or progress_sync)
                if callback is not None:
                    x_host, h_host = _hand_over(dev, callback, plan, k, x_host, h_host)
                d = 1 - d
                if progress is not None:
                    progress.update(1)
        flags = dev.read_flags(0, K)
        x0 = dev.read("x_prev")
    except BaseException:
        _release_quietly(dev)
        raise
    dev.end()
    check_step_flags(flags, plan.timesteps, dev.name)
    return check_final(x0, K, dev.name)


def _hand_over(dev: DeviceSteps, callback, plan: SamplingPlan, k: int, x_host, h_host):
    """Verification: step k's outputs on the host, checked, given to `callback`; returns the next (x_t, hist)."""
    t = int(plan.timesteps[k])
    eps = dev.read("eps")
    check_finite(eps, k, t, dev.name)
    check_step_flags(dev.read_flags(k, k + 1), plan.timesteps, dev.name, k0=k)
    x_prev = dev.read("x_prev")
    h_out = dev.read("hist_out") if h_host is not None else None  # history-free plans report none, as on the host
    callback(StepInfo(k, t, x_host, eps, x_prev, 0, h_host, h_out))
    return x_prev, h_out


def _release_quietly(dev: DeviceSteps) -> None:
    """Release after a failure: the failure is what gets reported, not a second error while cleaning up."""
    try:
        dev.end()
    except Exception:  # noqa: BLE001 - the original exception is re-raised by the caller
        pass
