"""`run`, `verify`, `eval` and `demo`: sample from a model, and judge it against the PyTorch reference. Local imports:
the pipelines and what judges them (numpy, the runtime; torch for the reference), see cli/common.py."""

from __future__ import annotations

import io
import json
import math
import sys
import time
from pathlib import Path

import click

from .. import backend_registry as registry
from ..app.demo import run_demo
from ..errors import UserError
from ..extras import require_torch_extra
from ..files import write_bytes_atomic
from ..progress import format_duration
from .common import (AutoLines, backend_options, check_engine, check_outputs, checked_spec, cli, model_spec,
                     quiet_lines_option, quiet_option, sampling_options, show_progress)


# `run` holds every image in memory and writes one grid: past this many images it states its estimated time and
# size and needs --yes (a 32 x 32 grid; bulk jobs belong to `generate`, which writes shards and resumes).
RUN_CONFIRM_N = 1024


def _check_suffix(path: str, suffix: str, option: str) -> None:
    """Refused rather than renamed: a script that asked for out.txt would look for out.txt and not find it."""
    if Path(path).suffix.lower() != suffix:
        raise UserError(f"{option} {path}: this file is written as {suffix[1:].upper()}, so its name must end in "
                        f"{suffix} (e.g. {Path(path).with_suffix(suffix).name})")


DEFAULT_OUT = "samples.png"


def _default_out(out: str | None, force: bool) -> str:
    """-o as given (naming a file is asking for it, so it is replaced), else samples.png, which a second run would
    replace silently: an existing one is kept unless --force says to replace it."""
    if out is not None:
        return out
    if Path(DEFAULT_OUT).exists() and not force:
        raise UserError(f"{DEFAULT_OUT} exists (run's default output, from an earlier run?): name the output with "
                        f"-o FILE.png, or add --force to replace {DEFAULT_OUT}")
    return DEFAULT_OUT


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.0f} MB"


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def _confirm_large_run(pipe, num: int, steps: int, batch_size: int | None, save_npy, yes: bool) -> None:
    """Past RUN_CONFIRM_N images: the estimated time (from a 2-step probe at the run's batch size) and memory, one
    line; refused without --yes, and refused even with it when the images cannot fit in the available memory."""
    b = min(batch_size or pipe.backend.max_batch, pipe.backend.max_batch, num)
    pipe.sample(b, seed=0, sampler="ddim", steps=1, batch_size=b)  # warm-up: first-call costs are not per step
    t0 = time.perf_counter()
    pipe.sample(b, seed=0, sampler="ddim", steps=2, batch_size=b)
    seconds = (time.perf_counter() - t0) / 2 * steps * math.ceil(num / b)
    c, h, w = pipe.image_shape
    held = num * c * h * w * (4 + 1 + (4 if save_npy else 0))  # float x_0, the uint8 grid, the .npy bytes
    line = (f"-n {num}: about {format_duration(seconds)} ({steps} steps x {math.ceil(num / b)} batches of {b}) and "
            f"{_size(held)} of images in memory")
    available = _mem_available()
    if available is not None and held > available:
        raise UserError(f"{line}, but {_size(available)} of memory is available: use `ddpm-deploy generate` (shards "
                        "on disk, resumable) or a smaller -n")
    if not yes:
        raise UserError(f"{line}: add --yes to go ahead, or use `ddpm-deploy generate` for bulk jobs (shards on "
                        f"disk, resumable); past {RUN_CONFIRM_N} images run asks first")
    click.echo(line, err=True)


@cli.command()
@click.option("--engine", "engine", default=None, help=".onnx from export or .trt from build (a checkpoint is "
              "refused here: give it to --checkpoint).")
@click.option("--checkpoint", default=None, help="Run the PyTorch reference on a checkpoint (a .pt, a diffusers "
              "folder or a shipped name such as digits-4step) instead.")
@click.option("-n", "num", type=int, default=16, show_default=True)
@sampling_options
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Images per engine call (default: engine max).")
@backend_options
@click.option("-o", "--out", default=None, type=click.Path(dir_okay=False),
              help="PNG grid to write; named here, an existing file is replaced (default: samples.png, never "
              "replaced without --force).")
