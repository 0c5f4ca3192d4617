"""The whole reverse chain inside onnxruntime with IO binding: the fused step graph (eps_theta + sampler update,
`ddpm_deploy.graph.fused`) run by the one loop (`ddpm_deploy.loop.run.run_chain`). The state
(x_t, hist) ping-pongs between two pairs of device buffers by rebinding; t, coefs and z are bound straight into
per-step tables uploaded once, whose rows start at 256-byte aligned offsets (the TensorRT provider passes bound
pointers to setTensorAddress, which needs that alignment, and ignores its refusal).

Works on any provider whose memory onnxruntime can bind: "cuda" (CUDA and TensorRT execution providers, the
point of it) and "cpu" (the same code path, which is how it is tested without a GPU). onnxruntime captures no
CUDA graph here, so rebinding per step is what its API is for.
"""

from __future__ import annotations

import numpy as np

from ...errors import UserError
from ...fused_io import FUSED_INPUTS, FUSED_OUTPUTS, FUSED_STATE, input_shapes, output_shapes
from ...graph.fused import fused_model
from ...loop.run import NOISE_WINDOW_BYTES
from ...artifact.manifest import Manifest
from ...loop.tables import aligned_rows, row_stride

# onnxruntime's run option (kOrtRunOptionsConfigDisableSynchronizeExecutionProviders): skip the stream sync at
# the end of Run, so steps queue back to back; the loop asks for a sync where it needs one.
NO_SYNC = "disable_synchronize_execution_providers"


def fused_model_bytes(onnx_path: str, manifest: Manifest) -> bytes:
    """The fused step graph of an exported eps ONNX, serialized for an InferenceSession (onnx only, no torch)."""
    return fused_model(onnx_path, manifest).SerializeToString()


