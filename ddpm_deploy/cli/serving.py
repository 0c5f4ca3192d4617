"""`serve` and `generate`: the HTTP service and bulk generation on Ray. Local imports: the service, its web stack
and Ray (the serve extra, checked first), see cli/common.py."""

from __future__ import annotations

import sys

import click

from .. import backend_registry as registry
from ..errors import UserError
from ..extras import require_extra
from .common import cli, generate_engine_options, require_backend_extra, sampling_options, serve_engine_options

@cli.command()
@serve_engine_options
@click.option("--precision", type=click.Choice(registry.precisions()), default=None,
              help=f"Inference precision of --backend {' or '.join(registry.precision_backends())} (default "
                   f"{registry.precisions()[0]}).")
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
              help="POST /generate requests in flight; beyond: 503 at once (/healthz and /info are never refused).")
@click.option("--max-connections", type=click.IntRange(min=1), default=256, show_default=True,
              help="Open sockets, bounding file descriptors; beyond: the oldest idle one is closed, or the new one "
                   "is answered 503 when none is idle (embedded server).")
@click.option("--max-connections-per-client", type=click.IntRange(min=1), default=64, show_default=True,
              help="The same cap per remote address (behind a proxy all clients share the proxy's address: raise it "
                   "to --max-connections there).")
@click.option("--drain-timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="On SIGINT (Ctrl-C) or SIGTERM, seconds open requests get to finish before they are answered 503 "
                   "and the server exits 0 (embedded server).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True, help="info: one line per request (like uvicorn's access log) and at shutdown.")
@click.option("--quiet", is_flag=True, help="Warnings and errors only (--log-level warning).")
@click.option("--ray", "use_ray", is_flag=True, help="Run as a Ray Serve deployment (needs the serve extra).")
@click.option("--address", default=None, help="--ray: the cluster to join (default: start a local Ray).")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
              help="--ray: replicas, each with its own runtime.")
def serve(engine, device, backend, threads, precision, host, port, max_batch, max_n, batching, log_level, quiet,
          use_ray, address, replicas, **limits):
    """HTTP API: POST /generate, GET /healthz, GET /info, with step-level batching across requests."""
    from ..serve.service import ServeConfig

    # before the engine loads: each missing module is one line naming its extra, not a traceback at server start
    require_extra("serve", "serve" + " --ray" * use_ray, ("fastapi", "uvicorn") + ("ray",) * use_ray)
    require_backend_extra(backend)

    config = ServeConfig(engine=engine, max_batch=max_batch, max_n=max_n, device=device, backend=backend,
                         precision=precision, threads=threads, batching=batching, **limits)
    if use_ray:
        from ..serve.ray_app import run_ray_serve

        run_ray_serve(config, host=host, port=port, replicas=replicas, address=address, echo=click.echo)
    else:
        if address is not None or replicas != 1:
            raise UserError("--address and --replicas need --ray")
        from ..serve.app import run_embedded

        run_embedded(config, host=host, port=port, echo=click.echo, log_level="warning" if quiet else log_level)


@cli.command()
@generate_engine_options
@click.option("-n", "num", type=click.IntRange(min=1), default=None, help="Images in all.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Folder of shards and generate.json.")
@sampling_options
@click.option("--shard-size", type=click.IntRange(min=1), default=256, show_default=True, help="Images per shard.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Ray actors, one runtime each (default: the cluster's CPUs).")
@click.option("--ray-address", default=None, help="Ray cluster to use (default: start a local one, 2 CPUs).")
@click.option("--check", "check_dir", type=click.Path(file_okay=False), default=None,
              help="Verify the finished job in this folder instead (every shard's sha256, shape, dtype, finiteness; "
                   "no Ray needed): exit 0 if all good, else one line per bad shard and exit 1.")
def generate(engine, device, backend, threads, num, out, sampling, seed, shard_size, workers, ray_address, check_dir):
    """Bulk generation on Ray: shards of images (per-image seeds), resumable after a kill (run it again)."""
    from ..generate.job import GenerateSpec
    from ..generate.ray_driver import generate_on_ray

    if check_dir is not None:
        if engine is not None or num is not None or out is not None:
            raise click.UsageError("--check DIR verifies a finished folder: give it without --engine, -n and --out")
        _check_generated(check_dir)
        return
    for value, name in ((engine, "--engine"), (num, "-n"), (out, "--out")):
        if value is None:
            raise click.UsageError(f"Missing option '{name}' (or --check DIR to verify a finished job)")
    require_extra("serve", "generate", ("ray",))  # before the job file is written and Ray's workers start
    require_backend_extra(backend)
    spec = GenerateSpec(engine=engine, n=num, seed=seed, sampling=sampling, shard_size=shard_size, device=device,
                        backend=backend, threads=threads)
    generate_on_ray(spec, out, address=ray_address, workers=workers, echo=click.echo)


def _check_generated(folder: str) -> None:
    from ..generate.job import check_folder

    record, problems = check_folder(folder)
    for line in problems:
        click.echo(f"error: {line}", err=True)
    if problems:
        sys.exit(1)
    n, size = record["settings"]["n"], record["settings"]["shard_size"]
    click.echo(f"ok: {n} images in {-(-n // size)} shards in {folder}, each matching its recorded sha256, shape "
               "and dtype, all finite")
