"""TensorRT backend: an engine of the fused reverse step (`ddpm-deploy build`) with the whole chain on the GPU,
driven by the one loop (`ddpm_deploy.loop`; this backend is its own `DeviceSteps`).

Every tensor address is set once, when the engine is opened, to fixed buffers allocated for the largest batch,
and never changed: a CUDA graph captured from a TensorRT execution context bakes in that context's addresses and
state (NVIDIA: re-capture after changing them; one context per captured graph, TensorRT issue 3798), and with
fixed addresses there is nothing to go stale. One step is then
    3 device-to-device copies: t, coefs and z rows of the step tables -> the fixed t, coefs, z inputs
    1 launch of one CUDA graph = [enqueueV3; copy x_prev -> x_t; copy hist_out -> hist]
so the state stays in the fixed inputs ("ping-pong" by copy: x and hist are 5 image-sized tensors, < 1 MB for a
CIFAR batch of 16, against milliseconds of UNet). The graph is captured once per batch size (after a warm-up
enqueue, which TensorRT needs after a shape change, with the state saved around it); `eps()` and the HTTP
batcher's row slots use the same buffers and the same graph: a batch of B is rows 0..B-1 of them, so rows keep their
state when the batch size changes. Without a graph (cuda_graph=False, or capture failed) each step enqueues exactly
the same three operations.

Device memory, streams and graphs go through cuda-python (`runtime.cuda`), never torch. The engine's
sidecar manifest must match the TensorRT version and GPU here; otherwise the engine is refused with the command
that rebuilds it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import UserError
from ...files import sha256_bytes
from ...fused_io import (FUSED_INPUTS, FUSED_OUTPUTS, FUSED_STATE, N_HIST, input_shapes, interface_problem,
                         output_shapes)
from ...loop.run import NOISE_WINDOW_BYTES, Backend
from ...artifact.manifest import Manifest, read_engine_manifest, sidecar_path
from ..cuda import CudaDevice, import_cudart, import_tensorrt, require_gpu, tensorrt_problem
from ...loop.tables import aligned_rows, row_stride
# Step tables up to this size stay allocated between chains and HTTP batcher steps (refilled in place); larger
# ones (long chains' noise windows) are freed at the end of each chain.
KEEP_TABLE_BYTES = 16 << 20
# Hardware-compatible engines (HardwareCompatibilityLevel.AMPERE_PLUS) run on compute capability 8.0 and newer.
AMPERE = (8, 0)


def _cc(value) -> tuple[int, int] | None:
    try:
        major, minor = str(value).split(".")
        return int(major), int(minor)
    except ValueError:
        return None


def engine_compatibility_problem(manifest: Manifest, trt_version: str, compute_capability: str,
                                 engine: str = "ENGINE") -> str | None:
    """Why the engine described by `manifest` cannot run with this TensorRT / GPU, or None when it can.

    Engines are tied to the fused-step interface they were compiled with (ddpm_deploy.fused_io), to the exact
    TensorRT version that built them and, unless built hardware-compatible, to the GPU's compute capability."""
    rebuild = f"rebuild it here with `ddpm-deploy build MODEL.onnx -o {engine}`"
    built = manifest.tensorrt
    if manifest.graph != "fused" or not isinstance(built, dict):
        return f"{engine} was not built by `ddpm-deploy build` (no TensorRT section in its manifest): {rebuild}"
    problem = interface_problem(manifest.fused_interface)
    if problem:
        return f"{engine} {problem}: {rebuild}"
    if str(built.get("version")) != str(trt_version):
        return (f"{engine} was built with TensorRT {built.get('version')} but this is TensorRT {trt_version} "
                f"(engines load only in the version that built them): {rebuild}")
    have = _cc(compute_capability)
    if have is None:
        return f"cannot read this GPU's compute capability {compute_capability!r}"
    if built.get("hardware_compatible"):
        if have < AMPERE:
            return (f"{engine} is a hardware-compatible engine, which needs compute capability 8.0 or newer, but "
                    f"this GPU has {compute_capability}: {rebuild}")
        return None
    if _cc(built.get("compute_capability")) != have:
        return (f"{engine} was built for compute capability {built.get('compute_capability')} "
                f"({built.get('gpu_name', 'unknown GPU')}) but this GPU has {compute_capability}: {rebuild}")
    return None


