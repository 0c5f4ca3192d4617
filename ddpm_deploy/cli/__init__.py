"""The `ddpm-deploy` command line: parse, call, print. Logic lives in the modules it calls.

One module per command group, each adding its commands to the `cli` group of cli/common.py (which also holds the
options they share): training (train, distill), models (export, build, info), sampling (run, verify, eval, demo),
serving (serve, generate), benchmark (bench). `main` is the entry point (pyproject: ddpm_deploy.cli:main).
"""

from __future__ import annotations

import sys

import click

from . import benchmark, models, sampling, serving, training  # noqa: F401  (each registers its commands on `cli`)
from .benchmark import bench
from .common import cap_threads, cli
from .models import build, export, info
from .sampling import RUN_CONFIRM_N, demo, eval_, run, verify
from .serving import generate, serve
from .training import distill, train


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


__all__ = ["main", "cli", "cap_threads", "RUN_CONFIRM_N", "train", "distill", "export", "build", "info", "run",
           "verify", "eval_", "demo", "serve", "generate", "bench"]
