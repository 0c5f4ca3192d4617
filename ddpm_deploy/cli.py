"""The `ddpm-deploy` command line: parse, call, print. Logic lives in the modules it calls."""

from __future__ import annotations

import sys
import time

import click

from . import __version__
from .errors import UserError


class _Group(click.Group):
    """Turns a UserError anywhere below into one line on stderr and exit status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)
        except ImportError as e:  # a module of the torch extra missing from a plain install: say how to get it
            from .extras import missing_extra

            message = missing_extra(e)
            if message is None:
                raise
            click.echo(f"error: {message}", err=True)
            ctx.exit(2)


def _show_progress(quiet: bool) -> bool:
    """Progress bars (tqdm, on stderr) only for a person watching: not with --quiet, not into a pipe or file."""
    return not quiet and sys.stderr.isatty()


def _quiet_option(f):
    return click.option("--quiet", is_flag=True, help="No progress bars (they are off anyway when stderr is not "
                        "a terminal).")(f)


def _quiet_lines_option(f):
    """--quiet of the long commands (train, eval, bench), which report progress off a terminal too."""
    return click.option("--quiet", is_flag=True, help="No progress: no bar on a terminal, and no progress lines "
                        "(every 10 % / 30 s on stderr) when stderr is a pipe or a file.")(f)


class _AutoLines(list):
    """What backend auto chose and why (runtime `load(echo=...)`): shown as it happens to a person watching, else
    after the run succeeded, so a failing run still ends in its one error line."""

    def __init__(self, live: bool):
        super().__init__()
        self.live = live

    def __call__(self, line: str) -> None:
        click.echo(line, err=True) if self.live else self.append(line)

    def flush(self) -> None:
        for line in self:
            click.echo(line, err=True)
        self.clear()


def _model_spec(sampling, manifest):
    """The SamplerSpec with its sampler named: as given, or (left out) the model's default, a distilled student's
    own grid, else DEFAULT_SAMPLER; one warning line when a distilled student is sampled off its grid."""
    from .sampler_spec import default_sampler, off_grid_warning

    warning = sampling.sampler and off_grid_warning(sampling.sampler, manifest.distilled)
    if warning:
        click.echo(warning, err=True)
    return sampling.with_default(default_sampler(manifest.distilled))


def _check_engine(engine: str | None, backend: str | None) -> None:
    """--engine takes an exported file: name it when it is something else (say, a picture)."""
    from pathlib import Path

    from .manifest import ENGINE_SUFFIXES, kind_of

    if engine is None or backend == "torch" or kind_of(engine) != "checkpoint":
        return
    p = Path(engine)
    if p.is_file() and p.suffix not in (".pt", ".pth"):
        raise UserError(f"--engine {engine} is not an engine: give an .onnx file from `ddpm-deploy export` or a "
                        f"{'/'.join(ENGINE_SUFFIXES)} engine from `ddpm-deploy build` (checkpoints go to "
                        "--checkpoint)")


def cap_threads(ctx, param, n):
    """click callback: --threads above the usable cores is capped at them with one line (more threads than cores
    only fight over them: a tampered 3000 drove a 2-core machine's load average past 900); below 1 is refused by
    the option's IntRange. The runtime's load() applies the same rule to its own threads."""
    if n is None:
        return None
    from .runtime.auto import usable_cores

    cores = usable_cores()
    if n > cores:
        click.echo(f"note: --threads {n} capped at the {cores} usable cores", err=True)
        return cores
    return n


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="ddpm-deploy")
def cli():
    """Ship a DDPM: train -> export (ONNX) -> build (TensorRT) -> run -> verify."""


@cli.command()
@click.option("--data", default="digits", show_default=True, help="'digits', a folder of PNG/JPEG, or an .npz file.")
@click.option("--out", default="runs/digits", show_default=True, type=click.Path(file_okay=False))
@click.option("--preset", type=click.Choice(["tiny", "small", "cifar10"]), default="small", show_default=True,
              help="UNet size.")
@click.option("--image-size", type=int, default=None, help="Resize images to this size (digits default 16).")
@click.option("--schedule", "beta_schedule", type=click.Choice(["linear", "cosine", "geometric"]), default="linear",
              show_default=True)
@click.option("-T", "--timesteps", "num_train_timesteps", type=int, default=1000, show_default=True)
@click.option("--beta-start", type=float, default=1e-4, show_default=True)
@click.option("--beta-end", type=float, default=0.02, show_default=True)
@click.option("--betas", type=click.Path(dir_okay=False), default=None,
              help="Any beta table: a 1-D .npy of T values in (0, 1) (numpy.save); replaces --schedule, -T, "
              "--beta-start and --beta-end, and travels in the manifest.")
@click.option("--prediction-type", type=click.Choice(["epsilon", "v_prediction", "sample"]), default="epsilon",
              show_default=True, help="What the network learns to output: eps, v = alpha_t eps - sigma_t x_0, or x_0.")
@click.option("--variance-type", type=click.Choice(["fixed_small", "fixed_large"]), default="fixed_small",
              show_default=True)
@click.option("--clip-sample/--no-clip-sample", default=True, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=8000, show_default=True,
              help="Total optimizer steps (with --resume: the total to reach, not steps to add).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--lr", type=float, default=5e-4, show_default=True)
@click.option("--ema-decay", type=float, default=0.995, show_default=True)
@click.option("--checkpoint-every", type=int, default=500, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--sample-n", type=click.IntRange(min=0), default=64, show_default=True,
              help="Samples in the final grid (0: none), drawn through a temporary ONNX export on onnxruntime.")
@click.option("--threads", type=click.IntRange(min=1), default=None, callback=cap_threads,
              help="torch CPU threads, at least 1, capped at the usable cores (default: torch's choice).")
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.pt exactly where it stopped, up to "
              "--steps in total.")
@_quiet_lines_option
def train(resume, quiet, **kw):
    """Train eps_theta with L_simple; writes OUT/model.pt and OUT/samples.png."""
    from .extras import require_torch_extra
    from .images import save_grid
    from .train.trainer import TrainConfig, Trainer, sample_grid

    require_torch_extra("train")
    cfg = TrainConfig(**kw)
    progress = _show_progress(quiet)
    trainer = Trainer(cfg, resume=resume, progress=not quiet)  # off a terminal: progress lines (.progress)
    click.echo(f"training on {len(trainer.x0)} images {tuple(trainer.x0.shape[1:])}, {trainer.schedule.kind} "
               f"schedule T={trainer.schedule.T}, {cfg.prediction_type} prediction, from step {trainer.step} to "
               f"{cfg.steps}")
    result = trainer.fit()
    click.echo(f"wrote {result['model']} after {result['steps']} steps in {result['seconds']:.0f}s "
               f"(final loss {result['final_loss']:.4f})")
    if cfg.sample_n > 0:
        t0 = time.time()
        images, how = sample_grid(trainer, cfg.sample_n, seed=cfg.seed, progress=progress)
        path = save_grid(images, trainer.out / "samples.png")
        click.echo(f"wrote {path} ({cfg.sample_n} samples, {how}, {time.time() - t0:.0f}s)")


def _int_list(ctx, param, value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected integers separated by commas, got {value!r}") from None


@cli.command()
@click.argument("teacher")
@click.option("--steps-to", type=click.Choice(["32", "16", "8", "4", "2", "1"]), default="4", show_default=True,
              help="Student steps after the last round.")
@click.option("--out", default="runs/distill", show_default=True, type=click.Path(file_okay=False))
@click.option("--teacher-steps", type=click.Choice(["256", "128", "64", "32", "16", "8", "4", "2"]), default="16",
              show_default=True, help="N0: DDIM steps of the first teacher (trailing grid from t = T-1).")
@click.option("--updates-per-round", default="2000", show_default=True, callback=_int_list,
              help="Optimizer updates per halving: one number, or one per round (comma-separated; the last repeats).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True, help="Peak lr; decays linearly to 0 per round.")
@click.option("--ema-decay", type=float, default=0.995, show_default=True)
@click.option("--prediction-type", type=click.Choice(["v_prediction", "sample"]), default="v_prediction",
              show_default=True, help="What the student predicts.")
@click.option("--data", default="digits", show_default=True, help="The teacher's training data (x_0 for z_t).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, callback=cap_threads,
              help="torch CPU threads, at least 1, capped at the usable cores (default: torch's choice).")
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.pt exactly where it stopped.")
@_quiet_option
def distill(teacher, resume, quiet, steps_to, teacher_steps, **kw):
    """Progressive distillation of TEACHER (model.pt or 'digits'): each round halves the DDIM steps; writes
    OUT/<K>step/model.pt (+ card.json, card.md) per round."""
    from .extras import require_torch_extra
    from .train.distill import DistillConfig, Distiller

    require_torch_extra("distill")
    cfg = DistillConfig(teacher=teacher, steps_to=int(steps_to), teacher_steps=int(teacher_steps), **kw)
    d = Distiller(cfg, resume=resume, progress=_show_progress(quiet), echo=click.echo)
    click.echo(f"distilling {teacher}: {' -> '.join(str(n) for n, _ in cfg.rounds())} -> {cfg.steps_to} steps "
               f"({cfg.prediction_type} student), from round {d.round + 1} update {d.update}")
    cards = d.run()
    click.echo(f"done: {', '.join(c['model'] for c in cards)}")


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
@_schedule_flags
@_quiet_option
def export(checkpoint, out, fp16, max_batch, opset, no_check, no_audit, quiet, **kw):
    """Export CHECKPOINT (model.pt, 'digits', or a diffusers folder) to a verified ONNX file."""
    from .export import onnx_from_checkpoint
    from .extras import require_torch_extra

    require_torch_extra("export")
    r = onnx_from_checkpoint(checkpoint, out, fp16=fp16, max_batch=max_batch, opset=opset, check=not no_check,
                             audit=not no_audit, schedule_overrides=_overrides(kw), echo=click.echo,
                             progress=_show_progress(quiet))
    click.echo(f"wrote {r['path']} ({'fp16' if fp16 else 'fp32'}, {r['seconds']:.1f}s)")


@cli.command()
@click.argument("path")
def info(path):
    """Print the manifest of an .onnx file or engine."""
    import json

    from .manifest import Manifest, kind_of

    if kind_of(path) == "checkpoint":
        from .extras import require_torch_extra
        from .nn import load_checkpoint

        require_torch_extra("info on a checkpoint")
        ckpt = load_checkpoint(path)
        click.echo(json.dumps({**ckpt.meta(), "sha256": ckpt.sha256}, indent=2, sort_keys=True))
        return
    click.echo(Manifest.read(path).to_json())


def _sampler_spec_options(sampler_default: str | None = None, steps_default: int | None = None, seed: bool = True,
                          steps_help: str = "Steps K (default: T for ddpm, 50 for ddim, 20 for dpmpp/dpmpp_sde/"
                                            "unipc)."):
    """--sampler/--steps/--order/--variant/--spacing/--eta as one checked `SamplerSpec`, the command's `sampling`
    argument (the same refusals as the Python API and POST /generate: their text is the spec's), and --seed
    (>= 0) unless seed=False. Plain strings, not click choices, so a bad name gets the spec's line too."""
    import functools

    from .sampler_spec import DEFAULT_SAMPLER, SAMPLERS, SPACINGS, UNIPC_VARIANTS, SamplerSpec

    def decorate(f):
        @functools.wraps(f)
        def wrapper(*args, sampler, steps, order, variant, spacing, eta, **kwargs):
            kwargs["sampling"] = SamplerSpec(sampler, steps, eta, order, variant, spacing)
            if seed and kwargs["seed"] < 0:
                raise UserError(f"--seed must be a non-negative integer, got {kwargs['seed']}")
            return f(*args, **kwargs)

        default = "" if sampler_default else f"Default: distilled for such students, else {DEFAULT_SAMPLER}."
        options = [
            click.option("--sampler", default=sampler_default, show_default=bool(sampler_default),
                         help=f"One of {', '.join(SAMPLERS)}: ddpm (ancestral), ddim, dpmpp (DPM-Solver++ multistep), "
                              "dpmpp_sde (its SDE variant), unipc (UniPC multistep with corrector), distilled (DDIM on "
                              f"the grid a `ddpm-deploy distill` student was made for). {default}"),
            click.option("--steps", type=int, default=steps_default, show_default=steps_default is not None,
                         help=steps_help),
            click.option("--order", type=int, default=None,
                         help="Solver order: dpmpp 1-3, dpmpp_sde 1-2, unipc 1-3 (default 2; drops near the ends)."),
            click.option("--variant", default=None,
                         help=f"unipc B(h): {' or '.join(UNIPC_VARIANTS)} (default bh2)."),
            click.option("--spacing", default=None, help=f"Timestep spacing of dpmpp/dpmpp_sde/unipc: "
                         f"{', '.join(SPACINGS)} (default linspace, as diffusers)."),
            click.option("--eta", type=float, default=0.0, show_default=True,
                         help="DDIM eta, 0 (deterministic) to 1."),
        ] + [click.option("--seed", type=int, default=0, show_default=True)] * seed
        for opt in reversed(options):
            wrapper = opt(wrapper)
        return wrapper

    return decorate


_sampling_options = _sampler_spec_options()


# `run` holds every image in memory and writes one grid: past this many images it states its estimated time and
# size and needs --yes (a 32 x 32 grid; bulk jobs belong to `generate`, which writes shards and resumes).
RUN_CONFIRM_N = 1024


def _check_suffix(path: str, suffix: str, option: str) -> None:
    """Refused rather than renamed: a script that asked for out.txt would look for out.txt and not find it."""
    from pathlib import Path

    if Path(path).suffix.lower() != suffix:
        raise UserError(f"{option} {path}: this file is written as {suffix[1:].upper()}, so its name must end in "
                        f"{suffix} (e.g. {Path(path).with_suffix(suffix).name})")


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
    import math

    from .progress import format_duration

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


def _backend_options(f):
    for opt in reversed([
        click.option("--device", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True,
                     help="onnxruntime execution provider (cuda/tensorrt need onnxruntime-gpu)."),
        click.option("--backend", type=click.Choice(["auto", "onnxruntime", "openvino", "tensorrt", "torch"]),
                     default=None, help="Default: from the file (.onnx on the CPU: auto, the fastest verified CPU "
                     "backend, measured once and cached; .onnx on a GPU: onnxruntime; .trt: tensorrt; .pt: torch)."),
        click.option("--precision", type=click.Choice(["fp32", "bf16"]), default=None,
                     help="OpenVINO inference precision (default fp32)."),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="CPU threads, at least 1; above the usable cores it is capped at them (default: the "
                     "library's choice)."),
    ]):
        f = opt(f)
    return f


@cli.command()
@click.option("--engine", "engine", default=None, help=".onnx from export or .trt from build.")
@click.option("--checkpoint", default=None, help="Run the PyTorch reference on a checkpoint instead.")
@click.option("-n", "num", type=int, default=16, show_default=True)
@_sampling_options
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Images per engine call (default: engine max).")
@_backend_options
@click.option("-o", "--out", default="samples.png", show_default=True, type=click.Path(dir_okay=False))
@click.option("--save-npy", default=None, type=click.Path(dir_okay=False), help="Also save float x_0 (N,C,H,W).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--yes", is_flag=True, help=f"Go ahead with more than {RUN_CONFIRM_N} images (their estimated time and "
              "size are printed first).")
def run(engine, checkpoint, num, sampling, seed, batch_size, device, backend, precision, threads, out, save_npy, quiet,
        yes):
    """Sample images from an engine (or a checkpoint) and write a PNG grid."""
    import numpy as np

    from .files import check_output_path
    from .images import save_grid, to_uint8
    from .pipelines import open_pipeline

    if (engine is None) == (checkpoint is None):
        raise UserError("give exactly one of --engine PATH or --checkpoint CKPT")
    if num <= 0:
        raise UserError(f"-n must be positive, got {num}")
    _check_engine(engine, backend)
    _check_suffix(out, ".png", "-o")
    check_output_path(out)
    if save_npy:
        _check_suffix(save_npy, ".npy", "--save-npy")
        check_output_path(save_npy)
    if checkpoint is not None or backend == "torch":
        from .extras import require_torch_extra

        require_torch_extra("run on a checkpoint (the PyTorch reference)")
    auto_lines = _AutoLines(live=_show_progress(quiet))
    from .manifest import kind_of

    # auto's report is the runtime's; a checkpoint given to --engine (e.g. shipped 'digits-4step') runs on torch
    on_runtime = engine is not None and backend != "torch" and (backend is not None or kind_of(engine) != "checkpoint")
    runtime_opts = {"echo": auto_lines} if on_runtime else {}
    with open_pipeline(engine or checkpoint, device, backend, precision, threads, **runtime_opts) as pipe:
        sampling = _model_spec(sampling, pipe.manifest)
        if num > RUN_CONFIRM_N:
            _confirm_large_run(pipe, num, pipe.plan(spec=sampling).steps, batch_size, save_npy, yes)
        x0 = pipe.sample(num, seed=seed, spec=sampling, batch_size=batch_size, output="float",
                         progress=_show_progress(quiet))
        timing = pipe.last_timing
        name = pipe.backend.name
    save_grid(to_uint8(x0), out)
    auto_lines.flush()
    click.echo(f"wrote {out} ({num} images, {sampling.sampler} {timing['steps']} steps on {name}, "
               f"{timing['seconds']:.2f}s, {1000 * timing['seconds'] / timing['steps']:.2f} ms/step)")
    if save_npy:
        import io

        from .files import write_bytes_atomic

        buf = io.BytesIO()
        np.save(buf, x0)
        write_bytes_atomic(buf.getvalue(), save_npy)
        click.echo(f"wrote {save_npy} (float32 {x0.shape})")


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
    from pathlib import Path

    from .files import check_output_path
    from .manifest import ENGINE_SUFFIXES
    from .runtime import engine_from_onnx

    engine_path = Path(out) if out else Path(onnx_path).with_suffix(ENGINE_SUFFIXES[0])
    check_output_path(engine_path)  # before the environment checks and the minutes-long build
    check_output_path(timing_cache or f"{engine_path}.timing")

    r = engine_from_onnx(onnx_path, out, max_batch=max_batch, opt_batch=opt_batch, timing_cache=timing_cache,
                         workspace_mb=workspace_mb, echo=click.echo)
    click.echo(f"wrote {r['path']} and {r['manifest_path']} ({r['seconds']:.1f}s)")


@cli.command()
@click.option("--engine", required=True, help="Deployed artifact (.onnx or .trt).")
@click.option("--checkpoint", required=True, help="The checkpoint it came from (the PyTorch reference).")
@_sampling_options
@click.option("-n", "num", type=int, default=8, show_default=True)
@_backend_options
@click.option("--report", "report_path", default="verify.json", show_default=True, type=click.Path(dir_okay=False))
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="PNG of error against t and image grids (default: REPORT with .png).")
@_quiet_option
def verify(engine, checkpoint, sampling, seed, num, device, backend, precision, threads, report_path, plot_path,
           quiet):
    """Compare the deployed chain with the PyTorch reference from the same noise; exit 1 on a failing verdict."""
    from pathlib import Path

    from .files import check_output_path, write_bytes_atomic
    from .pipelines import open_pipeline, open_reference
    from .extras import require_torch_extra
    from .verify import (check_same_model, judged_config, judged_line, report_json, save_plot, summary_lines,
                         verify_chain)

    _check_engine(engine, backend)
    check_output_path(report_path)
    plot_path = plot_path or str(Path(report_path).with_suffix(".png"))
    check_output_path(plot_path)
    require_torch_extra("verify")
    with open_pipeline(engine, device, backend, precision, threads) as dep, \
            open_reference(checkpoint, threads=threads) as ref:
        check_same_model(dep.manifest, ref.manifest)
        judged = judged_config(dep, backend, threads)
        click.echo(judged_line(judged))  # first: what is judged, and why (issue 24)
        report = verify_chain(dep, ref, spec=_model_spec(sampling, dep.manifest), n=num, seed=seed,
                              progress=_show_progress(quiet))
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
@_backend_options
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False))
@_quiet_lines_option
def eval_(engine, checkpoint, data, split, num, all_images, seed, device, backend, precision, threads, json_path,
          quiet):
    """Variational bound (Ho et al.) in bits/dim on a dataset, through the engine and/or PyTorch."""
    import json

    from .evaluate import EVAL_DEFAULT_N, evaluate_pipelines
    from .extras import require_torch_extra
    from .files import check_output_path, write_bytes_atomic
    from .pipelines import open_pipeline, open_reference
    from .verify import judged_config, judged_line

    if engine is None and checkpoint is None:
        raise UserError("give --engine PATH, --checkpoint CKPT, or both")
    if all_images and num is not None:
        raise UserError("give -n N or --all, not both")
    _check_engine(engine, backend)
    if json_path:
        check_output_path(json_path)
    require_torch_extra("eval")  # the datasets (scikit-learn) and the PyTorch reference
    pipes = []
    try:
        if engine:
            pipes.append(open_pipeline(engine, device, backend, precision, threads))
        if checkpoint:
            pipes.append(open_reference(checkpoint, threads=threads))  # --threads: both sides
        judged = judged_config(pipes[0], backend if engine else None, threads)
        click.echo(judged_line(judged))  # first: what is judged, and why (issue 24)
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
@_quiet_option
def demo(out, num, full, quiet):
    """The shipped digits model end to end: export fp32+fp16, TensorRT if present, run, verify."""
    from .demo import run_demo

    kw = {} if num is None else {"n": num}
    ok = run_demo(out, full=full, echo=click.echo, progress=_show_progress(quiet), **kw)
    if not ok:
        sys.exit(1)


