"""An emulation of the CUDA runtime (`cuda.bindings.runtime`) on the CPU, for tests/test_device_emulation.py and the
conformance check against the real cuda-bindings (tests/test_tensorrt_conformance.py).

Device memory is a numpy heap with 256-byte aligned allocations that are never reused (so a read of freed memory is
caught, not silently served), a stream queues work and runs it at synchronization (so work really is asynchronous
to the host), stream capture records the enqueued operations with their addresses into a graph, and a launch replays
them. Synchronous calls during a capture invalidate it, as CUDA does. A bad access is a sticky error: every later
call fails, as on a GPU. `cudart_module` offers only the names the real module has.
"""

from __future__ import annotations

import ctypes
import enum
import types

import numpy as np

HEAP_BYTES = 64 << 20
DEVICE_BASE = 0x7E0000000000  # fake device addresses: never valid host addresses, never dereferenced as such


class UndefinedReplay(AssertionError):
    """A graph captured from a TensorRT context was launched after that context's addresses or shapes changed."""


class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorIllegalAddress = 700
    cudaErrorStreamCaptureUnsupported = 900
    cudaErrorStreamCaptureInvalidated = 901


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3


class cudaStreamCaptureMode(enum.IntEnum):
    cudaStreamCaptureModeGlobal = 0
    cudaStreamCaptureModeThreadLocal = 1


class Graph:
    def __init__(self):
        self.ops: list = []
        self.invalid = False


