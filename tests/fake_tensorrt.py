"""A stand-in `tensorrt` module: the part of TensorRT's Python API that runtime.backends.tensorrt_backend uses, with
the engine's work supplied by the caller. One module for both places that need it:
- tests/test_device_emulation.py, on the CPU: the engine is the fused-step ONNX run by onnxruntime over an emulated
  CUDA heap (its FakeCudart);
- benchmarks/gpu_check.py, on a real GPU without TensorRT: the engine is a CUDA kernel of the fused step launched
  on the backend's stream (and so captured into its CUDA graph).

`fake_tensorrt(version, open_engine, max_batch, capturing)` returns the module. `open_engine(data)` turns the bytes
of an engine file into an object with `inputs` and `outputs` ({name: dims}, -1 on the dynamic batch axis) and
`enqueue(stream, addrs, shapes, context)`, which queues one step reading and writing the bound addresses.

Rules kept as TensorRT keeps them: setTensorAddress refuses an address that is not 256-byte aligned
(NvInferRuntime.h) and logs why; set_input_shape refuses a batch outside the one optimization profile (1..max, opt
= max, as `ddpm-deploy build` makes it); execute_async_v3 fails unless every IO tensor has an address and every
input a shape; the first enqueue after a shape change cannot be captured into a CUDA graph (TensorRT's lazy setup)
where `capturing(stream)` can tell that a capture is under way. Every IO tensor is float32.

Only what the real binding has is public: classes carry TensorRT's names (ICudaEngine, IExecutionContext, ...),
methods its argument names, enums its members with the values of NvInferRuntimeBase.h / NvInferRuntime.h, so code
that reaches for a name TensorRT lacks fails here too (tests/test_tensorrt_conformance.py checks every public name
against the real bindings of each supported version). Emulator state lives under `_`-names: `trt._engine` (the
engine deserialized last), `trt._max_batch`, `engine._contexts`, `context._addrs`.
"""

from __future__ import annotations

import enum
import importlib.machinery
import types


def fake_tensorrt(version: str, open_engine, max_batch: int, capturing=lambda stream: False) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    trt.__version__ = version
    trt._max_batch = [int(max_batch)]  # the built profile's max; tests may change it before opening an engine

    class ILogger:
        class Severity(enum.IntEnum):
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self):
            pass

    trt.ILogger = ILogger
    trt.TensorIOMode = enum.IntEnum("TensorIOMode", "NONE INPUT OUTPUT", start=0)
    trt.DataType = enum.IntEnum("DataType", "FLOAT HALF", start=0)
    trt._engine = None

    class IExecutionContext:
        def __init__(self, engine):
            self.engine, self._addrs, self._shapes, self._fresh_shapes = engine, {}, {}, True
            self._enqueues = 0

        def set_input_shape(self, name, shape):
            if not 1 <= shape[0] <= trt._max_batch[0]:
                return False
            if self._shapes.get(name) != tuple(shape):
                self._shapes[name], self._fresh_shapes = tuple(shape), True
            return True

        def set_tensor_address(self, name, memory):
            if int(memory) % 256:
                self.engine._logger.log(ILogger.Severity.ERROR, f"setTensorAddress: {name} is not 256-byte aligned")
                return False
            self._addrs[name] = int(memory)
            return True

        def execute_async_v3(self, stream_handle):
            engine = self.engine
            if set(self._addrs) != set(engine._names) or set(self._shapes) != set(engine._inputs):
                return False
            if capturing(stream_handle) and self._fresh_shapes:
                return False  # the first enqueue after a shape change does lazy work that cannot be captured
            self._fresh_shapes = False
            engine._work.enqueue(stream_handle, dict(self._addrs), dict(self._shapes), self)
            self._enqueues += 1
            return True

    class ICudaEngine:
        def __init__(self, work, logger):
            self._work, self._logger = work, logger
            self._inputs, self._outputs = list(work.inputs), list(work.outputs)
            self._names = self._inputs + self._outputs
            self._contexts = []

        @property
        def num_io_tensors(self):
            return len(self._names)

        def get_tensor_name(self, index):
            return self._names[index]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name in self._inputs else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return trt.DataType.FLOAT

        def get_tensor_shape(self, name):
            """The IO dims as TensorRT gives them: -1 on the dynamic batch axis."""
            return tuple({**self._work.inputs, **self._work.outputs}[name])

        def get_tensor_profile_shape(self, name, profile_index):
            """[min, opt, max] of an input in its one optimization profile: batch 1..max, opt = max (as built)."""
            assert profile_index == 0 and name in self._inputs, (name, profile_index)
            dims = self.get_tensor_shape(name)
            return [tuple(b if d == -1 else d for d in dims) for b in (1, trt._max_batch[0], trt._max_batch[0])]

        def create_execution_context(self):
            self._contexts.append(IExecutionContext(self))
            return self._contexts[-1]

    class Runtime:
        def __init__(self, logger):
            self._logger = logger

        def deserialize_cuda_engine(self, serialized_engine):
            trt._engine = ICudaEngine(open_engine(bytes(serialized_engine)), self._logger)
            return trt._engine

    trt.Runtime = Runtime
    return trt
