"""onnxruntime backend: CPU by default; CUDA / TensorRT execution providers from onnxruntime-gpu.

onnxruntime itself is imported when a backend is constructed (the runtime package imports every backend module)."""

from __future__ import annotations

import os
import tempfile

import numpy as np

from ... import fused_io
from ...errors import UserError, first_line
from ...fused_io import input_shapes
from ...graph.fused import fused_model
from ...graph.rewrite import save_for_cpu
from ...loop.run import Backend
from ...artifact.manifest import Manifest, load_onnx
from ..cuda import onnxruntime_gpu_problem
from ..cpu_steps import HostFusedSteps, cpu_steps
from .onnxruntime_iobinding import FusedIOBindingChain, fused_model_bytes

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
# The CUDA provider's use_tf32 defaults to true (cuda_execution_provider_info.h: "By default, enable TF32"): TF32
# has fp16's 10-bit mantissa, so fp32 tolerances would not hold, and neither would the fp32 islands the fp16 audit
# kept for precision. Off for every model.
CUDA_OPTIONS = {"use_tf32": "0"}


def _provider_list(device: str, manifest: Manifest, cache_dir: str | None) -> list:
    if device not in PROVIDERS:
        raise UserError(f"unknown device {device!r}: choose cpu, cuda or tensorrt")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    cuda = ("CUDAExecutionProvider", dict(CUDA_OPTIONS))
    if device == "cuda":
        return [cuda, "CPUExecutionProvider"]
    # the GPU providers run the fused step graph: every input gets a profile over the batch range
    shapes = lambda n: ",".join(f"{k}:{'x'.join(map(str, v))}" for k, v in input_shapes(manifest, n).items())  # noqa: E731
    # No trt_fp16_enable: it makes the provider's network weakly typed (strongly typed only when fp16/int8 are off),
    # so TensorRT could run the nodes an fp16 ONNX keeps in fp32 in fp16; the ONNX's own types say what is fp16.
    trt_opts = {"trt_engine_cache_enable": True, "trt_engine_cache_path": trt_cache_folder(manifest, cache_dir),
                "trt_timing_cache_enable": True,
                "trt_profile_min_shapes": shapes(manifest.min_batch),
                "trt_profile_opt_shapes": shapes(manifest.max_batch), "trt_profile_max_shapes": shapes(manifest.max_batch)}
    return [("TensorrtExecutionProvider", trt_opts), cuda, "CPUExecutionProvider"]


def trt_cache_folder(manifest: Manifest, cache_dir: str | None) -> str:
    """Where the TensorRT provider keeps its engines: a folder per model (weights, dtype) and fused-step interface.
    The provider does not notice a changed model (its docs: cache files "must be invalidated if there are any changes
    to the model"), so another model of the same architecture, or a fused graph whose coefficient layout changed,
    would otherwise run a stale engine."""
    tag = f"{manifest.source_sha256[:16] or 'model'}-{manifest.dtype}-fused-v{fused_io.FUSED_INTERFACE_VERSION}"
    return os.path.join(cache_dir or ".ddpm_deploy_trt_cache", tag)


class OnnxRuntimeBackend(Backend):
    """Every device runs the fused step graph (eps_theta + the sampler update, ddpm_deploy.graph.fused): on the CPU
    with IO binding to host buffers (runtime.cpu_steps), on a GPU device-resident (onnxruntime_iobinding).
    `cpu_rewrites=False` loads the graph without the CPU rewrite (on by default because it measured faster at
    every batch; see ddpm_deploy.graph.rewrite); `fused_step=False` keeps the numpy host loop on the CPU (for
    comparisons; fp16 files always use it, see runtime.cpu_steps)."""

    def __init__(self, path: str, device: str = "cpu", threads: int | None = None, cache_dir: str | None = None,
                 cpu_rewrites: bool = True, fused_step: bool = True):
        import onnxruntime as ort

        super().__init__()
        model_proto, self.manifest = load_onnx(path)  # parsed once: manifest here, CPU rewrite below
        self.path, self.device = str(path), device
        self.name = f"onnxruntime-{device}"
        self.max_batch = self.manifest.max_batch
        wanted = PROVIDERS.get(device)
        if wanted is None:
            raise UserError(f"unknown device {device!r}: choose cpu, cuda or tensorrt")
        if device != "cpu":
            problem = onnxruntime_gpu_problem()
            if problem:
                raise UserError(problem)
        if wanted not in ort.get_available_providers():
            raise UserError(f"--device {device} needs onnxruntime's {wanted}, which this install lacks "
                            f"(has {', '.join(ort.get_available_providers())}): pip install onnxruntime-gpu")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or 0  # 0: onnxruntime's default (one per physical core)
        opts.log_severity_level = 3
        try:
            with tempfile.TemporaryDirectory(prefix="ddpm_deploy_ort_") as tmp:
                if device == "cpu":
                    # a file rather than bytes: given bytes, onnxruntime kept ~130 MB more resident (CIFAR-size UNet)
                    fused = fused_model(model_proto, self.manifest, os.path.dirname(os.path.abspath(path)))
                    model = save_for_cpu(fused, tmp, cpu_rewrites)[0]
                else:  # GPU: the fused step graph, so x_t stays on the device between steps
                    model = fused_model_bytes(self.path, self.manifest)
                self.session = ort.InferenceSession(model, sess_options=opts,
                                                    providers=_provider_list(device, self.manifest, cache_dir))
        except Exception as e:
            raise UserError(f"onnxruntime cannot load {path}: {first_line(e)}") from None
        active = self.session.get_providers()[0]
        if active != wanted:  # onnxruntime falls back to CPU silently when a provider fails to load
            raise UserError(f"onnxruntime fell back to {active} instead of {wanted} (CUDA/TensorRT libraries not "
                            "loadable); fix the GPU install or use --device cpu")
        self._cpu = None
        if device == "cpu":
            self._cpu = HostFusedSteps(self.manifest, self.name, self._bind)
            self.steps = cpu_steps(self._cpu, fused_step)
        else:
            self.steps = FusedIOBindingChain(self.session, self.manifest, "cuda", name=self.name)
        self.fused_loop = device != "cpu" or self.steps is self._cpu  # else the numpy host loop (fp16 files)

    def _bind(self, batch: int, buffers: dict):
        """cpu_steps' Binder: one IO binding per batch size onto `buffers`' memory."""
        binding = self.session.io_binding()
        outputs = {o.name for o in self.session.get_outputs()}
        for name, a in buffers.items():
            bind = binding.bind_output if name in outputs else binding.bind_input
            bind(name, "cpu", 0, np.float32, list(a.shape), a.ctypes.data)
        return lambda: self.session.run_with_iobinding(binding)

    def close(self) -> None:
        super().close()
        if self._cpu is not None:
            self._cpu.close()
        self.session = None