def trt_logger(trt):
    """A TensorRT logger that keeps error messages for one-line UserErrors instead of printing them."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if int(severity) <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(str(msg).strip())

    return Logger()


class TensorRTBackend(Backend):
    def __init__(self, path: str, device_id: int = 0, cuda_graph: bool = True, threads: int | None = None,
                 noise_window_bytes: int = NOISE_WINDOW_BYTES):
        super().__init__()
        self._cuda = None
        self._graph = None  # (graph, exec) for self._batch, or None: enqueue per step
        self._context = self._engine = self._runtime = None
        problem = tensorrt_problem()  # environment first, before reading files or importing tensorrt
        if problem:
            raise UserError(problem)
        import_cudart()
        gpu = require_gpu(device_id)
        if threads:
            raise UserError("--threads does not apply to the TensorRT backend (the GPU runs the chain)")
        self.path = str(path)
        self.manifest = read_engine_manifest(path)
        trt = import_tensorrt()
        problem = engine_compatibility_problem(self.manifest, trt.__version__, gpu["compute_capability"], self.path)
        if problem:
            raise UserError(problem)
        data = Path(path).read_bytes()
        if self.manifest.engine_sha256 != sha256_bytes(data):  # required (read_engine_manifest): never skipped
            raise UserError(f"{sidecar_path(path)} describes another engine than {path}: rebuild it with "
                            f"`ddpm-deploy build MODEL.onnx -o {path}`")
        self.name = "tensorrt-fp16" if self.manifest.dtype == "float16" else "tensorrt-fp32"
        self.max_batch = self.manifest.max_batch
        self.use_cuda_graph, self.noise_window_bytes = cuda_graph, noise_window_bytes
        self.shape = self.manifest.image_shape
        self.graph_launches = 0  # steps that ran as a replay of the captured graph (tests assert on it)
        self._batch = None
        self._tabs: dict = {}  # table name -> (device pointer, capacity in bytes), refilled in place
        self.steps = self
        try:
            self._open(trt, data, device_id)
        except BaseException:
            self.close(quiet=True)  # the error that stopped the open is the one to report
            raise

    # -- setup: buffers for the largest batch, bound once ----------------------------------------------------------

    def _open(self, trt, data: bytes, device_id: int) -> None:
        self._cuda = CudaDevice(device_id)
        self._logger = trt_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(data)
        if self._engine is None:
            raise UserError(f"TensorRT could not load {self.path} ({self._last_error()}): rebuild it with "
                            f"`ddpm-deploy build MODEL.onnx -o {self.path}`")
        self._check_io(trt)
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise UserError(f"TensorRT could not create an execution context for {self.path} "
                            f"({self._last_error()}): free GPU memory or build with a smaller --max-batch")
        shapes = {**input_shapes(self.manifest, self.max_batch), **output_shapes(self.manifest, self.max_batch)}
        self._buf = {name: self._cuda.malloc(row_stride(4 * int(np.prod(shape)))) for name, shape in shapes.items()}
        # where the state waits while a new batch size's warm-up step runs on the buffers
        self._saved = {name: self._cuda.malloc(row_stride(4 * int(np.prod(shapes[name])))) for name, _ in FUSED_STATE}
        for name, ptr in self._buf.items():
            if not self._context.set_tensor_address(name, ptr):
                raise UserError(f"TensorRT rejected the address of {name} in {self.path}: {self._last_error()}")

    def _check_io(self, trt) -> None:
        e = self._engine
        names = [e.get_tensor_name(i) for i in range(e.num_io_tensors)]
        ins = sorted(n for n in names if e.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        outs = sorted(n for n in names if e.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        if ins != sorted(FUSED_INPUTS) or outs != sorted(FUSED_OUTPUTS):
            raise UserError(f"{self.path} is not a fused-step engine of this version (inputs {ins}, outputs {outs}): "
                            "rebuild it with `ddpm-deploy build MODEL.onnx`")
        not_f32 = [n for n in names if e.get_tensor_dtype(n) != trt.DataType.FLOAT]
        if not_f32:
            raise UserError(f"{self.path}: IO tensors {not_f32} are not float32; export with fp32 IO (the default)")
        problem = self._shape_problem()
        if problem:  # buffers are sized from the sidecar: it must describe this engine's IO exactly
            raise UserError(f"{sidecar_path(self.path)} does not describe {self.path}: {problem}; rebuild it with "
                            f"`ddpm-deploy build MODEL.onnx -o {self.path}`")

    def _shape_problem(self) -> str | None:
        """The first binding whose shape in the engine (batch axis -1 when dynamic) or input profile (min, opt,
        max) differs from what the sidecar's image shape and batch profile give, or None."""
        e, m = self._engine, self.manifest
        want = {k: (input_shapes(m, b), output_shapes(m, b)) for k, b in
                (("min", m.min_batch), ("opt", m.opt_batch or m.max_batch), ("max", m.max_batch))}
        batch_dims = {-1, m.max_batch} if m.min_batch == m.max_batch else {-1}  # dynamic, or fixed at the one size
        for name, shape in {**want["max"][0], **want["max"][1]}.items():
            have = tuple(int(d) for d in e.get_tensor_shape(name))
            if len(have) != len(shape) or have[1:] != shape[1:] or have[0] not in batch_dims:
                return f"{name} is {have} in the engine, the sidecar gives (batch,) + {shape[1:]}"
        for name in want["max"][0]:
            profile = [tuple(int(d) for d in dims) for dims in e.get_tensor_profile_shape(name, 0)]
            expected = [want[k][0][name] for k in ("min", "opt", "max")]
            if profile != expected:
                return f"{name}'s profile (min, opt, max) is {profile} in the engine, the sidecar gives {expected}"
        return None

    def _last_error(self) -> str:
        return "; ".join(self._logger.errors[-2:])[:300] or "no detail from TensorRT"

    # -- one fused step ----------------------------------------------------------------------------------------------

    def open(self, batch: int) -> None:
        """Input shapes for `batch`, a warm-up enqueue (TensorRT's lazy setup after a shape change cannot be
        captured), then the step's graph for this batch. The warm-up runs a step on the state buffers, so the state
        (x_t, hist of every row) is saved before it and put back after."""
        if self._batch == batch:
            return
        self._drop_graph()
        self._batch = None
        for name, shape in input_shapes(self.manifest, batch).items():
            if not self._context.set_input_shape(name, shape):
                raise UserError(f"engine {self.path} rejects {name} shape {shape} (profile batch 1..{self.max_batch})")
        self._move_state(self._saved, self._buf)
        self._batch = batch
        try:
            self._enqueue_step_or_raise()
            if self.use_cuda_graph:
                self._graph = self._cuda.capture(self._enqueue_step)
        except BaseException:
            self._batch = None
            raise
        finally:
            self._move_state(self._buf, self._saved)

    def _move_state(self, dst: dict, src: dict) -> None:
        """Copy the whole state buffers (every row, largest batch) from `src` to `dst`, in stream order."""
        shapes = input_shapes(self.manifest, self.max_batch)
        for name, _ in FUSED_STATE:
            self._cuda.copy(dst[name], src[name], 4 * int(np.prod(shapes[name])))

    def _enqueue_step(self) -> bool:
        """The fused step, then its outputs copied into its inputs: the next step reads the new state."""
        if not self._context.execute_async_v3(self._cuda.stream_handle):
            return False
        for state_in, state_out in FUSED_STATE:
            self._cuda.copy(self._buf[state_in], self._buf[state_out], self._nbytes(state_in))
        return True

    def _enqueue_step_or_raise(self) -> None:
        if not self._enqueue_step():
            raise UserError(f"TensorRT could not run {self.path}: {self._last_error()}")

    def _nbytes(self, name: str) -> int:
        """Bytes of tensor `name` at the current batch."""
        shapes = {**input_shapes(self.manifest, self._batch), **output_shapes(self.manifest, self._batch)}
        return 4 * int(np.prod(shapes[name]))

    def _drop_graph(self, cu=None, quiet: bool = False) -> None:
        if self._graph is not None:
            graph, self._graph = self._graph, None
            (cu or self._cuda).destroy_graph(graph, quiet=quiet)

    # -- DeviceSteps (ddpm_deploy.loop) --------------------------------------------------------------------------

    def write_state(self, row: int, x: np.ndarray, hist) -> None:
        cu, n = self._cuda, len(x)
        per_x = x[0].nbytes
        per_h = per_x * N_HIST
        cu.upload(self._buf["x_t"] + row * per_x, x)
        if hist is None:
            cu.memset(self._buf["hist"] + row * per_h, n * per_h)
        else:
            cu.upload(self._buf["hist"] + row * per_h, hist)

    def read_state(self, row: int, stop: int):
        image = self.manifest.image_shape
        per_x = 4 * int(np.prod(image))
        x = self._cuda.download(self._buf["x_t"] + row * per_x, (stop - row, *image))
        h = self._cuda.download(self._buf["hist"] + row * per_x * N_HIST, (stop - row, N_HIST, *image))
        return x, h

    def put_tables(self, t: np.ndarray, coefs: np.ndarray) -> None:
        t_rows, c_rows = aligned_rows(t), aligned_rows(coefs)
        self._t_rows, self._t_stride = self._table("t", t_rows), t_rows.strides[0]
        self._c_rows, self._c_stride = self._table("coefs", c_rows), c_rows.strides[0]
        # each step's `nonfinite` output is copied into its row here after the launch (the graph's addresses are
        # fixed, so the row cannot be an address of the step itself)
        self._f_stride = row_stride(4 * t.shape[1])
        self._f_tab = self._table("flags", None, len(t) * self._f_stride)

    def _table(self, name: str, rows: np.ndarray | None, nbytes: int = 0) -> int:
        """Device memory for table `name` holding `rows` (or `nbytes` left as they are), reused when it fits: the
        loop only refills a table once the steps reading it have completed."""
        nbytes = rows.nbytes if rows is not None else nbytes
        ptr, cap = self._tabs.get(name, (None, 0))
        if nbytes > cap:
            if ptr is not None:
                self._cuda.free(ptr)
            ptr = self._cuda.malloc(nbytes, zero=False)
            self._tabs[name] = (ptr, nbytes)
        if rows is not None:
            self._cuda.upload(ptr, rows)
        return ptr

    def put_noise(self, z: np.ndarray) -> None:
        z_rows = aligned_rows(z)
        self._z_tab, self._z_stride = self._table("z", z_rows), z_rows.strides[0]

    def bind_step(self, k: int, j: int) -> None:
        """The per-step rows into the fixed inputs; the state is already there (the graph copies it back)."""
        cu = self._cuda
        cu.copy(self._buf["t"], self._t_rows + k * self._t_stride, self._nbytes("t"))
        cu.copy(self._buf["coefs"], self._c_rows + k * self._c_stride, self._nbytes("coefs"))
        cu.copy(self._buf["z"], self._z_tab + j * self._z_stride, self._nbytes("z"))
        self._k = k

    def launch(self, sync: bool) -> None:
        """One step (asynchronous: the loop's engine time is enqueue latency; the GPU's time per step is chain
        time / steps), then its flag into its row of the flags table (stream order, no sync)."""
        if self._graph is not None:
            self._cuda.launch(self._graph)
            self.graph_launches += 1
        else:
            self._enqueue_step_or_raise()
        self._cuda.copy(self._f_tab + self._k * self._f_stride, self._buf["nonfinite"], self._nbytes("nonfinite"))
        if sync:
            self._cuda.sync()

    def read_eps(self) -> np.ndarray:
        return self._cuda.download(self._buf["eps"], output_shapes(self.manifest, self._batch)["eps"])

    def read_flags(self, k0: int, k1: int) -> np.ndarray:
        rows = self._cuda.download(self._f_tab + k0 * self._f_stride, (k1 - k0, self._f_stride // 4))
        return rows[:, :self._batch]

    def end(self) -> None:
        self._cuda.sync()  # nothing queued may still read what is freed or refilled
        for name, (ptr, cap) in list(self._tabs.items()):
            if cap > KEEP_TABLE_BYTES:
                del self._tabs[name]
                self._cuda.free(ptr)

    def close(self, quiet: bool = False) -> None:
        """Free the graph, TensorRT objects, device buffers (tables too) and the stream (idempotent)."""
        if self._cuda is None:
            return
        cu, self._cuda, self._tabs = self._cuda, None, {}
        try:
            self._drop_graph(cu, quiet=True)  # a sticky error is reported by cu.close below, once
        finally:
            # the context's activation memory goes before the engine, the engine before its runtime
            self._context = self._engine = None
            self._runtime = None
            cu.close(quiet=quiet)
