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
    trt.TensorIOMode = enum.IntEnum("TensorIOMode", "NONE INPUT OUTPUT")
    trt.DataType = enum.IntEnum("DataType", "FLOAT HALF")

    class Context:
        def __init__(self, engine):
            self.engine, self.addrs, self.shapes, self.fresh_shapes = engine, {}, {}, True
            self.enqueues = 0

        def set_input_shape(self, name, shape):
            if not 1 <= shape[0] <= trt._max_batch[0]:
                return False
            if self.shapes.get(name) != tuple(shape):
                self.shapes[name], self.fresh_shapes = tuple(shape), True
            return True

        def set_tensor_address(self, name, ptr):
            if int(ptr) % 256:
                self.engine.logger.log(ILogger.Severity.ERROR, f"setTensorAddress: {name} is not 256-byte aligned")
                return False
            self.addrs[name] = int(ptr)
            return True

        def execute_async_v3(self, stream):
            if set(self.addrs) != set(self.engine.names) or set(self.shapes) != set(self.engine.inputs):
                return False
            if capturing(stream) and self.fresh_shapes:
                return False  # the first enqueue after a shape change does lazy work that cannot be captured
            self.fresh_shapes = False
            self.engine.work.enqueue(stream, dict(self.addrs), dict(self.shapes), self)
            self.enqueues += 1
            return True

    class Engine:
        def __init__(self, work, logger):
            self.work, self.logger = work, logger
            self.inputs, self.outputs = list(work.inputs), list(work.outputs)
            self.names = self.inputs + self.outputs
            self.num_io_tensors = len(self.names)
            self.contexts = []

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name in self.inputs else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return trt.DataType.FLOAT

        def get_tensor_shape(self, name):
            """The IO dims as TensorRT gives them: -1 on the dynamic batch axis."""
            return tuple({**self.work.inputs, **self.work.outputs}[name])

        def get_tensor_profile_shape(self, name, profile_index):
            """[min, opt, max] of an input in its one optimization profile: batch 1..max, opt = max (as built)."""
            assert profile_index == 0 and name in self.inputs, (name, profile_index)
            dims = self.get_tensor_shape(name)
            return [tuple(b if d == -1 else d for d in dims) for b in (1, trt._max_batch[0], trt._max_batch[0])]

        def create_execution_context(self):
            self.contexts.append(Context(self))
            return self.contexts[-1]

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data):
            trt.engine = Engine(open_engine(bytes(data)), self.logger)
            return trt.engine

    trt.Runtime = Runtime
    return trt
