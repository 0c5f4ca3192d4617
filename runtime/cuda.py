"""CUDA without torch: is there TensorRT and a GPU, and device buffers / one stream / CUDA graphs through
cuda-python's runtime bindings (`from cuda.bindings import runtime`, cuda-bindings >= 12.6; every call returns
`(err, *values)`). This module is also the project's GPU probe (`cuda_gpu_present`), used by the tests' `gpu`
marker, so a CPU-only torch on a GPU machine does not hide the GPU tests.

The availability checks run before anything heavy is imported or any file is written, and each failure is a
one-line UserError: with no GPU or driver, `trt.Builder`/`trt.Runtime` raise or can abort the process.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess

import numpy as np

from ..errors import UserError, first_line

# cudaMalloc returns addresses aligned to at least 256 bytes; TensorRT's setTensorAddress requires that much
# (NvInferRuntime.h: "The pointer must have at least 256-byte alignment"), so buffers and table rows keep it.
DEVICE_ALIGN = 256

TENSORRT_HELP = ("pip install tensorrt-cu13 cuda-bindings (`pip install \"ddpm-deploy[gpu]\"`; [gpu-cu12] for CUDA 12 "
                 "drivers) on a machine with an NVIDIA GPU and driver, "
                 "or run the .onnx with onnxruntime instead (`ddpm-deploy run --engine MODEL.onnx`)")


def tensorrt_problem() -> str | None:
    """Why TensorRT cannot be used here, without importing it; None if it looks installed."""
    if importlib.util.find_spec("tensorrt") is None:
        return f"TensorRT is not installed: {TENSORRT_HELP}"
    return None


def import_tensorrt():
    """The tensorrt module; call only after `require_gpu` (its import can load CUDA libraries)."""
    problem = tensorrt_problem()
    if problem:
        raise UserError(problem)
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # wheel present but libnvinfer / CUDA libraries missing
        raise UserError(f"TensorRT is installed but cannot be loaded ({first_line(e)}): reinstall it with "
                        "`pip install --force-reinstall tensorrt` matching your CUDA driver") from None
    return trt


def import_cudart(required: bool = True):
    """cuda-python's runtime module, or None when it is missing and not `required`."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        if not required:
            return None
        raise UserError("cuda-python (cuda-bindings) is not installed (the TensorRT backend keeps its buffers on the GPU "
                        "with it): pip install \"cuda-bindings>=13,<14\" (\">=12.6,<13\" for a CUDA 12 driver)") from None
    return cudart


def require_gpu(device: int = 0) -> dict:
    """{"name", "compute_capability": "9.0"} of CUDA device `device`, or a one-line UserError naming what is missing.

    Uses cuda-python when installed (it sees what the CUDA runtime sees, CUDA_VISIBLE_DEVICES included), else
    `nvidia-smi`."""
    cudart = import_cudart(required=False)
    return _gpu_from_cudart(cudart, device) if cudart is not None else _gpu_from_nvidia_smi(device)


def _no_gpu(detail: str) -> UserError:
    return UserError(f"no usable CUDA GPU ({detail}): TensorRT needs an NVIDIA GPU with its driver; run on a GPU "
                     "machine, or sample from the .onnx with onnxruntime (`ddpm-deploy run --engine MODEL.onnx`)")


def _gpu_from_cudart(cudart, device: int) -> dict:
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess:
        # e.g. cudaErrorNoDevice, or cudaErrorInsufficientDriver: a driver older than this cuda-bindings' CUDA
        raise _no_gpu(f"cudaGetDeviceCount: {error_string(cudart, err)}")
    if not 0 <= device < count:
        raise _no_gpu(f"CUDA device {device} requested, {count} visible")
    err, prop = cudart.cudaGetDeviceProperties(device)
    if err != cudart.cudaError_t.cudaSuccess:
        raise _no_gpu(f"cudaGetDeviceProperties: {error_string(cudart, err)}")
    name = prop.name.decode(errors="replace").rstrip("\x00") if isinstance(prop.name, bytes) else str(prop.name)
    return {"name": name, "compute_capability": f"{prop.major}.{prop.minor}"}


