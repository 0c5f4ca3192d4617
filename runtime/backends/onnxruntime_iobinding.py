"""The whole reverse chain inside onnxruntime with IO binding: the fused step graph (eps_theta + sampler update,
`ddpm_deploy.graph.fused`) keeps x on the device, ping-ponging between two buffers, while the host only
rebinds pointers into per-step tables uploaded once (t, coefs, step noise).

Works on any provider whose memory onnxruntime can bind: "cuda" (CUDA and TensorRT execution providers, the
point of it) and "cpu" (the same code path, which is how it is tested without a GPU).
"""

from __future__ import annotations

import numpy as np

from ...chain import EngineTimer, StepInfo, check_batch, check_final, check_finite
from ...errors import UserError
from ...graph.fused import FUSED_INPUTS, FUSED_OUTPUTS, fused_model
from ...manifest import Manifest
from ...samplers import N_COEFS, SamplingPlan
from ..device_loop import NOISE_WINDOW_BYTES, noise_windows, step_tables, window_steps
# onnxruntime's run option (kOrtRunOptionsConfigDisableSynchronizeExecutionProviders): skip the stream sync at
# the end of Run, so steps queue back to back; the last step syncs.
NO_SYNC = "disable_synchronize_execution_providers"


def fused_model_bytes(onnx_path: str, manifest: Manifest) -> bytes:
    """The fused step graph of an exported eps ONNX, serialized for an InferenceSession (onnx only, no torch)."""
    return fused_model(onnx_path, manifest).SerializeToString()


class FusedIOBindingChain:
    """Runs `run_chain` / `eps` on an onnxruntime session built on the fused graph, with IO binding on `device`."""


    def __init__(self, session, manifest: Manifest, device: str = "cuda", device_id: int = 0,
                 name: str = "onnxruntime-fused", max_batch: int | None = None,
                 noise_window_bytes: int = NOISE_WINDOW_BYTES):
        import onnxruntime as ort

        self.ort, self.session, self.manifest = ort, session, manifest
        self.device, self.device_id, self.name = device, device_id, name
        self.max_batch = int(max_batch or manifest.max_batch)
        self.noise_window_bytes = noise_window_bytes
        self.engine_time = EngineTimer()
        names_in = tuple(i.name for i in session.get_inputs())
        names_out = tuple(o.name for o in session.get_outputs())
        if sorted(names_in) != sorted(FUSED_INPUTS) or sorted(names_out) != sorted(FUSED_OUTPUTS):
            raise UserError(f"session is not a fused step graph (inputs {names_in}, outputs {names_out}); build it "
                            "with runtime.backends.onnxruntime_iobinding.fused_model_bytes")
        self.shape = manifest.image_shape
        self.out_channels = manifest.out_channels
        self._no_sync = ort.RunOptions()
        self._no_sync.add_run_config_entry(NO_SYNC, "1")
        self._sync = ort.RunOptions()

    # -- device arrays: OrtValues on the device; pointers into them are bound per step ---------------------------

    def _to_device(self, a: np.ndarray):
        return self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a, dtype=np.float32), self.device,
                                                     self.device_id)

    def _empty(self, shape):
        return self.ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.float32, self.device, self.device_id)

    def _bind(self, binding, name: str, ptr: int, shape, output: bool = False) -> None:
        bind = binding.bind_output if output else binding.bind_input
        bind(name, self.device, self.device_id, np.float32, list(shape), int(ptr))

    # -- the chain -------------------------------------------------------------------------------------------------

    def run_chain(self, noise, plan: SamplingPlan, callback=None, progress=None) -> np.ndarray:
        """x_T -> x_0 with x on the device; `callback(k, t, x_t, eps, x_prev)` (verification) syncs every step."""
        x_T = noise.x_T
        check_batch(x_T, self.manifest, self.max_batch)
        B, K = len(x_T), plan.steps
        x_shape, eps_shape = (B, *self.shape), (B, self.out_channels, *self.shape[1:])
        step_bytes = int(np.prod(x_shape)) * 4
        t_tab, c_tab = step_tables(plan, B)
        # Kept referenced until the end: on "cpu" the OrtValues share these arrays' memory.
        x_start = np.array(x_T, dtype=np.float32, copy=True)  # on "cpu" the chain writes into this memory
        keep = [x_start, t_tab, c_tab]
        xs = [self._to_device(x_start), self._empty(x_shape)]
        eps = self._empty(eps_shape)
        t_dev, c_dev = self._to_device(t_tab), self._to_device(c_tab)
        binding = self.session.io_binding()
        self._bind(binding, "eps", eps.data_ptr(), eps_shape, output=True)
        d, x_host = 0, x_T
        for k0, k1, z_block in noise_windows(noise, K, window_steps(K, step_bytes, self.noise_window_bytes)):
            keep.append(z_block)
            z_dev = self._to_device(z_block)
            for k in range(k0, k1):
                self._bind(binding, "x_t", xs[d].data_ptr(), x_shape)
                self._bind(binding, "x_prev", xs[1 - d].data_ptr(), x_shape, output=True)
                self._bind(binding, "t", t_dev.data_ptr() + k * B * 4, (B,))
                self._bind(binding, "z", z_dev.data_ptr() + (k - k0) * step_bytes, x_shape)
                self._bind(binding, "coefs", c_dev.data_ptr() + k * N_COEFS * 4, (N_COEFS,))
                last = k == K - 1
                self._run(binding, self._sync if (last or callback) else self._no_sync)
                if callback is not None:
                    # outputs in bind order (eps, x_prev); copied because the buffers are reused next step
                    e, x_prev = (np.array(a, copy=True) for a in binding.copy_outputs_to_cpu())
                    check_finite(e, k, int(plan.timesteps[k]), self.name)
                    callback(StepInfo(k, int(plan.timesteps[k]), x_host, e, x_prev))
                    x_host = x_prev
                d = 1 - d
                if progress is not None:
                    progress.update(1)
        x0 = np.array(xs[d].numpy(), dtype=np.float32, copy=True)
        del keep
        return check_final(x0, K, self.name)

    def _run(self, binding, run_options) -> None:
        """One fused step (what a benchmark times per step; without a sync it returns once queued)."""
        with self.engine_time:
            self.session.run_with_iobinding(binding, run_options)

    def eps(self, x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Network output alone: the fused graph with all-zero coefficients (x_prev is then 0 and ignored)."""
        check_batch(x_t, self.manifest, self.max_batch)
        feeds = {"x_t": x_t, "t": np.ascontiguousarray(t, dtype=np.float32), "z": np.zeros_like(x_t),
                 "coefs": np.zeros((N_COEFS,), np.float32)}
        with self.engine_time:
            return self.session.run(["eps"], feeds)[0]
