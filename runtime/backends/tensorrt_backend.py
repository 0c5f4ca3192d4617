"""TensorRT backend: an engine of the fused reverse step (`ddpm-deploy build`) with the whole chain on the GPU.

run_chain uploads x_T, the step noise, the per-step t vectors and the plan's coefficient table once; x ping-pongs
between two device buffers. Each step is three device-to-device copies (z_k, t_k, coefs_k into the engine's
fixed input buffers) and one launch of a CUDA graph captured once per ping-pong direction, so the host never
waits until x_0 comes back. With a callback (verification) it syncs each step and hands eps and x_prev over.

Device memory, streams and graphs go through cuda-python (`runtime.cuda`), never torch. The engine's
sidecar manifest must match the TensorRT version and GPU here; otherwise the engine is refused with the command
that rebuilds it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...chain import Backend, StepInfo, check_batch, check_final, check_finite
from ...errors import UserError
from ...files import sha256_bytes
from ...graph.fused import FUSED_INPUTS, FUSED_OUTPUTS
from ...manifest import Manifest, read_engine_manifest, sidecar_path
from ...samplers import N_COEFS, SamplingPlan
from ..cuda import CudaDevice, import_cudart, import_tensorrt, require_gpu, tensorrt_problem
from ..device_loop import NOISE_WINDOW_BYTES, noise_windows, step_tables, window_steps
# Hardware-compatible engines (HardwareCompatibilityLevel.AMPERE_PLUS) run on compute capability 8.0 and newer.
AMPERE = (8, 0)
# With a progress bar, sync every this many steps so it shows finished steps, not queued launches.
PROGRESS_SYNC_STEPS = 20


def _cc(value) -> tuple[int, int] | None:
    try:
        major, minor = str(value).split(".")
        return int(major), int(minor)
    except ValueError:
        return None


def engine_compatibility_problem(manifest: Manifest, trt_version: str, compute_capability: str,
                                 engine: str = "ENGINE") -> str | None:
    """Why the engine described by `manifest` cannot run with this TensorRT / GPU, or None when it can.

    Engines are tied to the exact TensorRT version that built them and, unless built hardware-compatible, to the
    GPU's compute capability."""
    rebuild = f"rebuild it here with `ddpm-deploy build MODEL.onnx -o {engine}`"
    built = manifest.tensorrt
    if manifest.graph != "fused" or not isinstance(built, dict):
        return f"{engine} was not built by `ddpm-deploy build` (no TensorRT section in its manifest): {rebuild}"
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
        self._graphs: dict[int, tuple | None] = {}
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
        if self.manifest.engine_sha256 not in (None, sha256_bytes(data)):
            raise UserError(f"{sidecar_path(path)} describes another engine than {path}: rebuild it with "
                            f"`ddpm-deploy build MODEL.onnx -o {path}`")
        self.name = "tensorrt-fp16" if self.manifest.dtype == "float16" else "tensorrt-fp32"
        self.max_batch = self.manifest.max_batch
        self.use_cuda_graph, self.noise_window_bytes = cuda_graph, noise_window_bytes
        self.shape = self.manifest.image_shape
        self.out_channels = self.manifest.out_channels
        self._batch = None
        try:
            self._open(trt, data, device_id)
        except BaseException:
            self.close()
            raise

    # -- setup -----------------------------------------------------------------------------------------------------

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
        c, h, w = self.shape
        mb, cu = self.max_batch, self._cuda
        x_bytes = mb * c * h * w * 4
        self._x = [cu.malloc(x_bytes), cu.malloc(x_bytes)]  # ping-pong: x_t in one, x_prev written to the other
        self._z, self._t, self._coefs = cu.malloc(x_bytes), cu.malloc(mb * 4), cu.malloc(N_COEFS * 4)
        self._eps = cu.malloc(mb * self.out_channels * h * w * 4)

    def _check_io(self, trt) -> None:
        e = self._engine
        names = [e.get_tensor_name(i) for i in range(e.num_io_tensors)]
        ins = sorted(n for n in names if e.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        outs = sorted(n for n in names if e.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        if ins != sorted(FUSED_INPUTS) or outs != sorted(FUSED_OUTPUTS):
            raise UserError(f"{self.path} is not a fused-step engine (inputs {ins}, outputs {outs}): rebuild it with "
                            "`ddpm-deploy build MODEL.onnx`")
        not_f32 = [n for n in names if e.get_tensor_dtype(n) != trt.DataType.FLOAT]
        if not_f32:
            raise UserError(f"{self.path}: IO tensors {not_f32} are not float32; export with fp32 IO (the default)")

    def _last_error(self) -> str:
        return "; ".join(self._logger.errors[-2:])[:300] or "no detail from TensorRT"

    # -- one fused step ----------------------------------------------------------------------------------------------

    def _set_batch(self, batch: int) -> None:
        """Input shapes for `batch`; captured graphs belong to one shape, so a new batch drops them."""
        if self._batch == batch:
            return
        self._drop_graphs()
        c, h, w = self.shape
        for name, shape in (("x_t", (batch, c, h, w)), ("z", (batch, c, h, w)), ("t", (batch,))):
            if not self._context.set_input_shape(name, shape):
                raise UserError(f"engine {self.path} rejects {name} shape {shape} (profile batch 1..{self.max_batch})")
        self._batch = batch

    def _bind(self, d: int) -> None:
        """Tensor addresses for direction d: x_t from buffer d, x_prev into buffer 1 - d."""
        ctx = self._context
        for name, ptr in (("x_t", self._x[d]), ("x_prev", self._x[1 - d]), ("t", self._t), ("z", self._z),
                          ("coefs", self._coefs), ("eps", self._eps)):
            ctx.set_tensor_address(name, ptr)

    def _enqueue(self) -> bool:
        return bool(self._context.execute_async_v3(self._cuda.stream_handle))

    def _enqueue_or_raise(self) -> None:
        if not self._enqueue():
            raise UserError(f"TensorRT could not run {self.path}: {self._last_error()}")

    def _prepare_graphs(self) -> None:
        """Capture both directions (each after a warm-up enqueue, which also applies new shapes). Warm-ups write
        into the x buffers, so this runs before x_T is uploaded."""
        for d in (0, 1):
            if d in self._graphs:
                continue
            self._bind(d)
            self._enqueue_or_raise()
            self._graphs[d] = self._cuda.capture(self._enqueue) if self.use_cuda_graph else None

    def _launch(self, d: int) -> None:
        """One step, asynchronous: timed, it gives enqueue latency (the GPU's time per step is chain time / steps)."""
        with self.engine_time:
            self._launch_untimed(d)

    def _launch_untimed(self, d: int) -> None:
        graph = self._graphs.get(d)
        if graph is not None:
            self._cuda.launch(graph)
        else:  # not capturable (or disabled): plain enqueue with this direction's addresses
            self._bind(d)
            self._enqueue_or_raise()

    def _drop_graphs(self) -> None:
        for graph in self._graphs.values():
            if graph is not None:
                self._cuda.destroy_graph(graph)
        self._graphs = {}

    # -- Backend API -------------------------------------------------------------------------------------------------

    def _eps(self, x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Network output: the fused engine with all-zero coefficients (x_prev is then 0 and ignored)."""
        check_batch(x_t, self.manifest, self.max_batch)
        cu, b = self._cuda, len(x_t)
        self._set_batch(b)
        cu.upload(self._x[0], x_t)
        cu.upload(self._t, np.ascontiguousarray(t, dtype=np.float32))
        cu.memset(self._z, x_t.nbytes)
        cu.memset(self._coefs, N_COEFS * 4)
        self._bind(0)
        self._enqueue_or_raise()
        return cu.download(self._eps, (b, self.out_channels, *self.shape[1:]))

    def run_chain(self, noise, plan: SamplingPlan, callback=None, progress=None) -> np.ndarray:
        x_T = noise.x_T
        check_batch(x_T, self.manifest, self.max_batch)
        cu, b, steps = self._cuda, len(x_T), plan.steps
        x_shape, step_bytes = (b, *self.shape), x_T.nbytes
        self._set_batch(b)
        self._prepare_graphs()
        t_tab, c_tab = step_tables(plan, b)
        window = window_steps(steps, step_bytes, self.noise_window_bytes)
        tables = []
        try:
            for nbytes in (t_tab.nbytes, c_tab.nbytes, window * step_bytes):
                tables.append(cu.malloc(nbytes, zero=False))
            t_dev, c_dev, z_dev = tables
            cu.upload(self._x[0], x_T)
            cu.upload(t_dev, t_tab)
            cu.upload(c_dev, c_tab)
            d, x_host = 0, x_T
            for k0, k1, z_block in noise_windows(noise, steps, window):
                cu.upload(z_dev, z_block)  # in stream order: after the previous window's steps have read theirs
                for k in range(k0, k1):
                    cu.copy(self._z, z_dev + (k - k0) * step_bytes, step_bytes)
                    cu.copy(self._t, t_dev + k * b * 4, b * 4)
                    cu.copy(self._coefs, c_dev + k * N_COEFS * 4, N_COEFS * 4)
                    self._launch(d)
                    if callback is not None:
                        x_host = self._hand_over(callback, k, int(plan.timesteps[k]), x_host, d, x_shape)
                    elif progress is not None and (k + 1) % PROGRESS_SYNC_STEPS == 0:
                        cu.sync()
                    d = 1 - d
                    if progress is not None:
                        progress.update(1)
            x0 = cu.download(self._x[d], x_shape)  # the one host sync of the fast path
        finally:
            self._cuda.rt.cudaStreamSynchronize(self._cuda.stream)  # nothing may still read what is freed
            for ptr in tables:
                cu.free(ptr)
        return check_final(x0, steps, self.name)

    def _hand_over(self, callback, k: int, t: int, x_host: np.ndarray, d: int, x_shape: tuple) -> np.ndarray:
        """Verification: sync, check eps, give the step to `callback`; returns x_prev for the next step."""
        eps = self._cuda.download(self._eps, (x_shape[0], self.out_channels, *x_shape[2:]))
        check_finite(eps, k, t, self.name)
        x_prev = self._cuda.download(self._x[1 - d], x_shape)
        callback(StepInfo(k, t, x_host, eps, x_prev))
        return x_prev

    def close(self) -> None:
        """Free graphs, TensorRT objects, device buffers and the stream (idempotent)."""
        if self._cuda is None:
            return
        try:
            self._cuda.rt.cudaStreamSynchronize(self._cuda.stream)
            self._drop_graphs()
        finally:
            # the context's activation memory goes before the engine, the engine before its runtime
            self._context = self._engine = None
            self._runtime = None
            self._cuda.close()
            self._cuda = None
