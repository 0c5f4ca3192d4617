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


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="ddpm-deploy")
def cli():
    """Ship a DDPM: train -> export (ONNX) -> build (TensorRT) -> run -> verify."""


@cli.command()
@click.option("--data", default="digits", show_default=True, help="'digits', a folder of PNG/JPEG, or an .npz file.")
@click.option("--out", default="runs/digits", show_default=True, type=click.Path(file_okay=False))
@click.option("--preset", default="small", show_default=True, help="UNet size: tiny, small, cifar10.")
@click.option("--image-size", type=int, default=None, help="Resize images to this size (digits default 16).")
@click.option("--schedule", "beta_schedule", type=click.Choice(["linear", "cosine", "geometric"]), default="linear",
              show_default=True)
@click.option("-T", "--timesteps", "num_train_timesteps", type=int, default=1000, show_default=True)
@click.option("--beta-start", type=float, default=1e-4, show_default=True)
@click.option("--beta-end", type=float, default=0.02, show_default=True)
@click.option("--variance-type", type=click.Choice(["fixed_small", "fixed_large"]), default="fixed_small",
              show_default=True)
@click.option("--clip-sample/--no-clip-sample", default=True, show_default=True)
@click.option("--steps", type=int, default=8000, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--lr", type=float, default=5e-4, show_default=True)
@click.option("--ema-decay", type=float, default=0.995, show_default=True)
@click.option("--checkpoint-every", type=int, default=500, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--sample-n", type=int, default=64, show_default=True, help="Samples in the final grid (0: none).")
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.pt exactly where it stopped.")
def train(resume, **kw):
    """Train eps_theta with L_simple; writes OUT/model.pt and OUT/samples.png."""
    from .train.trainer import TrainConfig, Trainer, sample_grid
    from .images import save_grid, to_uint8

    cfg = TrainConfig(**kw)
    if cfg.steps <= 0 or cfg.batch_size <= 0:
        raise UserError("--steps and --batch-size must be positive")
    trainer = Trainer(cfg, resume=resume)
    click.echo(f"training on {len(trainer.x0)} images {tuple(trainer.x0.shape[1:])}, {cfg.beta_schedule} "
               f"schedule T={cfg.num_train_timesteps}, from step {trainer.step}")
    result = trainer.fit()
    click.echo(f"wrote {result['model']} after {result['steps']} steps in {result['seconds']:.0f}s "
               f"(final loss {result['final_loss']:.4f})")
    if cfg.sample_n > 0:
        t0 = time.time()
        path = save_grid(to_uint8(sample_grid(trainer, cfg.sample_n, seed=cfg.seed)), trainer.out / "samples.png")
        click.echo(f"wrote {path} ({cfg.sample_n} samples, {time.time() - t0:.0f}s)")


def main(argv=None):
    try:
        cli.main(args=argv, prog_name="ddpm-deploy", standalone_mode=True)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