class FusedIOBindingChain:
    """`ddpm_deploy.loop.run.DeviceSteps` on an onnxruntime session built on the fused graph, with IO binding on
    `device`. The state pairs (x_t / x_prev, hist / hist_out) are two buffers each, sized for the largest batch,
    and swap roles after every step (`_d` is the one holding the state)."""

    def __init__(self, session, manifest: Manifest, device: str = "cuda", device_id: int = 0,
                 name: str = "onnxruntime-fused", max_batch: int | None = None,
                 noise_window_bytes: int = NOISE_WINDOW_BYTES):
        import onnxruntime as ort

        self.ort, self.session, self.manifest = ort, session, manifest
        self.device, self.device_id, self.name = device, device_id, name
        self.max_batch = int(max_batch or manifest.max_batch)
        self.noise_window_bytes = noise_window_bytes
        names_in = tuple(i.name for i in session.get_inputs())
        names_out = tuple(o.name for o in session.get_outputs())
        if sorted(names_in) != sorted(FUSED_INPUTS) or sorted(names_out) != sorted(FUSED_OUTPUTS):
            raise UserError(f"session is not a fused step graph (inputs {names_in}, outputs {names_out}); build it "
                            "with runtime.backends.onnxruntime_iobinding.fused_model_bytes")
        self._no_sync = ort.RunOptions()
        self._no_sync.add_run_config_entry(NO_SYNC, "1")
        self._sync = ort.RunOptions()
        self._keep: list = []   # host arrays behind the state and eps OrtValues (the backend's life)
        self._tables: list = []  # ... behind the tables and noise (until `end`)
        full = {**input_shapes(manifest, self.max_batch), **output_shapes(manifest, self.max_batch)}
        # state slots: [slot 0, slot 1] per (input, output) pair, the same two buffers at every batch size
        self._state = {i: [self._to_device(np.zeros(full[i], np.float32), self._keep) for _ in range(2)]
                       for i, _ in FUSED_STATE}
        self._eps_buf = self._to_device(np.zeros(full["eps"], np.float32), self._keep)
        self._d, self._B, self._tab, self._flags = 0, self.max_batch, {}, None

    # -- device arrays: OrtValues on the device; pointers into them are bound per step ---------------------------

    def _to_device(self, a: np.ndarray, keep: list):
        """An OrtValue holding `a`; on "cpu" it shares `a`'s memory, which `keep` holds while it is used."""
        a = np.ascontiguousarray(a, dtype=np.float32)
        keep.append(a)
        return self.ort.OrtValue.ortvalue_from_numpy(a, self.device, self.device_id)

    def _bind(self, name: str, ptr: int, output: bool = False) -> None:
        bind = self._binding.bind_output if output else self._binding.bind_input
        bind(name, self.device, self.device_id, np.float32, list(self._shapes[name]), int(ptr))

    # -- DeviceSteps ------------------------------------------------------------------------------------------------

    def open(self, batch: int) -> None:
        self._B = int(batch)
        self._shapes = {**input_shapes(self.manifest, batch), **output_shapes(self.manifest, batch)}
        self._binding = self.session.io_binding()
        self._bind("eps", self._eps_buf.data_ptr(), output=True)

    def write_state(self, row: int, x: np.ndarray, hist) -> None:
        """onnxruntime copies whole OrtValues only: the buffer comes to the host, gets its rows, and goes back
        (only when rows join: a chain's start, a request joining the HTTP batcher)."""
        for name, rows in (("x_t", x), ("hist", 0.0 if hist is None else hist)):
            value = self._state[name][self._d]
            host = value.numpy()
            host[row:row + len(x)] = rows
            value.update_inplace(np.ascontiguousarray(host))

    def read_state(self, row: int, stop: int):
        return tuple(np.array(self._state[name][self._d].numpy()[row:stop], np.float32, copy=True)
                     for name in ("x_t", "hist"))

    def put_tables(self, t: np.ndarray, coefs: np.ndarray) -> None:
        t_rows, c_rows = aligned_rows(t), aligned_rows(coefs)
        self._tab["t"] = (self._to_device(t_rows, self._tables), t_rows.strides[0])
        self._tab["coefs"] = (self._to_device(c_rows, self._tables), c_rows.strides[0])
        # each step's `nonfinite` output is bound straight into its row of this table: no copy, no sync
        stride = row_stride(4 * t.shape[1])
        self._flags = (self._to_device(np.zeros((len(t), stride // 4), np.float32), self._tables), stride)

    def put_noise(self, z: np.ndarray) -> None:
        # the loop synced the previous window's last step, so dropping its OrtValue here is safe
        z_rows = aligned_rows(z)
        self._tab["z"] = (self._to_device(z_rows, self._tables), z_rows.strides[0])

    def bind_step(self, k: int, j: int) -> None:
        d = self._d
        for i, o in FUSED_STATE:
            self._bind(i, self._state[i][d].data_ptr())
            self._bind(o, self._state[i][1 - d].data_ptr(), output=True)
        for name, row in (("t", k), ("coefs", k), ("z", j)):
            table, stride = self._tab[name]
            self._bind(name, table.data_ptr() + row * stride)
        table, stride = self._flags
        self._bind("nonfinite", table.data_ptr() + k * stride, output=True)

    def launch(self, sync: bool) -> None:
        """One fused step (without a sync it returns once queued); the outputs become the state."""
        self.session.run_with_iobinding(self._binding, self._sync if sync else self._no_sync)
        self._d = 1 - self._d

    def read_eps(self) -> np.ndarray:
        # the loop reads after a synced launch; copied because the buffer is reused by the next steps
        return np.array(self._eps_buf.numpy()[:self._B], dtype=np.float32, copy=True)

    def read_flags(self, k0: int, k1: int) -> np.ndarray:
        return np.array(self._flags[0].numpy()[k0:k1, :self._B], dtype=np.float32, copy=True)

    def end(self) -> None:
        self._tab, self._flags, self._tables = {}, None, []

    def close(self) -> None:
        self.end()
        self._binding = self._state = self._eps_buf = None
        self._keep = []
