"""What every command group shares: the `cli` group (one-line errors), progress and quiet options, the sampler
options (one checked SamplerSpec), the backend options (read from the backend registry) and --threads.

Local imports in ddpm_deploy/cli/*: any module that imports numpy or more (the runtime, pipelines, manifest,
verify, evaluate, bench, serve, train, export, demo's steps) and the optional libraries are imported inside the
command that needs them, so `ddpm-deploy --help` (and every command's --help) starts with click alone (~60 ms)
and never imports torch. Module tops import only numpy-free modules (errors, extras, files, progress,
sampling.spec, backend_registry).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from .. import __version__
from .. import backend_registry as registry
from ..errors import UserError
from ..extras import missing_extra, require_extra
from ..files import check_output_path
from ..sampling.spec import (DEFAULT_SAMPLER, SAMPLERS, SPACINGS, UNIPC_VARIANTS, SamplerSpec, default_sampler,
                             off_grid_warning)

class _Group(click.Group):
    """Turns a UserError anywhere below into one line on stderr and exit status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)
        except ImportError as e:  # a module of the torch extra missing from a plain install: say how to get it
            message = missing_extra(e)
            if message is None:
                raise
            click.echo(f"error: {message}", err=True)
            ctx.exit(2)


def show_progress(quiet: bool) -> bool:
    """Progress bars (tqdm, on stderr) only for a person watching: not with --quiet, not into a pipe or file."""
    return not quiet and sys.stderr.isatty()


def quiet_option(f):
    return click.option("--quiet", is_flag=True, help="No progress bars (they are off anyway when stderr is not "
                        "a terminal).")(f)


def quiet_lines_option(f):
    """--quiet of the long commands (train, eval, bench), which report progress off a terminal too."""
    return click.option("--quiet", is_flag=True, help="No progress: no bar on a terminal, and no progress lines "
                        "(every 10 % / 30 s on stderr) when stderr is a pipe or a file.")(f)


class AutoLines(list):
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


def model_spec(sampling, manifest):
    """The SamplerSpec with its sampler named: as given, or (left out) the model's default, a distilled student's
    own grid, else DEFAULT_SAMPLER; one warning line when a distilled student is sampled off its grid."""
    warning = sampling.sampler and off_grid_warning(sampling.sampler, manifest.distilled)
    if warning:
        click.echo(warning, err=True)
    return sampling.with_default(default_sampler(manifest.distilled))


def checked_spec(sampling, engine: str):
    """model_spec for an ONNX file, its plan made from the file's manifest alone: bad sampling options (steps past
    T, say) are refused before a backend compiles anything, so their error is the only line printed. (Not for a
    TensorRT engine: there the library and the GPU are checked first, before any file is read.)"""
    from ..artifact.manifest import Manifest  # numpy
    from ..sampling.plan import model_plan

    manifest = Manifest.read(engine)
    spec = model_spec(sampling, manifest)
    model_plan(manifest, spec)
    return spec


def check_engine(engine: str | None, backend: str | None) -> None:
    """--engine takes an exported file: name it when it is something else (a picture, a missing path, or a
    checkpoint, which would otherwise run on PyTorch while the line says it ran an engine). A checkpoint with
    --backend torch named explicitly is let through: that asks for the PyTorch reference."""
    from ..artifact.fields import ENGINE_SUFFIXES
    from ..artifact.manifest import kind_of  # numpy
    from ..nn import SHIPPED_MODELS  # no torch at import

    if engine is None or backend in registry.names(runtime=False) or kind_of(engine) != "checkpoint":
        return
    p = Path(engine)
    takes = (f"an .onnx file from `ddpm-deploy export` or a {'/'.join(ENGINE_SUFFIXES)} engine from `ddpm-deploy "
             "build`")
    if p.is_file() and p.suffix not in (".pt", ".pth"):
        raise UserError(f"--engine {engine} is not an engine: give {takes} (checkpoints go to --checkpoint)")
    if not p.exists() and engine not in SHIPPED_MODELS:
        raise UserError(f"--engine {engine} not found: give {takes}")
    raise UserError(f"--engine {engine} is a checkpoint, not an engine: checkpoints go to --checkpoint "
                    f"(`--checkpoint {engine}` runs the PyTorch reference); --engine takes {takes}, e.g. "
                    f"`ddpm-deploy export {engine} -o model.onnx`")