class FakeCudart:
    """The subset of cuda.bindings.runtime that runtime.cuda uses, over a numpy heap."""

    cudaError_t, cudaMemcpyKind, cudaStreamCaptureMode = cudaError_t, cudaMemcpyKind, cudaStreamCaptureMode
    cudaStreamNonBlocking = 1

    def __init__(self, strict_replay: bool = True):
        self.trt = None  # the emulated tensorrt module over this heap (emulated_tensorrt)
        self.heap = np.zeros(HEAP_BYTES, np.uint8)
        self.live: dict[int, int] = {}
        self.next = DEVICE_BASE
        self.pending: list = []
        self.capturing: dict[int, Graph] = {}
        self.streams = 0
        self.sticky = None
        self.faults: list[str] = []
        self.instantiated = self.launches = 0
        self.strict_replay = strict_replay

    @property
    def engine(self):
        """The engine deserialized last on this device (tests look at its contexts)."""
        return getattr(self.trt, "_engine", None)

    # -- memory -------------------------------------------------------------------------------------------------
    def view(self, ptr: int, nbytes: int) -> np.ndarray:
        """The heap bytes [ptr, ptr + nbytes), which must lie in one live allocation."""
        for base, size in self.live.items():
            if base <= ptr and ptr + nbytes <= base + size:
                return self.heap[ptr - DEVICE_BASE: ptr - DEVICE_BASE + nbytes]
        raise MemoryError(f"access to {nbytes} bytes at {ptr:#x} outside every live allocation")

    def _run(self, op) -> None:
        if self.sticky is not None:
            return
        try:
            op[-1]()
        except MemoryError as e:  # what a GPU reports as cudaErrorIllegalAddress, sticky
            self.faults.append(f"{op[0]}: {e}")
            self.sticky = cudaError_t.cudaErrorIllegalAddress

    def flush(self) -> None:
        ops, self.pending = self.pending, []
        for op in ops:
            self._run(op)

    def enqueue(self, stream: int, op: tuple) -> None:
        graph = self.capturing.get(int(stream))
        (graph.ops if graph is not None else self.pending).append(op)

    def _err(self, *values):
        return (self.sticky, *([None] * len(values))) if self.sticky is not None else (cudaError_t.cudaSuccess, *values)

    # -- the API ------------------------------------------------------------------------------------------------
    def cudaGetDeviceCount(self):
        return cudaError_t.cudaSuccess, 1

    def cudaGetDeviceProperties(self, device):
        return cudaError_t.cudaSuccess, types.SimpleNamespace(name=b"Emulated GPU", major=9, minor=0)

    def cudaSetDevice(self, device):
        return (cudaError_t.cudaSuccess,)

    def cudaGetErrorName(self, error):
        return cudaError_t.cudaSuccess, cudaError_t(error).name.encode()

    def cudaGetErrorString(self, error):
        return cudaError_t.cudaSuccess, f"emulated {cudaError_t(error).name}".encode()

    def cudaGetLastError(self):
        return (self.sticky or cudaError_t.cudaSuccess,)

    def cudaStreamCreateWithFlags(self, flags):
        self.streams += 1
        return self._err(self.streams)

    def cudaStreamDestroy(self, stream):
        self.flush()
        return (cudaError_t.cudaSuccess,)

    def cudaMalloc(self, size):
        ptr, self.next = self.next, self.next + -(-int(size) // 256) * 256  # never reused: frees stay caught
        assert self.next - DEVICE_BASE <= HEAP_BYTES, "emulated heap exhausted"
        self.live[ptr] = int(size)
        return self._err(ptr)

    def cudaFree(self, devPtr):
        self.flush()  # cudaFree waits for the device, as CUDA's does
        if self.live.pop(int(devPtr), None) is None:
            return (cudaError_t.cudaErrorInvalidValue,)
        return self._err()

    def cudaMemsetAsync(self, devPtr, value, count, stream):
        ptr, nbytes = int(devPtr), int(count)
        self.enqueue(stream, ("memset", ptr, nbytes, lambda: self.view(ptr, nbytes).fill(value)))
        return self._err()

    def _sync_call(self, stream) -> bool:
        """A call that waits for the host: during a capture it is unsupported and invalidates it."""
        graph = self.capturing.get(int(stream))
        if graph is not None:
            graph.invalid = True
            return False
        self.flush()
        return True

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        dst, src, nbytes = int(dst), int(src), int(count)
        if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
            if int(stream) in self.capturing:  # pageable host memory cannot be captured
                self.capturing[int(stream)].invalid = True
                return (cudaError_t.cudaErrorStreamCaptureUnsupported,)
            data = np.frombuffer(ctypes.string_at(src, nbytes), np.uint8)  # staged now: the host may reuse src
            self.enqueue(stream, ("h2d", dst, nbytes, lambda: self.view(dst, nbytes).__setitem__(slice(None), data)))
        elif kind == cudaMemcpyKind.cudaMemcpyDeviceToDevice:
            self.enqueue(stream, ("d2d", dst, src, nbytes,
                                  lambda: self.view(dst, nbytes).__setitem__(slice(None), self.view(src, nbytes))))
        else:  # device to pageable host memory: waits for the stream
            if not self._sync_call(stream):
                return (cudaError_t.cudaErrorStreamCaptureUnsupported,)
            if self.sticky is None:
                try:
                    ctypes.memmove(dst, self.view(src, nbytes).ctypes.data, nbytes)
                except MemoryError as e:
                    self.faults.append(f"d2h: {e}")
                    self.sticky = cudaError_t.cudaErrorIllegalAddress
        return self._err()

    def cudaStreamSynchronize(self, stream):
        if not self._sync_call(stream):
            return (cudaError_t.cudaErrorStreamCaptureUnsupported,)
        return self._err()

    def cudaStreamBeginCapture(self, stream, mode):
        self.capturing[int(stream)] = Graph()
        return self._err()

    def cudaStreamEndCapture(self, stream):
        graph = self.capturing.pop(int(stream))
        if graph.invalid:
            return cudaError_t.cudaErrorStreamCaptureInvalidated, None
        return self._err(graph)

    def cudaGraphInstantiate(self, graph, flags):
        self.instantiated += 1
        return self._err(graph)

    def cudaGraphLaunch(self, graphExec, stream):
        for op in graphExec.ops:
            check = op[1] if op[0] == "enqueueV3" else None
            if check is not None:
                check()
            self.enqueue(stream, op)
        self.launches += 1
        return self._err()

    def cudaGraphDestroy(self, graph):
        return (cudaError_t.cudaSuccess,)

    def cudaGraphExecDestroy(self, graphExec):
        return (cudaError_t.cudaSuccess,)


# the cudart names FakeCudart emulates: all that the code under test can reach (checked against the real
# cuda-bindings by tests/test_tensorrt_conformance.py)
CUDART_NAMES = frozenset(name for name in dir(FakeCudart) if name.startswith("cuda"))


def cudart_module(rt: FakeCudart) -> types.ModuleType:
    """What the code under test imports as `cuda.bindings.runtime`: FakeCudart's cudart names, read from `rt` when
    used (so a test that monkeypatches rt.cudaX is seen), and nothing else: the emulator's state (heap, faults, ...)
    is not an attribute the real module has, so code reaching for it fails here as it would on a GPU."""
    mod = types.ModuleType("cuda.bindings.runtime")

    def __getattr__(name):
        if name in CUDART_NAMES:
            return getattr(rt, name)
        raise AttributeError(f"module 'cuda.bindings.runtime' has no attribute {name!r}")

    mod.__getattr__ = __getattr__
    return mod