@click.option("--force", is_flag=True, help="Replace an existing samples.png when -o is not given.")
@click.option("--save-npy", default=None, type=click.Path(dir_okay=False), help="Also save float x_0 (N,C,H,W).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--yes", is_flag=True, help=f"Go ahead with more than {RUN_CONFIRM_N} images (their estimated time and "
              "size are printed first).")
def run(engine, checkpoint, num, sampling, seed, batch_size, device, backend, precision, threads, out, force, save_npy,
        quiet, yes):
    """Sample images from an engine (or a checkpoint) and write a PNG grid."""
    import numpy as np

    from ..images import save_grid, to_uint8
    from ..artifact.manifest import kind_of
    from ..app.opener import open_pipeline

    if (engine is None) == (checkpoint is None):
        raise UserError("give exactly one of --engine PATH or --checkpoint CKPT")
    if num <= 0:
        raise UserError(f"-n must be positive, got {num}")
    check_engine(engine, backend)
    out = _default_out(out, force)
    _check_suffix(out, ".png", "-o")
    check_outputs(out)
    if save_npy:
        _check_suffix(save_npy, ".npy", "--save-npy")
        check_outputs(save_npy)
    on_reference = backend in registry.names(runtime=False)  # the PyTorch reference (torch)
    if checkpoint is not None or on_reference:
        require_torch_extra("run on a checkpoint (the PyTorch reference)")
    auto_lines = AutoLines(live=show_progress(quiet))
    # auto's report is the runtime's (check_engine let a checkpoint through --engine only with --backend torch)
    on_runtime = engine is not None and not on_reference
    runtime_opts = {"echo": auto_lines} if on_runtime else {}
    early = on_runtime and kind_of(engine) in ("onnx", "openvino")  # a TensorRT engine's environment goes first
    if early:
        sampling = checked_spec(sampling, engine)
    with open_pipeline(engine or checkpoint, device, backend, precision, threads, **runtime_opts) as pipe:
        if not early:
            sampling = model_spec(sampling, pipe.manifest)
        if num > RUN_CONFIRM_N:
            _confirm_large_run(pipe, num, pipe.plan(spec=sampling).steps, batch_size, save_npy, yes)
        x0 = pipe.sample(num, seed=seed, spec=sampling, batch_size=batch_size, output="float",
                         progress=show_progress(quiet))
        timing = pipe.last_timing
        name = pipe.backend.name
    save_grid(to_uint8(x0), out)
    auto_lines.flush()
    click.echo(f"wrote {out} ({num} images, {sampling.sampler} {timing['steps']} steps on {name}, "
               f"{timing['seconds']:.2f}s, {1000 * timing['seconds'] / timing['steps']:.2f} ms/step)")
    if save_npy:
        buf = io.BytesIO()
        np.save(buf, x0)
        write_bytes_atomic(buf.getvalue(), save_npy)
        click.echo(f"wrote {save_npy} (float32 {x0.shape})")


@cli.command()
@click.option("--engine", required=True, help="Deployed artifact (.onnx or .trt).")
@click.option("--checkpoint", required=True, help="The checkpoint it came from (the PyTorch reference).")
@sampling_options
@click.option("-n", "num", type=int, default=8, show_default=True)
@backend_options
@click.option("--report", "report_path", default="verify.json", show_default=True, type=click.Path(dir_okay=False))
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="PNG of error against t and image grids (default: REPORT with .png).")
@quiet_option
def verify(engine, checkpoint, sampling, seed, num, device, backend, precision, threads, report_path, plot_path,
           quiet):
    """Compare the deployed chain with the PyTorch reference from the same noise; exit 1 on a failing verdict."""
    from ..artifact.manifest import kind_of
    from ..app.opener import open_pipeline, open_reference
    from ..app.verify import (check_same_model, judged_config, judged_line, report_json, save_plot, summary_lines,
                              verify_chain)

    check_engine(engine, backend)
    plot_path = plot_path or str(Path(report_path).with_suffix(".png"))
    check_outputs(report_path, plot_path)
    require_torch_extra("verify")
    spec = checked_spec(sampling, engine) if kind_of(engine) in ("onnx", "openvino") else None
    with open_pipeline(engine, device, backend, precision, threads) as dep, \
            open_reference(checkpoint, threads=threads) as ref:
        check_same_model(dep.manifest, ref.manifest)
        judged = judged_config(dep, backend, threads)
        click.echo(judged_line(judged))  # first: what is judged, and why
        report = verify_chain(dep, ref, spec=spec or model_spec(sampling, dep.manifest), n=num, seed=seed,
                              progress=show_progress(quiet))
        report["judged"] = judged
    write_bytes_atomic(report_json(report).encode(), report_path)
    save_plot(report, plot_path)
    for line in summary_lines(report):
        click.echo(line)
    click.echo(f"wrote {report_path} and {plot_path}")
    if report["verdict"] != "pass":
        sys.exit(1)