@cli.command()
@click.option("--engine", "engines", multiple=True, help=".onnx or .trt to time; repeat for several (fp32, fp16).")
@click.option("--checkpoint", default=None,
              help="The same model's checkpoint: adds the PyTorch reference and diffusers' pipeline side by side.")
@click.option("--backend", default=None,
              help="Comma-separated: auto,onnxruntime,openvino,tensorrt (default: from the file; .onnx on the CPU: "
                   "auto, whose table is printed).")
@click.option("--precision", default=None, help="Comma-separated OpenVINO inference precisions: fp32,bf16.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True,
              help="onnxruntime execution provider.")
@click.option("--batch", "batch", default="1,4,8", show_default=True, help="Comma-separated batch sizes.")
@_sampler_spec_options("ddpm", 20, seed=False, steps_help="Timed steps per chain (a strided plan, as `run --steps`; "
                       "all T are not needed for timing).")
@click.option("--repeats", type=int, default=5, show_default=True, help="Timed chains per configuration (their "
              "spread is reported; a cell spread wider than 10 % is marked noisy).")
@click.option("--warmup", type=int, default=3, show_default=True, help="Steps of the untimed warm-up chain.")
@click.option("--threads", type=int, default=None, callback=cap_threads,  # < 1: BenchSpec's own line
              help="CPU threads for every side, at least 1, capped at the usable cores (default: all usable cores; "
              "auto picks its own).")
