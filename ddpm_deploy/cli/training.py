"""`train` and `distill`: the torch extra's commands (checked before anything is created). Local imports: the
trainer and distiller (torch), see cli/common.py."""

from __future__ import annotations

import math
import time

import click

from ..errors import UserError
from ..extras import require_torch_extra
from .common import cli, quiet_lines_option, quiet_option, show_progress, torch_threads_option


def _learning_rate(ctx, param, value: float) -> float:
    """--lr: finite and > 0 (click's FloatRange lets inf and NaN through). One too large to train with diverges:
    the loops refuse the first non-finite loss, gradient or weight, naming the step."""
    if not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"must be a finite number > 0, got {value}")
    return value


def _ema_decay(ctx, param, value: float) -> float:
    """--ema-decay in [0, 1): 0 is no averaging; 1 (or more) never moves the EMA off the initial weights."""
    if not 0.0 <= value < 1.0:  # NaN fails both comparisons
        raise click.BadParameter(f"must be in [0, 1), e.g. 0.995, got {value}")
    return value


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
@click.option("--lr", type=float, default=5e-4, show_default=True, callback=_learning_rate)
@click.option("--ema-decay", type=float, default=0.995, show_default=True, callback=_ema_decay)
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=500, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--sample-n", type=click.IntRange(min=0), default=64, show_default=True,
              help="Samples in the final grid (0: none), drawn through a temporary ONNX export on onnxruntime.")
@torch_threads_option
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.pt exactly where it stopped, up to "
              "--steps in total.")
@quiet_lines_option
def train(resume, quiet, **kw):
    """Train eps_theta with L_simple; writes OUT/model.pt and OUT/samples.png."""
    from ..images import save_grid
    from ..train.trainer import TrainConfig, Trainer, sample_grid

    require_torch_extra("train")
    cfg = TrainConfig(**kw)
    progress = show_progress(quiet)
    trainer = Trainer(cfg, resume=resume, progress=not quiet)  # off a terminal: progress lines (.progress)
    click.echo(f"training on {len(trainer.x0)} images {tuple(trainer.x0.shape[1:])}, {trainer.schedule.kind} "
               f"schedule T={trainer.schedule.T}, {cfg.prediction_type} prediction, from step {trainer.step} to "
               f"{cfg.steps}")
    result = trainer.fit()
    click.echo(f"wrote {result['model']} after {result['steps']} steps in {result['seconds']:.0f}s "
               f"(loss EMA {result['loss_ema']:.4f} over ~100 batches, as the progress shows; last batch "
               f"{result['last_batch_loss']:.4f})")
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
@click.option("--method", type=click.Choice(["progressive", "consistency"]), default="progressive", show_default=True,
              help="progressive: halve DDIM steps per round (Salimans & Ho); consistency: Easy Consistency Tuning "
              "(Geng et al.), a student sampled with --sampler lcm.")
@click.option("--steps-to", type=click.Choice(["32", "16", "8", "4", "2", "1"]), default="4", show_default=True,
              help="Student steps after the last round (consistency: the lcm steps the student defaults to).")
@click.option("--out", default="runs/distill", show_default=True, type=click.Path(file_okay=False))
@click.option("--teacher-steps", type=click.Choice(["256", "128", "64", "32", "16", "8", "4", "2"]), default="16",
              show_default=True, help="N0: DDIM steps of the first teacher (trailing grid from t = T-1).")
@click.option("--updates-per-round", default="2000", show_default=True, callback=_int_list,
              help="Optimizer updates per halving: one number, or one per round (comma-separated; the last repeats).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True, callback=_learning_rate,
              help="Peak lr; decays linearly to 0 per round.")
@click.option("--ema-decay", type=float, default=0.995, show_default=True, callback=_ema_decay)
@click.option("--prediction-type", type=click.Choice(["v_prediction", "sample"]), default="v_prediction",
              show_default=True, help="What the student predicts.")
@click.option("--data", default="digits", show_default=True, help="The teacher's training data (x_0 for z_t).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--updates", type=int, default=None,
              help="consistency: total optimizer updates (default 2000; with --resume the total to reach, or, below "
              "the checkpoint's, write the student from where it is).")
@click.option("--stage-updates", type=int, default=None,
              help="consistency: updates per curriculum stage; the gap t - r shrinks by q = 2 each (default 500).")
@torch_threads_option
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.pt exactly where it stopped.")
@quiet_option
@click.pass_context
def distill(ctx, teacher, resume, quiet, method, steps_to, teacher_steps, updates, stage_updates, **kw):
    """Distil TEACHER (model.pt or 'digits') into a few-step student. progressive: each round halves the DDIM steps;
    writes OUT/<K>step/model.pt (+ card.json, card.md) per round. consistency: Easy Consistency Tuning; writes
    OUT/model.pt (+ card.json, card.md), sampled with --sampler lcm by default."""
    require_torch_extra("distill")
    if method == "consistency":
        return _consistency(ctx, teacher, resume, quiet, int(steps_to), updates, stage_updates, kw)
    if updates is not None or stage_updates is not None:
        raise UserError("--updates and --stage-updates apply to --method consistency (progressive distillation "
                        "takes --updates-per-round)")
    from ..train.distill import DistillConfig, Distiller

    cfg = DistillConfig(teacher=teacher, steps_to=int(steps_to), teacher_steps=int(teacher_steps), **kw)
    d = Distiller(cfg, resume=resume, progress=show_progress(quiet), echo=click.echo)
    click.echo(f"distilling {teacher}: {' -> '.join(str(n) for n, _ in cfg.rounds())} -> {cfg.steps_to} steps "
               f"({cfg.prediction_type} student), from round {d.round + 1} update {d.update}")
    cards = d.run()
    click.echo(f"done: {', '.join(c['model'] for c in cards)}")


# distill's options that mean something to progressive distillation only
PROGRESSIVE_ONLY = ("teacher_steps", "updates_per_round", "prediction_type")


def _consistency(ctx, teacher, resume, quiet, steps, updates, stage_updates, kw):
    from click.core import ParameterSource

    from ..train.consistency import ConsistencyConfig, ConsistencyTuner

    given = [n for n in PROGRESSIVE_ONLY if ctx.get_parameter_source(n) != ParameterSource.DEFAULT]
    if given:
        raise UserError(f"--{given[0].replace('_', '-')} applies to --method progressive (consistency tuning keeps "
                        "the teacher's prediction type and takes --updates / --stage-updates)")
    for name in PROGRESSIVE_ONLY[1:]:
        kw.pop(name)
    extra = {k: v for k, v in (("updates", updates), ("stage_updates", stage_updates)) if v is not None}
    cfg = ConsistencyConfig(teacher=teacher, steps=steps, **extra, **kw)
    # a bar on a terminal, else a progress line every 10 % / 30 s on stderr (nohup runs into a log); --quiet: none
    tuner = ConsistencyTuner(cfg, resume=resume, progress=not quiet, echo=click.echo)
    click.echo(f"consistency tuning {teacher}: {cfg.updates} updates ({cfg.stage_updates} per stage), from update "
               f"{tuner.update}; the student samples with lcm, {cfg.steps} steps on {tuner.grid()}")
    tuner.run()