@cli.command(name="eval")
@click.option("--engine", default=None, help="Deployed artifact to evaluate.")
@click.option("--checkpoint", default=None, help="Evaluate through PyTorch (with --engine: compare both).")
@click.option("--data", default="digits", show_default=True)
@click.option("--split", default="test", show_default=True, help="digits: train, test or all.")
@click.option("-n", "num", type=click.IntRange(min=1), default=None,
              help="First N images of the split (default 8: under a minute for both sides on 2 idle cores).")
@click.option("--all", "all_images", is_flag=True, help="The whole split (minutes to tens of minutes on a CPU).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the x_t noise (same for both).")
@backend_options
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False))
@quiet_lines_option
def eval_(engine, checkpoint, data, split, num, all_images, seed, device, backend, precision, threads, json_path,
          quiet):
    """Variational bound (Ho et al.) in bits/dim on a dataset, through the engine and/or PyTorch."""
    from ..app.evaluate import EVAL_DEFAULT_N, evaluate_pipelines
    from ..app.opener import open_pipeline, open_reference
    from ..app.verify import judged_config, judged_line

    if engine is None and checkpoint is None:
        raise UserError("give --engine PATH, --checkpoint CKPT, or both")
    if all_images and num is not None:
        raise UserError("give -n N or --all, not both")
    check_engine(engine, backend)
    check_outputs(json_path)
    require_torch_extra("eval")  # the datasets (scikit-learn) and the PyTorch reference
    pipes = []
    try:
        if engine:
            pipes.append(open_pipeline(engine, device, backend, precision, threads))
        if checkpoint:
            pipes.append(open_reference(checkpoint, threads=threads))  # --threads: both sides
        judged = judged_config(pipes[0], backend if engine else None, threads)
        click.echo(judged_line(judged))  # first: what is judged, and why
        result = evaluate_pipelines(pipes, data=data, split=split, n=None if all_images else num or EVAL_DEFAULT_N,
                                    seed=seed, echo=click.echo, progress=not quiet)  # bar or lines (.progress)
    finally:
        for p in pipes:
            p.close()
    result = {"judged": judged, **result}
    if json_path:
        write_bytes_atomic(json.dumps(result, indent=2).encode(), json_path)
        click.echo(f"wrote {json_path}")
    if result.get("agreement") and not result["agreement"]["ok"]:
        sys.exit(1)


@cli.command()
@click.option("--out", default="ddpm-demo", show_default=True, type=click.Path(file_okay=False))
@click.option("-n", "num", type=click.IntRange(min=1), default=None,
              help="Images sampled per precision (default 16; verify uses at most 8).")
@click.option("--full", is_flag=True, help="The full DDPM chain (T steps) for run and verify instead of DDIM 50 "
              "(several minutes on a CPU).")
@quiet_option
def demo(out, num, full, quiet):
    """The shipped digits model end to end: export fp32+fp16, TensorRT if present, run, verify."""
    kw = {} if num is None else {"n": num}
    ok = run_demo(out, full=full, echo=click.echo, progress=show_progress(quiet), **kw)
    if not ok:
        sys.exit(1)
