"""The one reverse loop: every backend, every entry point (run, verify, generate, bench) and the HTTP batcher drive
the chain through `run_chain`, `eps` and the `DeviceSteps` rows here; a backend supplies only its memory and launch.

The fused step (`ddpm_deploy.fused_io`, built by `graph.fused`) takes the state (x_t, hist) and per-step inputs
(t, z, coefs) and gives (eps, x_prev, hist_out, nonfinite). A `DeviceSteps` keeps the state in its own memory (a
GPU's, an engine's bound host buffers, or numpy arrays for the host loop), sized for its largest batch, so row i is
the same memory at every batch size: a chain writes x_T into rows 0..B-1 once, the HTTP batcher writes a joining
request's x_T into free rows and reads a finished one's back (serve.batcher). After each step the state holds x_prev
and hist_out. `run_chain` owns what is the same everywhere: the batch check, per-step tables (t, coefs per image, so
rows of different requests at different steps of different samplers share one call), step noise in windows that
bound memory, engine timing around each launch, the StepInfo callback (verification) and finiteness: a plan that
is not finite in float32 is refused before the first step, and each step's `nonfinite` output (B,) goes into row k
of a (K, B) flags table read once after the last step (or every step with a callback), which names the first
failing step. `eps` is the same step with all-zero coefficients (its x_prev is then ignored).

Ordering rules the loop keeps, so implementations need no more care than stream order:
- the last step of every noise window syncs before the next window is uploaded, so a device may release (or reuse)
  the previous window's memory in `put_noise`;
- on failure the tables are released without letting a second error (a sticky CUDA error fails every call after
  it) replace the first one.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import numpy as np

from .checks import check_batch, check_final, check_finite, check_plan, check_step_flags
from .timer import EngineTimer
from ..fused_io import N_COEFS, N_HIST
from ..artifact.manifest import Manifest
from ..sampling.noise import ChunkNoise
from ..sampling.plan import SamplingPlan


class StepInfo(NamedTuple):
    """One reverse step as a callback sees it: step index k (0 = first, at t = T-1 for DDPM), timestep t,
    the step's input x_t (B, C, H, W), the network output (B, C_out, H, W), the result x_prev, the index of
    the first image of this chunk within the request (`start`, so images of chunked requests can be placed),
    and for plans that carry a history (multistep samplers) the history that went into the step and the one
    that came out (B, N_HIST, C, H, W); None for history-free plans."""

    k: int
    t: int
    x_t: np.ndarray
    model_output: np.ndarray
    x_prev: np.ndarray
    start: int = 0
    hist: np.ndarray | None = None
    hist_out: np.ndarray | None = None

# Step noise on a GPU at once: (K, B, C, H, W) float32 is 1000 x 16 x 3 x 32 x 32 x 4 B = 197 MB for a 1000-step
# CIFAR-size batch but 12.6 GB at 256x256; above this it goes up in windows of steps. Host-memory devices use
# noise.WINDOW_BYTES (a few MB: what the numpy loop always drew ahead).
NOISE_WINDOW_BYTES = 512 << 20
# With a progress bar, sync every this many steps so it shows finished steps, not queued launches.
PROGRESS_SYNC_STEPS = 20


class DeviceSteps(Protocol):
    """What a backend's memory does for the loop. State rows live on the device from `write_state` until read."""

    name: str
    max_batch: int
    noise_window_bytes: int

    def open(self, batch: int) -> None:
        """Run the next steps on rows 0..batch-1; rows keep their state across batch sizes."""

    def write_state(self, row: int, x: np.ndarray, hist: np.ndarray | None) -> None:
        """State rows row..row+len(x)-1 := x (n, C, H, W) and hist (n, N_HIST, C, H, W), zeros when None."""

    def read_state(self, row: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of state rows row..stop-1: (x, hist), after the last step x_prev and hist_out."""

    def put_tables(self, t: np.ndarray, coefs: np.ndarray) -> None:
        """Per-step inputs of the next steps, float32 t (K, B) and coefs (K, B, N_COEFS), and a (K, B) flags table
        for their `nonfinite` outputs."""

    def put_noise(self, z: np.ndarray) -> None:
        """One noise window (J, B, C, H, W); the previous window's steps have all completed."""

    def bind_step(self, k: int, j: int) -> None:
        """The next launch is step k: t and coefs from table row k, z from window row j."""

    def launch(self, sync: bool) -> None:
        """Run the bound step on the state (asynchronously unless `sync`); its `nonfinite` output lands in flags
        row k in stream order."""

    def read_eps(self) -> np.ndarray:
        """Wait, and return the last step's network output (B, C_out, H, W) on the host (kept until the next
        launch, also after `end`)."""

    def read_flags(self, k0: int, k1: int) -> np.ndarray:
        """Wait, and return rows k0..k1-1 of the flags table on the host, (k1 - k0, B) float32."""

    def end(self) -> None:
        """Release the tables and noise (the device is idle first); the state stays. Raises on a device error."""

    def close(self) -> None:
        """Release everything."""


# -- per-step inputs --------------------------------------------------------------------------------------------------

def step_tables(plan: SamplingPlan, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """t (K, B) and coefs (K, B, N_COEFS) as the fused graph takes them, float32 (per-image coefficient rows,
    (K, B, N_COEFS), are taken as they are)."""
    t = np.repeat(plan.timesteps.astype(np.float32)[:, None], batch, axis=1)
    coefs = plan.coefs.astype(np.float32)
    if coefs.ndim == 2:
        coefs = np.repeat(coefs[:, None, :], batch, axis=1)
    assert coefs.shape == (plan.steps, batch, N_COEFS), coefs.shape
    return np.ascontiguousarray(t), np.ascontiguousarray(coefs)


def window_steps(steps: int, step_bytes: int, budget: int = NOISE_WINDOW_BYTES) -> int:
    """Steps of noise per upload: all of them when they fit in `budget`, else as many as fit (at least 1)."""
    return max(1, min(steps, budget // max(step_bytes, 1)))


def noise_windows(noise: ChunkNoise, steps: int, window: int):
    """Yield (k0, k1, z[k0:k1]) float32 (k1 - k0, B, C, H, W) in step order; drawing in order keeps the seeded
    streams identical to `noise.all_z(steps)`."""
    for k0 in range(0, steps, window):
        k1 = min(steps, k0 + window)
        yield k0, k1, noise.steps(k0, k1)


# -- the loop -----------------------------------------------------------------------------------------------------------

def run_chain(dev: DeviceSteps, manifest: Manifest, noise: ChunkNoise, plan: SamplingPlan, callback=None,
              progress=None, timer: EngineTimer | None = None) -> np.ndarray:
    """x_T -> x_0 on `dev`; `callback(StepInfo)` (verification) syncs each step and gets host copies. Returns
    float32 (B, C, H, W)."""
    check_batch(noise.x_T, manifest, dev.max_batch)
    check_plan(plan)  # before anything is uploaded or run
    x_T = noise.x_T
    B, K = len(x_T), plan.steps
    window = window_steps(K, x_T.nbytes, dev.noise_window_bytes)
    timer = timer or EngineTimer()
    try:
        dev.open(B)
        dev.write_state(0, x_T, None)
        dev.put_tables(*step_tables(plan, B))
        state = (x_T, np.zeros((B, N_HIST, *x_T.shape[1:]), np.float32) if plan.uses_history else None)
        for k0, k1, z in noise_windows(noise, K, window):
            dev.put_noise(z)
            for k in range(k0, k1):
                dev.bind_step(k, k - k0)
                progress_sync = progress is not None and (k + 1) % PROGRESS_SYNC_STEPS == 0
                with timer:
                    dev.launch(sync=callback is not None or k == k1 - 1 or progress_sync)
                if callback is not None:
                    state = _hand_over(dev, callback, plan, k, *state)
                if progress is not None:
                    progress.update(1)
        flags = dev.read_flags(0, K)
        x0 = dev.read_state(0, B)[0]
    except BaseException:
        _release_quietly(dev)
        raise
    dev.end()
    check_step_flags(flags, plan.timesteps, dev.name)
    return check_final(x0, K, dev.name)


def advance(dev: DeviceSteps, t: np.ndarray, coefs: np.ndarray, z: np.ndarray,
            timer: EngineTimer | None = None) -> np.ndarray:
    """One step of the open rows 0..B-1 (holding their state) at per-row t (B,), coefs (B, N_COEFS) and z
    (B, C, H, W); returns the step's `nonfinite` flags (B,). What the HTTP batcher runs each step, and `eps`."""
    try:
        dev.put_tables(np.asarray(t, np.float32)[None], np.asarray(coefs, np.float32)[None])
        dev.put_noise(np.asarray(z, np.float32)[None])
        dev.bind_step(0, 0)
        with timer or EngineTimer():
            dev.launch(sync=True)
        flags = dev.read_flags(0, 1)[0]
    except BaseException:
        _release_quietly(dev)
        raise
    dev.end()
    return flags


def eps(dev: DeviceSteps, manifest: Manifest, x_t: np.ndarray, t: np.ndarray,
        timer: EngineTimer | None = None) -> np.ndarray:
    """The network output for float32 x_t (B, C, H, W) at float32 t (B,): one fused step with all-zero
    coefficients (and noise and history), whose x_prev is ignored. Overwrites state rows 0..B-1."""
    check_batch(x_t, manifest, dev.max_batch)
    B = len(x_t)
    dev.open(B)
    dev.write_state(0, x_t, None)
    advance(dev, t, np.zeros((B, N_COEFS), np.float32), np.zeros_like(x_t), timer)
    return dev.read_eps()


def _hand_over(dev: DeviceSteps, callback, plan: SamplingPlan, k: int, x_host, h_host):
    """Verification: step k's outputs on the host, checked, given to `callback`; returns the next (x_t, hist)."""
    t = int(plan.timesteps[k])
    out = dev.read_eps()
    check_finite(out, k, t, dev.name)
    check_step_flags(dev.read_flags(k, k + 1), plan.timesteps, dev.name, k0=k)
    x_prev, h_out = dev.read_state(0, len(x_host))
    h_out = h_out if h_host is not None else None  # history-free plans report none
    callback(StepInfo(k, t, x_host, out, x_prev, 0, h_host, h_out))
    return x_prev, h_out


def _release_quietly(dev: DeviceSteps) -> None:
    """Release after a failure: the failure is what gets reported, not a second error while cleaning up."""
    try:
        dev.end()
    except Exception:  # noqa: BLE001 - the original exception is re-raised by the caller
        pass


class Backend:
    """A context manager around one loaded network and its `DeviceSteps` (`steps`, set by the subclass with `name`,
    `manifest` and `max_batch`). `eps`, `eps_batched` and `run_chain` are the loop's, for every backend."""

    name = "backend"
    manifest: Manifest
    max_batch: int = 1
    steps: DeviceSteps

    def __init__(self):
        self.engine_time = EngineTimer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self) -> None:
        steps = getattr(self, "steps", None)
        if steps is not None and steps is not self:
            steps.close()

    def eps(self, x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Network output for float32 x_t (B, C, H, W) and float32 t (B,); time spent is added to engine_time."""
        return eps(self.steps, self.manifest, x_t, t, self.engine_time)

    def eps_batched(self, x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        """`eps` for any number of images, in chunks of at most `max_batch`."""
        outs = [self.eps(np.ascontiguousarray(x_t[s:s + self.max_batch]), t[s:s + self.max_batch])
                for s in range(0, len(x_t), self.max_batch)]
        return np.concatenate(outs)

    def run_chain(self, noise, plan: SamplingPlan, callback=None, progress=None) -> np.ndarray:
        """x_T -> x_0 (float32 (B, C, H, W)) through the loop on this backend's device."""
        return run_chain(self.steps, self.manifest, noise, plan, callback, progress, self.engine_time)