@click.option("--no-memory", is_flag=True, help="Skip the peak-memory subprocess per configuration.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the full report.")
@click.option("--markdown", "md_path", type=click.Path(dir_okay=False), default=None, help="Write the table.")
@_quiet_lines_option
def bench(engines, checkpoint, backend, precision, device, batch, sampling, repeats, warmup, threads, no_memory,
          json_path, md_path, quiet):
    """Time sampling per backend x dtype x batch: ms/step, images/s, loop overhead, peak memory."""
    from .bench import (BenchSpec, markdown_table, parse_int_list, parse_names, run_benchmark, write_report)
    from .bench.spec import PRECISIONS, RUNTIME_BACKENDS
    from .files import check_output_path

    if threads is not None and threads <= 0:
        raise UserError(f"--threads must be positive, got {threads}")
    for path in (json_path, md_path):
        if path:
            check_output_path(path)  # fail before a long run, not after it
    spec = BenchSpec(engines=engines, checkpoint=checkpoint, device=device, sampling=sampling, threads=threads,
                     warmup=warmup, repeats=repeats, memory=not no_memory,
                     backends=parse_names(backend, RUNTIME_BACKENDS + ("torch",), "--backend"),  # torch: a hint
                     precisions=parse_names(precision, PRECISIONS, "--precision"),
                     batches=parse_int_list(batch, "--batch"))
    report = run_benchmark(spec, echo=click.echo, progress=not quiet)
    for choice in {r["engine"]: r["auto"] for r in report["results"] if r.get("auto")}.values():
        click.echo(choice["table_text"])
    write_report(report, json_path, md_path)
    click.echo(markdown_table(report), nl=False)