def _gpu_from_nvidia_smi(device: int) -> dict:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise _no_gpu("cuda-python is not installed and nvidia-smi is not on PATH")
    # nvidia-smi ignores CUDA_VISIBLE_DEVICES: map our index through it (it may hold indices or UUIDs)
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if visible and device >= len(visible):
        raise _no_gpu(f"CUDA device {device} requested, CUDA_VISIBLE_DEVICES has {len(visible)}")
    select = visible[device] if visible else str(device)
    try:
        r = subprocess.run([exe, "--query-gpu=name,compute_cap", "--format=csv,noheader", "-i", select],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise _no_gpu(f"nvidia-smi failed: {first_line(e)}") from None
    line = r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else ""
    if "," not in line:
        raise _no_gpu(f"nvidia-smi: {first_line(r.stderr or r.stdout) or 'no GPU listed'}")
    name, cc = (s.strip() for s in line.rsplit(",", 1))
    return {"name": name, "compute_capability": cc}


def cuda_gpu_present(device: int = 0) -> bool:
    """Whether a CUDA GPU is usable here (the probe `require_gpu` uses: cuda-bindings, else nvidia-smi)."""
    try:
        require_gpu(device)
    except UserError:
        return False
    return True


def onnxruntime_gpu_problem() -> str | None:
    """Why onnxruntime's CUDA/TensorRT providers cannot be trusted in this environment, or None.

    `onnxruntime` and `onnxruntime-gpu` install the same `onnxruntime` package; with both present the files of
    whichever was installed last win (microsoft/onnxruntime issue 26996: no CUDA provider). `pip install
    ddpm-deploy[gpu]` installs both (the base needs onnxruntime), so this is refused with the fix."""
    import importlib.metadata as md

    have = {}
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            have[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    if len(have) == 2:
        return (f"onnxruntime {have['onnxruntime']} and onnxruntime-gpu {have['onnxruntime-gpu']} are both installed "
                "and overwrite each other's `onnxruntime` module: run `pip uninstall -y onnxruntime onnxruntime-gpu "
                "&& pip install onnxruntime-gpu`")
    return None


def error_string(cudart, err) -> str:
    _, name = cudart.cudaGetErrorName(err)
    _, text = cudart.cudaGetErrorString(err)
    return f"{name.decode()}: {text.decode()}"


class CudaDevice:
    """One device, one non-blocking stream, and the buffers allocated through it (freed by `close`).

    Pointers are plain ints. Uploads are async on the stream (from pageable memory the driver stages the data
    before returning, so the host array may be dropped afterwards); downloads synchronize the stream."""

    def __init__(self, device: int = 0, cudart=None):
        self.rt = cudart if cudart is not None else import_cudart()
        self.device = device
        self.graphs_captured = 0  # CUDA graphs instantiated (a failed capture falls back, and does not count)
        self.capture_failures = 0
        self.call("cudaSetDevice", device)
        self.stream = self.call("cudaStreamCreateWithFlags", self.rt.cudaStreamNonBlocking)
        self._buffers: dict[int, int] = {}

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def call(self, fn: str, *args):
        """cudart.fn(*args) with its error turned into a UserError; returns the value(s) after err."""
        err, *values = getattr(self.rt, fn)(*args)
        if err != self.rt.cudaError_t.cudaSuccess:
            raise UserError(f"CUDA {fn} failed: {error_string(self.rt, err)}")
        return values[0] if len(values) == 1 else (tuple(values) or None)

    def malloc(self, nbytes: int, zero: bool = True) -> int:
        ptr = int(self.call("cudaMalloc", max(int(nbytes), 1)))
        assert ptr % DEVICE_ALIGN == 0, f"cudaMalloc returned {ptr:#x}, not {DEVICE_ALIGN}-byte aligned"
        self._buffers[ptr] = int(nbytes)
        if zero:
            self.call("cudaMemsetAsync", ptr, 0, max(int(nbytes), 1), self.stream)
        return ptr

    def free(self, ptr: int) -> None:
        if self._buffers.pop(ptr, None) is not None:
            self.call("cudaFree", ptr)

    def upload(self, dst: int, array: np.ndarray) -> None:
        a = np.ascontiguousarray(array)
        self.call("cudaMemcpyAsync", dst, a.ctypes.data, a.nbytes,
                  self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream)

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        self.call("cudaMemcpyAsync", dst, src, int(nbytes), self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice,
                  self.stream)

    def memset(self, dst: int, nbytes: int) -> None:
        self.call("cudaMemsetAsync", dst, 0, int(nbytes), self.stream)

    def download(self, src: int, shape: tuple, dtype=np.float32) -> np.ndarray:
        out = np.empty(shape, dtype=dtype)
        self.call("cudaMemcpyAsync", out.ctypes.data, src, out.nbytes,
                  self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream)
        self.sync()
        return out

    def sync(self) -> None:
        self.call("cudaStreamSynchronize", self.stream)

    def capture(self, enqueue) -> tuple | None:
        """A CUDA graph of what `enqueue()` puts on the stream: (graph, exec), or None when the work cannot be
        captured (then the caller enqueues directly). Call `enqueue` once before (warm-up) so lazy work is done."""
        rt = self.rt
        self.call("cudaStreamBeginCapture", self.stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
        ok = False
        try:
            ok = bool(enqueue())
        finally:
            err, graph = rt.cudaStreamEndCapture(self.stream)  # always end it, or the stream stays unusable
        if err != rt.cudaError_t.cudaSuccess or not ok:
            if graph is not None and int(graph):
                rt.cudaGraphDestroy(graph)
            rt.cudaGetLastError()  # clear the capture error so later calls do not see it
            self.capture_failures += 1
            return None
        err, graph_exec = rt.cudaGraphInstantiate(graph, 0)
        if err != rt.cudaError_t.cudaSuccess:
            rt.cudaGraphDestroy(graph)
            rt.cudaGetLastError()
            self.capture_failures += 1
            return None
        self.graphs_captured += 1
        return graph, graph_exec

    def launch(self, graph: tuple) -> None:
        self.call("cudaGraphLaunch", graph[1], self.stream)

    def destroy_graph(self, graph: tuple, quiet: bool = False) -> None:
        """Destroy a captured graph; `quiet`: both releases are tried and errors ignored (closing after a failure)."""
        for fn, handle in (("cudaGraphExecDestroy", graph[1]), ("cudaGraphDestroy", graph[0])):
            if quiet:
                getattr(self.rt, fn)(handle)
            else:
                self.call(fn, handle)

    def close(self, quiet: bool = False) -> None:
        """Free every buffer and the stream (idempotent). Every release is tried even after one fails (a sticky
        CUDA error fails them all); the first failure is raised at the end unless `quiet` (cleaning up after
        another error, which must stay the one reported)."""
        if self.stream is None:
            return
        rt, errors = self.rt, []
        for fn, args in [("cudaStreamSynchronize", (self.stream,))] + [("cudaFree", (p,)) for p in self._buffers]:
            err = getattr(rt, fn)(*args)[0]
            if err != rt.cudaError_t.cudaSuccess:
                errors.append(f"CUDA {fn} failed: {error_string(rt, err)}")
        self._buffers = {}
        rt.cudaStreamDestroy(self.stream)
        self.stream = None
        if errors and not quiet:
            raise UserError(errors[0])
