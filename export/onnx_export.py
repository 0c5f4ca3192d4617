"""torch -> ONNX for eps_theta(x_t, t), with a manifest and a parity check before the file is accepted.

Choices:
- `t` is a float32 (B,) input: diffusers' timestep embedding casts t to float anyway; TensorRT handles
  int64 poorly (it narrows to int32 with warnings) and a float input keeps the graph's IO one dtype.
- Default opset 21: native GroupNormalization (per-channel scale/bias since 21), which TensorRT maps to its
  normalization layer and onnxruntime to one kernel, instead of the InstanceNorm+reshape decomposition
  older opsets need (a known fp16 overflow site).
- The dynamo exporter (torch.export) with a dynamic batch axis 1..max_batch.
"""
# torch (the torch extra), onnx (1.1 s to import), onnxruntime and tqdm are imported by the functions that use them.

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError, first_line
from ..files import check_output_path, write_bytes_atomic
from ..artifact.manifest import Manifest, set_onnx_manifest
from ..nn import Checkpoint, load_checkpoint
from ..tolerances import EXPORT_FP16_MAX_ABS, EXPORT_FP16_MEAN_ABS, EXPORT_FP32_MAX_ABS, EXPORT_FP32_MEAN_ABS
from .fp16 import fp16_from_fp32

DEFAULT_OPSET = 21
SUPPORTED_OPSETS = range(18, 24)  # the dynamo exporter starts at 18; onnxruntime 1.2x runs up to 23
INPUT_NAMES = ("x_t", "t")
OUTPUT_NAME = "eps"


@dataclass
class ParityRow:
    batch: int
    timesteps: list
    max_abs: float
    mean_abs: float

    def __str__(self) -> str:
        ts = ",".join(str(int(t)) for t in self.timesteps[:4]) + ("…" if len(self.timesteps) > 4 else "")
        return f"batch {self.batch:3d} t=[{ts}]: max|Δeps| {self.max_abs:.2e}  mean|Δeps| {self.mean_abs:.2e}"


def eps_module(unet):
    """nn.Module eps_theta(x_t, t) -> tensor (the UNet itself returns a dataclass), in eval mode."""
    import torch

    class Eps(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, x_t, t):
            return self.unet(x_t, t).sample

    return Eps(unet).eval()


