"""Benchmarks: time the reverse chain per engine x backend x dtype x batch, optionally against diffusers.

    from ddpm_deploy.bench import BenchSpec, run_benchmark
    report = run_benchmark(BenchSpec(engines=["eps.onnx"], batches=(1, 4), steps=20))

Per configuration (one engine on one backend at one batch size):
  * warm-up: one untimed chain of `warmup` steps at that batch (arenas, kernels and caches get ready);
  * `repeats` timed chains of `steps` steps through the public API (`Pipeline.sample`: seeded host noise, the
    sampler, uint8 images out), each with every raw engine call timed by the backend's own `engine_time` counter;
  * peak memory in a fresh subprocess (`memory`).
With a checkpoint, the same is measured for the PyTorch reference backend and for diffusers' DDPMPipeline
(DDIMPipeline for --sampler ddim) on the same weights, steps and batch, in this process, and every row gets
`speedup_vs_diffusers` = diffusers' whole-chain time / this row's. On backend auto the rows carry the table the
runtime chose from (`row["auto"]`). Modules: spec (the request), timing, sides (what is compared), memory,
report; the `bench` command is in ddpm_deploy.cli.
"""

from __future__ import annotations

from ..progress import Progress
from .memory import peak_memory, probe_spec
from .report import add_speedups, markdown_table, meta, start_facts, write_report
from .sides import checkpoint_rows, runtime_rows
from .spec import BenchSpec, default_threads, parse_int_list, parse_names
from .timing import median_ms, summarize


def run_benchmark(spec: BenchSpec, echo=print, progress: bool = False) -> dict:
    """Time everything `spec` asks for; returns {"meta": ..., "results": [row, ...]}. `progress`: a bar on a
    terminal, else a line every 10 % / 30 s on stderr, over the cells (and memory probes) to time."""
    start = start_facts()  # how busy the machine was before we started
    rows = []
    with Progress("bench", cells(spec), unit="cell", enabled=progress) as bar:
        tick = lambda: bar.update(1)  # noqa: E731
        for engine, backend, precision in spec.configurations():
            rows += runtime_rows(spec, engine, backend, precision, echo, tick)
        if spec.checkpoint is not None:
            rows += checkpoint_rows(spec, echo, tick)
        add_speedups(rows)
        if spec.memory:
            for row in rows:
                row.update(peak_memory(probe_spec(row)))
                echo(f"  memory {row['backend']:>18s} {row['dtype']:>4s} batch {row['batch']:3d}: "
                     f"peak {row.get('peak_rss_mb')} MB")
                tick()
    return {"meta": meta(spec, start), "results": rows}


def cells(spec: BenchSpec) -> int:
    """What `run_benchmark` times: a cell per side and batch size (and as many memory probes)."""
    sides = len(list(spec.configurations()))
    if spec.checkpoint is not None:
        sides += 2 if spec.torch_reference else 1  # our PyTorch reference, diffusers' pipeline
    return sides * len(spec.batches) * (2 if spec.memory else 1)


__all__ = ["BenchSpec", "run_benchmark", "markdown_table", "write_report", "add_speedups", "summarize", "median_ms",
           "default_threads", "parse_int_list", "parse_names"]