def _require_openvino(backend: str | None) -> None:
    """--backend openvino where the backend is opened in another process (Ray's workers) or after a server starts:
    checked here, so a missing openvino is one line and not a worker's traceback."""
    if backend == "openvino":
        from .extras import require_extra

        require_extra("openvino", "--backend openvino")


def _serve_engine_options(f, engine_required: bool = True):
    for opt in reversed([
        click.option("--engine", required=engine_required,
                     help=".onnx from export or .trt from build (or a checkpoint)."),
        click.option("--device", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True,
                     help="onnxruntime execution provider."),
        click.option("--backend", type=click.Choice(["onnxruntime", "openvino", "tensorrt", "torch"]), default=None,
                     help="Default: from the file."),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads per runtime."),
    ]):
        f = opt(f)
    return f


@cli.command()
@_serve_engine_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--max-batch", type=click.IntRange(min=1), default=None,
              help="Images advanced per engine step, across requests (default: the engine's max batch).")
@click.option("--max-n", type=click.IntRange(min=1), default=64, show_default=True, help="Images per request cap.")
@click.option("--batching", type=click.Choice(["step", "request"]), default="step", show_default=True,
              help="step: requests join/leave the running batch at any step, sharing it round-robin; request: "
                   "one request at a time.")
@click.option("--max-queued-rows", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Images of unfinished requests held at once; beyond: 503 (a client that gives up frees its share).")
@click.option("--header-timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="Seconds a connection has to send a request head (embedded server).")
@click.option("--body-timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="Seconds the whole request body has to arrive; beyond: 408.")
@click.option("--keep-alive-timeout", type=click.FloatRange(min=0, min_open=True), default=5.0, show_default=True,
              help="Seconds an idle kept-alive connection stays open (embedded server).")
@click.option("--limit-concurrency", type=click.IntRange(min=1), default=128, show_default=True,
              help="Connections + requests in flight; beyond: 503 at once (embedded server).")
@click.option("--max-connections", type=click.IntRange(min=1), default=256, show_default=True,
              help="Open sockets; beyond: 503 and closed at accept, bounding file descriptors (embedded server).")
@click.option("--drain-timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="On SIGTERM, seconds open requests get to finish before they are answered 503 and the server "
                   "exits (embedded server).")
@click.option("--ray", "use_ray", is_flag=True, help="Run as a Ray Serve deployment (needs the serve extra).")
@click.option("--address", default=None, help="--ray: the cluster to join (default: start a local Ray).")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
              help="--ray: replicas, each with its own runtime.")
def serve(engine, device, backend, threads, host, port, max_batch, max_n, batching, use_ray, address, replicas,
          **limits):
    """HTTP API: POST /generate, GET /healthz, GET /info, with step-level batching across requests."""
    from .extras import require_extra
    from .serve.service import ServeConfig

    # before the engine loads: each missing module is one line naming its extra, not a traceback at server start
    require_extra("serve", "serve" + " --ray" * use_ray, ("fastapi", "uvicorn") + ("ray",) * use_ray)
    _require_openvino(backend)

    config = ServeConfig(engine=engine, max_batch=max_batch, max_n=max_n, device=device, backend=backend,
                         threads=threads, batching=batching, **limits)
    if use_ray:
        from .serve.ray_app import run_ray_serve

        run_ray_serve(config, host=host, port=port, replicas=replicas, address=address, echo=click.echo)
    else:
        if address is not None or replicas != 1:
            raise UserError("--address and --replicas need --ray")
        from .serve.app import run_embedded

        run_embedded(config, host=host, port=port, echo=click.echo)


def _generate_engine_options(f):
    """serve's engine options with --engine optional: `generate --check DIR` reads no model."""
    return _serve_engine_options(f, engine_required=False)


@cli.command()
@_generate_engine_options
@click.option("-n", "num", type=click.IntRange(min=1), default=None, help="Images in all.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Folder of shards and generate.json.")
@_sampling_options
@click.option("--shard-size", type=click.IntRange(min=1), default=256, show_default=True, help="Images per shard.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Ray actors, one runtime each (default: the cluster's CPUs).")
@click.option("--ray-address", default=None, help="Ray cluster to use (default: start a local one, 2 CPUs).")
@click.option("--check", "check_dir", type=click.Path(file_okay=False), default=None,
              help="Verify the finished job in this folder instead (every shard's sha256, shape, dtype, finiteness; "
                   "no Ray needed): exit 0 if all good, else one line per bad shard and exit 1.")
def generate(engine, device, backend, threads, num, out, sampling, seed, shard_size, workers, ray_address, check_dir):
    """Bulk generation on Ray: shards of images (per-image seeds), resumable after a kill (run it again)."""
    from .serve.bulk import GenerateSpec, generate_on_ray

    if check_dir is not None:
        if engine is not None or num is not None or out is not None:
            raise click.UsageError("--check DIR verifies a finished folder: give it without --engine, -n and --out")
        _check_generated(check_dir)
        return
    for value, name in ((engine, "--engine"), (num, "-n"), (out, "--out")):
        if value is None:
            raise click.UsageError(f"Missing option '{name}' (or --check DIR to verify a finished job)")
    from .extras import require_extra

    require_extra("serve", "generate", ("ray",))  # before the job file is written and Ray's workers start
    _require_openvino(backend)
    spec = GenerateSpec(engine=engine, n=num, seed=seed, sampling=sampling, shard_size=shard_size, device=device,
                        backend=backend, threads=threads)
    generate_on_ray(spec, out, address=ray_address, workers=workers, echo=click.echo)


def _check_generated(folder: str) -> None:
    from .serve.bulk import check_folder

    record, problems = check_folder(folder)
    for line in problems:
        click.echo(f"error: {line}", err=True)
    if problems:
        sys.exit(1)
    n, size = record["settings"]["n"], record["settings"]["shard_size"]
    click.echo(f"ok: {n} images in {-(-n // size)} shards in {folder}, each matching its recorded sha256, shape "
               "and dtype, all finite")


def main(argv=None):
    """Entry point: every error is one line on stderr and a non-zero exit (2: bad input, 130: interrupted)."""
    try:
        rv = cli.main(args=argv, prog_name="ddpm-deploy", standalone_mode=False)
    except click.UsageError as e:  # click's own multi-line usage errors, squeezed to one line
        hint = f" (see ddpm-deploy {e.ctx.info_name} --help)" if e.ctx and e.ctx.parent else ""
        click.echo(f"error: {e.format_message()}{hint}", err=True)
        sys.exit(2)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, click.Abort):
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
