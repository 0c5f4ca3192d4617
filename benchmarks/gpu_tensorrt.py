"""TensorRT on a GPU: fp32 and fp16 engines of the fused reverse step against the PyTorch reference, in ms/step.
(The device loop's CUDA plumbing without TensorRT is benchmarks/gpu_check.py.)

    python benchmarks/gpu_tensorrt.py                          # shipped digits model (else preset small, random)
    python benchmarks/gpu_tensorrt.py --random cifar10 --batch 16
    python benchmarks/gpu_tensorrt.py --checkpoint model.pt --onnx model.onnx --onnx-fp16 model.fp16.onnx

On a machine with a CUDA GPU:
  * reference: the checkpoint in PyTorch on CUDA (TF32 off, so it is an fp32 reference), DDIM with --steps steps
    from seeded noise, and its ms/step (host loop: one eps call per step);
  * onnxruntime: the fp16 ONNX on the CPU provider from the same noise (its numerics without TensorRT), and
    with onnxruntime-gpu the fused graph on the CUDA provider with IO binding (`FusedIOBindingChain`);
  * with TensorRT: build fp32 and fp16 engines (timing cache in --work), run the chain from the same noise
    with and without CUDA graphs: PSNR of x_0 against the reference, max|Δeps| at t = 0, T/2, T-1, ms/step.
Timings: warm-up, then the median of --reps whole chains; each chain ends with its one host sync.
Without a GPU it prints one line and exits 0. Exits 1 when a PSNR is under the verify tolerance.
Writes OUT/gpu_tensorrt.json and .md (OUT: benchmarks/results, --out) and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

from common import OUT, checkpoint_for, exported, log, versions, write_outputs
from ddpm_deploy.bench import median_ms
from ddpm_deploy.images import psnr as psnr_db  # images in [-1, 1], clipped


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="model.pt / diffusers folder (default: shipped digits)")
    p.add_argument("--random", choices=("cifar10", "small"), default=None, help="a preset with random weights")
    p.add_argument("--onnx", default=None, help="use this fp32 ONNX instead of exporting one")
    p.add_argument("--onnx-fp16", default=None, help="use this fp16 ONNX instead of exporting one")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of every chain")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="keep exports, engines and the timing cache here")
    p.add_argument("--out", type=Path, default=OUT, help="writes OUT/gpu_tensorrt.json and .md")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- model

def model_spec(args, work: Path) -> str:
    """The checkpoint to measure: --checkpoint, a preset with random weights (--random), else the shipped model."""
    if args.checkpoint:
        return args.checkpoint
    return checkpoint_for(args.random or "shipped", work)[0]


def onnx_for(spec: str, given: str | None, fp16: bool, batch: int, work: Path) -> str:
    return given or exported(spec, work / f"model{'.fp16' if fp16 else ''}.onnx", fp16, max_batch=batch)


# ---------------------------------------------------------------------------------------------- parts

def chain_row(name: str, backend, plan, noise_for, ref_x0, reps, warmup, ref_backend=None, tol=None) -> dict:
    """Numerics (x_0 PSNR vs the reference, eps at three t) and ms/step of whole chains on one backend."""
    x0 = backend.run_chain(noise_for(), plan)
    row = {"what": name} if ref_x0 is None else {"what": name, "psnr_db": psnr_db(x0, ref_x0)}
    if ref_backend is not None:
        row["eps_max_abs"] = eps_max_abs(backend, ref_backend)
    ms = median_ms(lambda: backend.run_chain(noise_for(), plan), warmup, reps)
    row["ms_per_step"] = ms / plan.steps
    if tol is not None:
        row["psnr_ok"] = bool(row["psnr_db"] >= tol)
    return row


def eps_max_abs(backend, ref_backend) -> float:
    T = backend.manifest.schedule.T
    c, h, w = backend.manifest.image_shape
    x = np.random.default_rng(1).standard_normal((1, c, h, w), dtype=np.float32)
    worst = 0.0
    for t in (0, T // 2, T - 1):
        tv = np.full((1,), t, np.float32)
        worst = max(worst, float(np.abs(backend.eps(x, tv)[:, :c] - ref_backend.eps(x, tv)[:, :c]).max()))
    return worst


def run(args) -> dict:
    import torch

    from ddpm_deploy.runtime import load
    from ddpm_deploy.sampling.noise import ChunkNoise
    from ddpm_deploy.tolerances import VERIFY_FP32_X0_MIN_PSNR_DB, VERIFY_REDUCED_X0_MIN_PSNR_DB

    torch.backends.cuda.matmul.allow_tf32 = False  # an fp32 reference, not TF32
    torch.backends.cudnn.allow_tf32 = False
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_tensorrt_"))
    work.mkdir(parents=True, exist_ok=True)
    spec = model_spec(args, work)
    onnx32 = onnx_for(spec, args.onnx, False, args.batch, work)
    onnx16 = onnx_for(spec, args.onnx_fp16, True, args.batch, work)
    libraries = versions("torch", "onnxruntime", "onnxruntime-gpu", "tensorrt", "cuda-bindings", "cuda-python")
    report = {"versions": {"python": platform.python_version(), **libraries}, "model": spec, "batch": args.batch,
              "steps": args.steps, "rows": []}
    rows = report["rows"]
    ref_device = "cuda" if torch.cuda.is_available() else "cpu"  # a CPU-only torch on a GPU box still gives figures
    with load(spec, device=ref_device, backend="torch", max_batch=args.batch) as ref:
        plan = ref.plan("ddim", args.steps, 0.0)
        noise_for = lambda: ChunkNoise(ref.image_shape, 0, args.batch, seed=args.seed)  # noqa: E731
        ref_x0 = ref.backend.run_chain(noise_for(), plan)
        rows.append(chain_row(f"torch-{ref_device} fp32 (reference)", ref.backend, plan, noise_for, None, args.reps,
                              args.warmup))
        with load(onnx16, threads=None) as cpu16:
            x0 = cpu16.backend.run_chain(noise_for(), plan)
            rows.append({"what": "onnxruntime-cpu fp16 (numerics)", "psnr_db": psnr_db(x0, ref_x0),
                         "eps_max_abs": eps_max_abs(cpu16.backend, ref.backend),
                         "psnr_ok": bool(psnr_db(x0, ref_x0) >= VERIFY_REDUCED_X0_MIN_PSNR_DB)})
        for path, tol, label in ((onnx32, VERIFY_FP32_X0_MIN_PSNR_DB, "fp32"),
                                 (onnx16, VERIFY_REDUCED_X0_MIN_PSNR_DB, "fp16")):
            rows.extend(ort_cuda_rows(path, label, plan, noise_for, ref_x0, ref.backend, tol, args))
            rows.extend(tensorrt_rows(path, label, plan, noise_for, ref_x0, ref.backend, tol, args, work))
    return report


def ort_cuda_rows(path, label, plan, noise_for, ref_x0, ref_backend, tol, args) -> list:
    import onnxruntime as ort

    from ddpm_deploy.artifact.manifest import Manifest
    from ddpm_deploy.runtime.backends.onnxruntime_iobinding import FusedIOBindingChain, fused_model_bytes

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return [{"what": f"onnxruntime-cuda {label}", "skipped": "onnxruntime-gpu not installed"}]
    manifest = Manifest.read(path)
    sess = ort.InferenceSession(fused_model_bytes(path, manifest), providers=["CUDAExecutionProvider"])
    if sess.get_providers()[0] != "CUDAExecutionProvider":
        return [{"what": f"onnxruntime-cuda {label}", "skipped": f"fell back to {sess.get_providers()[0]}"}]
    chain = FusedIOBindingChain(sess, manifest, device="cuda", name=f"onnxruntime-cuda-{label}")
    return [chain_row(f"onnxruntime-cuda {label} (fused, IO binding)", chain, plan, noise_for, ref_x0, args.reps,
                      args.warmup, ref_backend, tol)]


def tensorrt_rows(path, label, plan, noise_for, ref_x0, ref_backend, tol, args, work: Path) -> list:
    from ddpm_deploy.errors import UserError
    from ddpm_deploy.runtime import engine_from_onnx
    from ddpm_deploy.runtime.backends.tensorrt_backend import TensorRTBackend
    from ddpm_deploy.runtime.cuda import tensorrt_problem

    if tensorrt_problem():
        return [{"what": f"tensorrt {label}", "skipped": "TensorRT not installed"}]
    try:
        r = engine_from_onnx(path, work / f"model-{label}.trt", max_batch=args.batch,
                             timing_cache=work / "timing.cache", echo=log)
        rows = []
        for graph in (True, False):
            with TensorRTBackend(r["path"], cuda_graph=graph) as be:
                row = chain_row(f"tensorrt {label} ({'CUDA graph' if graph else 'enqueue per step'})", be, plan,
                                noise_for, ref_x0, args.reps, args.warmup, ref_backend, tol)
                row["build_s"] = r["seconds"]
                rows.append(row)
        return rows
    except UserError as e:
        return [{"what": f"tensorrt {label}", "error": str(e)}]


def markdown(report: dict) -> str:
    lines = ["| what | ms/step | PSNR vs torch (dB) | max abs Δeps | note |", "|---|---:|---:|---:|---|"]
    def f(r, k, fmt):
        return format(r[k], fmt) if isinstance(r.get(k), float) else "–"

    for r in report["rows"]:
        note = r.get("skipped") or r.get("error") or ("" if r.get("psnr_ok", True) else "BELOW TOLERANCE")
        lines.append(f"| {r['what']} | {f(r, 'ms_per_step', '.3f')} | {f(r, 'psnr_db', '.1f')} | "
                     f"{f(r, 'eps_max_abs', '.2e')} | {note} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from ddpm_deploy.errors import UserError
    from ddpm_deploy.runtime.cuda import require_gpu

    try:
        gpu = require_gpu()
    except UserError as e:
        print(f"gpu_tensorrt: nothing to measure: {e}")
        return 0
    report = {"gpu": gpu, **run(args)}
    write_outputs(report, args.out, "gpu_tensorrt", markdown(report))
    return 1 if any(r.get("psnr_ok") is False for r in report["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
