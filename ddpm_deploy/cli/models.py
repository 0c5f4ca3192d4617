"""`export`, `build` and `info`: make and read deployable files. Local imports: the exporter (torch), the TensorRT
builder (onnx, tensorrt), the manifest and checkpoints (numpy, torch), see cli/common.py."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import UserError
from ..extras import require_torch_extra
from .common import check_outputs, cli, quiet_option, show_progress

def _schedule_flags(f):
    """Schedule flags for a bare diffusers UNet folder (pipelines and our checkpoints carry their own)."""
    for opt in reversed([
        click.option("--beta-schedule", type=click.Choice(["linear", "cosine", "geometric"]), default=None,
                     help="Bare UNet folders only (default: DDPM linear)."),
        click.option("--num-train-timesteps", type=int, default=None, help="Bare UNet folders only (default 1000)."),
        click.option("--beta-start", type=float, default=None),
        click.option("--beta-end", type=float, default=None),
        click.option("--variance-type", type=click.Choice(["fixed_small", "fixed_large", "learned_range"]),
                     default=None),
        click.option("--clip-sample/--no-clip-sample", default=None),
        click.option("--prediction-type", type=click.Choice(["epsilon", "v_prediction", "sample"]), default=None,
                     help="Bare UNet folders only (default epsilon)."),
    ]):
        f = opt(f)
    return f


def _overrides(kw: dict) -> dict:
    keys = ("beta_schedule", "num_train_timesteps", "beta_start", "beta_end", "variance_type", "clip_sample",
            "prediction_type")
    return {k: kw.pop(k) for k in keys if k in kw}


@cli.command()
@click.argument("checkpoint")
@click.option("-o", "--out", type=click.Path(dir_okay=False), default=None,
              help="Output .onnx (default: <name>[.fp16].onnx here).")
@click.option("--fp16", is_flag=True, help="fp16 graph with fp32 inputs/outputs, precision-audited.")
@click.option("--max-batch", type=int, default=16, show_default=True, help="Dynamic batch axis 1..N.")
@click.option("--opset", type=int, default=21, show_default=True)
@click.option("--no-check", is_flag=True, help="Skip the onnxruntime-vs-PyTorch parity check.")
@click.option("--no-audit", is_flag=True, help="--fp16 without the trajectory precision audit.")
@click.option("--int8", is_flag=True, help="int8 OpenVINO model (NNCF W8A8 of the fused step, calibrated on the "
              "sampler's chain, gated against fp32): writes <name>.int8.xml/.bin and its .xml.json manifest; "
              "-o NAME.int8.onnx writes a QDQ ONNX instead (onnxruntime quantize_static, for TensorRT).")
@click.option("--calib-samples", type=int, default=None,
              help="--int8: calibration states (x_t, t) from the sampler's chain, every step [default: 256].")
@click.option("--calib-sampler", default=None, help="--int8: the sampler whose chain calibrates (default: the "
              "model's default, a student's own grid).")
@click.option("--calib-steps", type=int, default=None, help="--int8: that sampler's steps (default: its own).")
@click.option("--float-layer", "float_layers", multiple=True, help="--int8: a module name kept in float on top of "
              "the time embedding, conv_in, conv_out and conv_shortcut (repeatable; e.g. mid_block).")
@_schedule_flags
@quiet_option
def export(checkpoint, out, fp16, max_batch, opset, no_check, no_audit, int8, calib_samples, calib_sampler,
           calib_steps, float_layers, quiet, **kw):
    """Export CHECKPOINT (model.pt, 'digits', or a diffusers folder) to a verified ONNX file."""
    from ..export import onnx_from_checkpoint

    int8_flags = calib_samples is not None or calib_sampler or calib_steps is not None or float_layers
    if int8_flags and not int8:
        raise UserError("--calib-samples, --calib-sampler, --calib-steps and --float-layer go with --int8")
    if int8:
        return _export_int8(checkpoint, out, fp16, max_batch, opset, calib_samples, calib_sampler, calib_steps,
                            float_layers, kw)
    require_torch_extra("export")
    r = onnx_from_checkpoint(checkpoint, out, fp16=fp16, max_batch=max_batch, opset=opset, check=not no_check,
                             audit=not no_audit, schedule_overrides=_overrides(kw), echo=click.echo,
                             progress=show_progress(quiet))
    click.echo(f"wrote {r['path']} ({'fp16' if fp16 else 'fp32'}, {r['seconds']:.1f}s)")


def _export_int8(checkpoint, out, fp16, max_batch, opset, calib_samples, calib_sampler, calib_steps, float_layers,
                 kw):
    if fp16:
        raise UserError("--int8 and --fp16 are two exports: pick one")
    from ..export.int8 import DEFAULT_CALIB_SAMPLES, int8_from_checkpoint
    from ..sampling.spec import SamplerSpec

    SamplerSpec(sampler=calib_sampler, steps=calib_steps)  # a bad name or step count: its one line, before any work
    require_torch_extra("export")
    r = int8_from_checkpoint(checkpoint, out, calib_samples=DEFAULT_CALIB_SAMPLES if calib_samples is None
                             else calib_samples, calib_sampler=calib_sampler, calib_steps=calib_steps,
                             float_layers=float_layers, max_batch=max_batch, opset=opset,
                             schedule_overrides=_overrides(kw), echo=click.echo)
    fmt = "QDQ ONNX" if Path(r["path"]).suffix == ".onnx" else "OpenVINO"
    click.echo(f"wrote {r['path']} (int8, {fmt}; eps max|Δ| {r['gate']['eps_max_abs']:.3g} vs fp32, chain x_0 "
               f"PSNR {r['gate']['x0_psnr_db']:.1f} dB; {r['seconds']:.1f}s)")


@cli.command()
@click.argument("path")
def info(path):
    """Print the manifest of an .onnx file or engine."""
    from ..artifact.manifest import Manifest, kind_of

    if kind_of(path) == "checkpoint":
        from ..nn import load_checkpoint

        require_torch_extra("info on a checkpoint")
        ckpt = load_checkpoint(path)
        click.echo(json.dumps({**ckpt.meta(), "sha256": ckpt.sha256}, indent=2, sort_keys=True))
        return
    click.echo(Manifest.read(path).to_json())


@cli.command()
@click.argument("onnx_path", metavar="MODEL.onnx")
@click.option("-o", "--out", default=None, type=click.Path(dir_okay=False), help="Engine path (default MODEL.trt).")
@click.option("--max-batch", type=int, default=None, help="Profile max batch (default: the ONNX manifest's).")
@click.option("--opt-batch", type=int, default=None, help="Profile optimum batch (default: max batch).")
@click.option("--timing-cache", default=None, type=click.Path(dir_okay=False),
              help="Timing cache file, read if present and updated (default: <engine>.timing).")
@click.option("--workspace", "workspace_mb", type=int, default=2048, show_default=True, help="Workspace MB.")
def build(onnx_path, out, max_batch, opt_batch, timing_cache, workspace_mb):
    """Compile an exported ONNX into a TensorRT engine (fused reverse step) with a manifest sidecar."""
    from ..artifact.fields import ENGINE_SUFFIXES
    from ..runtime import engine_from_onnx

    engine_path = Path(out) if out else Path(onnx_path).with_suffix(ENGINE_SUFFIXES[0])
    check_outputs(engine_path, timing_cache or f"{engine_path}.timing")  # before the environment checks and build

    r = engine_from_onnx(onnx_path, out, max_batch=max_batch, opt_batch=opt_batch, timing_cache=timing_cache,
                         workspace_mb=workspace_mb, echo=click.echo)
    click.echo(f"wrote {r['path']} and {r['manifest_path']} ({r['seconds']:.1f}s)")
