"""`bench`: time sampling per backend x dtype x batch. Local imports: the benchmark package (numpy, the runtime),
see cli/common.py."""

from __future__ import annotations

import click

from .. import backend_registry as registry
from .common import (cap_threads, check_engine, check_outputs, cli, device_option, quiet_lines_option,
                     sampler_spec_options)

@cli.command()
@click.option("--engine", "engines", multiple=True, help=".onnx or .trt to time; repeat for several (fp32, fp16).")
@click.option("--checkpoint", default=None,
              help="The same model's checkpoint: adds the PyTorch reference and diffusers' pipeline side by side.")
@click.option("--backend", default=None,
              help=f"Comma-separated: {','.join(registry.names(with_auto=True, runtime=True))} (default: from the "
                   "file; .onnx on the CPU: auto, whose table is printed).")
@click.option("--precision", default=None, help="Comma-separated inference precisions of --backend "
              f"{' or '.join(registry.precision_backends())}: {','.join(registry.precisions())}.")
@device_option()
@click.option("--batch", "batch", default="1,4,8", show_default=True, help="Comma-separated batch sizes.")
@sampler_spec_options("ddpm", 20, seed=False, steps_help="Timed steps per chain (a strided plan, as `run --steps`; "
                       "all T are not needed for timing).")
@click.option("--repeats", type=int, default=5, show_default=True, help="Timed chains per configuration (their "
              "spread is reported; a cell spread wider than 10 % is marked noisy).")
@click.option("--warmup", type=int, default=3, show_default=True, help="Steps of the untimed warm-up chain.")
@click.option("--threads", type=int, default=None, callback=cap_threads,
              help="CPU threads for every side, at least 1, capped at the usable cores (default: all usable cores; "
              "PyTorch and diffusers: the cores other work leaves idle, as run/verify/eval; auto picks its own).")
@click.option("--no-memory", is_flag=True, help="Skip the peak-memory subprocess per configuration.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the full report.")
@click.option("--markdown", "md_path", type=click.Path(dir_okay=False), default=None, help="Write the table.")
@quiet_lines_option
def bench(engines, checkpoint, backend, precision, device, batch, sampling, repeats, warmup, threads, no_memory,
          json_path, md_path, quiet):
    """Time sampling per backend x dtype x batch: ms/step, images/s, loop overhead, peak memory."""
    from ..bench import BenchSpec, markdown_table, parse_int_list, parse_names, run_benchmark, write_report

    for engine in engines:
        check_engine(engine, None)  # a checkpoint goes to --checkpoint, not to a runtime row
    check_outputs(json_path, md_path)  # fail before a long run, not after it
    spec = BenchSpec(engines=engines, checkpoint=checkpoint, device=device, sampling=sampling, threads=threads,
                     warmup=warmup, repeats=repeats, memory=not no_memory,
                     # every registry name parses; BenchSpec then points the reference (torch) to --checkpoint
                     backends=parse_names(backend, registry.names(with_auto=True), "--backend"),
                     precisions=parse_names(precision, registry.precisions(), "--precision"),
                     batches=parse_int_list(batch, "--batch"))
    report = run_benchmark(spec, echo=click.echo, progress=not quiet)
    for choice in {r["engine"]: r["auto"] for r in report["results"] if r.get("auto")}.values():
        click.echo(choice["table_text"])
    write_report(report, json_path, md_path)
    click.echo(markdown_table(report), nl=False)
