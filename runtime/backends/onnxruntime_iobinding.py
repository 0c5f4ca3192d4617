"""The whole reverse chain inside onnxruntime with IO binding: the fused step graph (eps_theta + sampler update,
`ddpm_deploy.graph.fused`) run by the one device loop (`runtime.device_loop.run_device_chain`). The state
(x_t, hist) ping-pongs between two pairs of device buffers by rebinding; t, coefs and z are bound straight into
per-step tables uploaded once, whose rows start at 256-byte aligned offsets (the TensorRT provider passes bound
pointers to setTensorAddress, which needs that alignment, and ignores its refusal).

Works on any provider whose memory onnxruntime can bind: "cuda" (CUDA and TensorRT execution providers, the
point of it) and "cpu" (the same code path, which is how it is tested without a GPU). onnxruntime captures no
CUDA graph here, so rebinding per step is what its API is for.
"""

from __future__ import annotations

import numpy as np

from ...chain import EngineTimer, check_batch
from ...errors import UserError
from ...graph.fused import FUSED_INPUTS, FUSED_OUTPUTS, FUSED_STATE, fused_model
from ...manifest import Manifest
from ...samplers import SamplingPlan
from ..device_loop import NOISE_WINDOW_BYTES, input_shapes, output_shapes, row_stride, run_device_chain

# onnxruntime's run option (kOrtRunOptionsConfigDisableSynchronizeExecutionProviders): skip the stream sync at
# the end of Run, so steps queue back to back; the loop asks for a sync where it needs one.
NO_SYNC = "disable_synchronize_execution_providers"


def fused_model_bytes(onnx_path: str, manifest: Manifest) -> bytes:
    """The fused step graph of an exported eps ONNX, serialized for an InferenceSession (onnx only, no torch)."""
    return fused_model(onnx_path, manifest).SerializeToString()


class FusedIOBindingChain:
    """`run_chain` / `eps` on an onnxruntime session built on the fused graph, with IO binding on `device`; the
    `DeviceSteps` of runtime.device_loop."""

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
        self._no_sync = ort.RunOptions()
        self._no_sync.add_run_config_entry(NO_SYNC, "1")
        self._sync = ort.RunOptions()

    # -- device arrays: OrtValues on the device; pointers into them are bound per step ---------------------------

    def _to_device(self, a: np.ndarray):
        """An OrtValue holding `a`; on "cpu" it shares `a`'s memory, which `self._keep` holds until `end`."""
        a = np.ascontiguousarray(a, dtype=np.float32)
        self._keep.append(a)
        return self.ort.OrtValue.ortvalue_from_numpy(a, self.device, self.device_id)

    def _bind(self, name: str, ptr: int, output: bool = False) -> None:
        bind = self._binding.bind_output if output else self._binding.bind_input
        bind(name, self.device, self.device_id, np.float32, list(self._shapes[name]), int(ptr))

    # -- DeviceSteps ------------------------------------------------------------------------------------------------

    def begin(self, x_T: np.ndarray, t_rows: np.ndarray, coef_rows: np.ndarray) -> None:
        B = len(x_T)
        self._keep: list = []
        self._shapes = {**input_shapes(self.manifest, B), **output_shapes(self.manifest, B)}
        # state slots: [slot 0, slot 1] per (input, output) pair; slot 0 starts as x_T and a zero history
        start = {"x_t": np.array(x_T, np.float32, copy=True),  # on "cpu" the chain writes into this memory
                 "hist": np.zeros(self._shapes["hist"], np.float32)}
        self._state = {i: [self._to_device(start[i]), self._to_device(np.zeros(self._shapes[o], np.float32))]
                       for i, o in FUSED_STATE}
        self._out = {"eps": self._to_device(np.zeros(self._shapes["eps"], np.float32))}
        self._tab = {"t": (self._to_device(t_rows), t_rows.strides[0]),
                     "coefs": (self._to_device(coef_rows), coef_rows.strides[0])}
        # each step's `nonfinite` output is bound straight into its row of this table: no copy, no sync
        stride = row_stride(4 * B)
        self._flags = (self._to_device(np.zeros((len(t_rows), stride // 4), np.float32)), stride, B)
        self._binding = self.session.io_binding()
        self._bind("eps", self._out["eps"].data_ptr(), output=True)

    def put_noise(self, z_rows: np.ndarray) -> None:
        # the loop synced the previous window's last step, so dropping its OrtValue here is safe
        self._tab["z"] = (self._to_device(z_rows), z_rows.strides[0])

    def bind_step(self, k: int, j: int, d: int) -> None:
        for i, o in FUSED_STATE:
            self._bind(i, self._state[i][d].data_ptr())
            self._bind(o, self._state[i][1 - d].data_ptr(), output=True)
            self._out[o] = self._state[i][1 - d]
        for name, row in (("t", k), ("coefs", k), ("z", j)):
            table, stride = self._tab[name]
            self._bind(name, table.data_ptr() + row * stride)
        table, stride, _ = self._flags
        self._bind("nonfinite", table.data_ptr() + k * stride, output=True)

    def launch(self, sync: bool) -> None:
        """One fused step (what a benchmark times per step; without a sync it returns once queued)."""
        with self.engine_time:
            self.session.run_with_iobinding(self._binding, self._sync if sync else self._no_sync)

    def read(self, name: str) -> np.ndarray:
        # the loop reads after a synced launch; copied because the buffers are reused by the next steps
        return np.array(self._out[name].numpy(), dtype=np.float32, copy=True)

    def read_flags(self, k0: int, k1: int) -> np.ndarray:
        table, _, B = self._flags
        return np.array(table.numpy()[k0:k1, :B], dtype=np.float32, copy=True)

    def end(self) -> None:
        self._binding = self._state = self._out = self._tab = self._flags = None
        self._keep = []

    # -- Backend-like API --------------------------------------------------------------------------------------------

    def run_chain(self, noise, plan: SamplingPlan, callback=None, progress=None) -> np.ndarray:
        """x_T -> x_0 with the state on the device; `callback(StepInfo)` (verification) syncs every step."""
        check_batch(noise.x_T, self.manifest, self.max_batch)
        return run_device_chain(self, noise, plan, callback, progress, self.noise_window_bytes)

    def eps(self, x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Network output alone: the fused graph with all-zero coefficients (x_prev is then 0 and ignored)."""
        check_batch(x_t, self.manifest, self.max_batch)
        shapes = input_shapes(self.manifest, len(x_t))
        feeds = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
        feeds["x_t"], feeds["t"] = x_t, np.ascontiguousarray(t, dtype=np.float32)
        with self.engine_time:
            return self.session.run(["eps"], feeds)[0]