class _NoTorchvisionNotes(logging.Filter):
    """The exporter's registry logs one warning per torchvision op it skips when torchvision is absent; our models
    use none of them, so those lines are noise. Every other warning still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "torchvision is not installed" not in record.getMessage()


@contextlib.contextmanager
def _quiet_exporter_registry():
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    note_filter = _NoTorchvisionNotes()
    logger.addFilter(note_filter)
    try:
        yield
    finally:
        logger.removeFilter(note_filter)


def _torch_to_onnx(ckpt: Checkpoint, module, max_batch: int, opset: int):
    """Export with a dynamic batch axis; returns the onnx ModelProto."""
    import onnx
    import torch

    c, s = ckpt.channels, ckpt.image_size
    example = (torch.zeros(2, c, s, s), torch.tensor([0.0, float(ckpt.schedule.T - 1)]))
    batch = torch.export.Dim("batch", min=1, max=max(2, max_batch))
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings(), _quiet_exporter_registry():
        warnings.simplefilter("ignore")
        path = os.path.join(d, "eps.onnx")
        try:
            torch.onnx.export(module, example, path, input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                              opset_version=opset, dynamo=True, external_data=False, verbose=False,
                              dynamic_shapes={"x_t": {0: batch}, "t": {0: batch}})
        except Exception as e:  # the exporter's own errors are long; keep the first line
            raise UserError(f"torch.onnx.export failed: {first_line(e, 300)}") from None
        return onnx.load(path)


def parity_inputs(ckpt_shape: tuple, T: int, max_batch: int, seed: int = 0):
    """(x_t, t) cases: batch 1 at t = 0, T//2, T-1, and batch max_batch over t spread across [0, T-1]."""
    rng = np.random.default_rng(seed)
    cases = [(1, [t]) for t in (0, T // 2, T - 1)]
    cases.append((max_batch, np.linspace(0, T - 1, max_batch).round().tolist()))
    for b, ts in cases:
        yield rng.standard_normal((b, *ckpt_shape), dtype=np.float32), np.asarray(ts, dtype=np.float32)


def check_parity(onnx_bytes: bytes, module, ckpt: Checkpoint, max_batch: int, fp16: bool,
                 echo=print) -> list[ParityRow]:
    """Run the ONNX on onnxruntime CPU and the torch module on the same inputs; raise if over tolerance."""
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    rows = []
    for x_t, t in parity_inputs((ckpt.channels, ckpt.image_size, ckpt.image_size), ckpt.schedule.T, max_batch):
        got = sess.run([OUTPUT_NAME], {"x_t": x_t, "t": t})[0]
        with torch.no_grad():
            want = module(torch.from_numpy(x_t), torch.from_numpy(t)).numpy()
        if got.shape != want.shape:
            raise UserError(f"ONNX output shape {got.shape} != PyTorch {want.shape}; export is broken")
        err = np.abs(got.astype(np.float64) - want)
        rows.append(ParityRow(len(x_t), t.tolist(), float(np.nanmax(err)) if np.isfinite(got).all() else float("inf"),
                              float(np.mean(err))))
        echo("  parity " + str(rows[-1]))
    max_tol, mean_tol = ((EXPORT_FP16_MAX_ABS, EXPORT_FP16_MEAN_ABS) if fp16
                         else (EXPORT_FP32_MAX_ABS, EXPORT_FP32_MEAN_ABS))
    worst, mean = max(r.max_abs for r in rows), max(r.mean_abs for r in rows)
    ok = worst <= max_tol and mean <= mean_tol
    # the numbers alone say nothing to a reader who does not know the bounds: print them and the verdict
    echo(f"parity verdict: {'PASS' if ok else 'FAIL'} (ONNX {'fp16' if fp16 else 'fp32'} vs PyTorch: max|Δeps| "
         f"{worst:.2e} {'<=' if worst <= max_tol else '>'} {max_tol:g}, mean|Δeps| {mean:.2e} "
         f"{'<=' if mean <= mean_tol else '>'} {mean_tol:g}, tolerances.EXPORT_{'FP16' if fp16 else 'FP32'}_*)")
    if not ok:
        raise UserError(f"parity check failed: ONNX ({'fp16' if fp16 else 'fp32'}) differs from PyTorch by max "
                        f"{worst:.3g} (tolerance {max_tol:g}) / mean {mean:.3g} (tolerance {mean_tol:g}); no file "
                        "written (use --no-check to skip)")
    return rows


def default_output_path(spec: str, fp16: bool) -> Path:
    p = Path(spec)
    stem = p.stem if p.suffix == ".pt" else p.name.rstrip("/") or "model"
    return Path(f"{stem}{'.fp16' if fp16 else ''}.onnx")


def onnx_from_checkpoint(spec: str, out: str | Path | None = None, *, fp16: bool = False, max_batch: int = 16,
                         opset: int = DEFAULT_OPSET, check: bool = True, schedule_overrides: dict | None = None,
                         audit: bool = True, echo=print, progress: bool = False,
                         audit_sampler: dict | None = None) -> dict:
    """Export checkpoint `spec` to ONNX at `out`; returns {"path", "manifest", "parity", "seconds"}.
    `progress`: a tqdm bar over the stages on stderr. `audit_sampler`: the plan to be deployed (make_plan keyword
    arguments with "sampler"), whose trajectory the fp16 audit samples (default: a strided DDPM chain)."""
    if opset not in SUPPORTED_OPSETS:
        raise UserError(f"opset {opset} is not supported; use {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1} "
                        f"(default {DEFAULT_OPSET})")
    if not 1 <= max_batch <= 4096:
        raise UserError(f"--max-batch must be between 1 and 4096, got {max_batch}")
    out = Path(out) if out else default_output_path(spec, fp16)
    check_output_path(out)
    t0 = time.time()
    with _StageBar(progress, ["load", "torch.export to ONNX"] + (["fp16 and audit"] if fp16 else [])
                   + (["parity check"] if check else [])) as stage:
        ckpt = load_checkpoint(spec, schedule_overrides)
        unet = ckpt.build_unet()
        module = eps_module(unet)
        echo(f"exporting {spec} ({sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters, "
             f"{ckpt.channels}x{ckpt.image_size}x{ckpt.image_size}, opset {opset}, batch 1..{max_batch})")
        stage()
        model = _torch_to_onnx(ckpt, module, max_batch, opset)
        precision = None
        if fp16:
            stage()
            model, precision = fp16_from_fp32(model, ckpt=ckpt, audit=audit, echo=echo, audit_sampler=audit_sampler)
        manifest = Manifest.from_checkpoint(ckpt, max_batch=max_batch, dtype="float16" if fp16 else "float32",
                                            source=str(spec), opset=opset, precision=precision)
        set_onnx_manifest(model, manifest)
        data = model.SerializeToString()
        if check:
            stage()
        parity = check_parity(data, module, ckpt, max_batch, fp16, echo) if check else []
        if not check:
            echo("parity verdict: NOT CHECKED (--no-check): nothing compared this file with PyTorch")
    write_bytes_atomic(data, out)
    return {"path": str(out), "manifest": manifest, "parity": parity, "seconds": time.time() - t0}


class _StageBar:
    """A tqdm bar over named stages (stderr); calling it finishes the current stage and names the next."""

    def __init__(self, enabled: bool, stages: list[str]):
        self.stages, self.i, self.bar = stages, 0, None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=len(stages), desc=f"export: {stages[0]}", unit="stage", leave=False)

    def __call__(self) -> None:
        self.i += 1
        if self.bar is not None:
            self.bar.update(1)
            if self.i < len(self.stages):
                self.bar.set_description(f"export: {self.stages[self.i]}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