def cap_threads(ctx, param, n):
    """click callback: --threads above the usable cores is capped at them with one line (more threads than cores
    only fight over them: a tampered 3000 drove a 2-core machine's load average past 900); below 1 is refused in
    one line. The runtime's load() applies the same rule (backend_registry.checked_threads)."""
    if n is None:
        return None
    n, note = registry.checked_threads(n)
    if note:
        click.echo(note, err=True)
    return n


def torch_threads_option(f):
    """--threads of train and distill."""
    return click.option("--threads", type=click.IntRange(min=1), default=None, callback=cap_threads,
                        help="torch CPU threads, at least 1, capped at the usable cores (default: torch's choice)."
                        )(f)


def check_outputs(*paths) -> None:
    """Every output path given (None: not asked for) is writable: checked before a long run, not after it."""
    for path in paths:
        if path:
            check_output_path(path)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="ddpm-deploy")
def cli():
    """Ship a DDPM: train -> export (ONNX) -> build (TensorRT) -> run -> verify."""


def sampler_spec_options(sampler_default: str | None = None, steps_default: int | None = None, seed: bool = True,
                          steps_help: str = "Steps K (default: T for ddpm, 50 for ddim, 20 for dpmpp/dpmpp_sde/"
                                            "unipc)."):
    """--sampler/--steps/--order/--variant/--spacing/--eta as one checked `SamplerSpec`, the command's `sampling`
    argument (the same refusals as the Python API and POST /generate: their text is the spec's), and --seed
    (>= 0) unless seed=False. Plain strings, not click choices, so a bad name gets the spec's line too."""
    def decorate(f):
        @functools.wraps(f)
        def wrapper(*args, sampler, steps, order, variant, spacing, eta, **kwargs):
            kwargs["sampling"] = SamplerSpec(sampler, steps, eta, order, variant, spacing)
            if seed and kwargs["seed"] < 0:
                raise UserError(f"--seed must be a non-negative integer, got {kwargs['seed']}")
            return f(*args, **kwargs)

        default = "" if sampler_default else f"Default: a student's own (distilled or lcm), else {DEFAULT_SAMPLER}."
        options = [
            click.option("--sampler", default=sampler_default, show_default=bool(sampler_default),
                         help=f"One of {', '.join(SAMPLERS)}: ddpm (ancestral), ddim, dpmpp (DPM-Solver++ multistep), "
                              "dpmpp_sde (its SDE variant), unipc (UniPC multistep with corrector), distilled (DDIM on "
                              "the grid a `ddpm-deploy distill` student was made for), lcm (consistency multistep: x_0, "
                              f"then fresh noise; LCMScheduler). {default}"),
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


sampling_options = sampler_spec_options()


def device_option(help: str = "onnxruntime execution provider."):
    return click.option("--device", type=click.Choice(registry.DEVICES), default="cpu", show_default=True, help=help)


def backend_options(f):
    """--device, --backend, --precision, --threads of run, verify and eval: the registry's names."""
    for opt in reversed([
        device_option("onnxruntime execution provider (cuda/tensorrt need onnxruntime-gpu)."),
        click.option("--backend", type=click.Choice(registry.names(with_auto=True)),
                     default=None, help="Default: from the file (.onnx on the CPU: auto, the fastest verified CPU "
                     "backend, measured once and cached; .onnx on a GPU: onnxruntime; .trt: tensorrt; .pt: torch)."),
        click.option("--precision", type=click.Choice(registry.precisions()), default=None,
                     help=f"Inference precision of --backend {' or '.join(registry.precision_backends())} (default "
                     f"{registry.precisions()[0]})."),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="CPU threads, at least 1; above the usable cores it is capped at them (default: the "
                     "library's choice)."),
    ]):
        f = opt(f)
    return f


def require_backend_extra(backend: str | None) -> None:
    """--backend NAME of a runtime backend from an extra (openvino) where the backend is opened in another process
    (Ray's workers) or after a server starts: checked here, so a missing library is one line and not a worker's
    traceback."""
    entry = registry.get(backend) if backend else None
    if entry is not None and entry.runtime and entry.extra:
        require_extra(entry.extra, f"--backend {backend}")


def serve_engine_options(f, engine_required: bool = True):
    for opt in reversed([
        click.option("--engine", required=engine_required,
                     help=".onnx from export or .trt from build (or a checkpoint)."),
        device_option(),
        click.option("--backend", type=click.Choice(registry.names()), default=None,  # no auto: see fixed_backend
                     help="Default: from the file."),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads per runtime."),
    ]):
        f = opt(f)
    return f


def generate_engine_options(f):
    """serve's engine options with --engine optional: `generate --check DIR` reads no model."""
    return serve_engine_options(f, engine_required=False)
