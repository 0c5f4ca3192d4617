"""Benchmarks: time the reverse chain per engine x backend x dtype x batch, optionally against diffusers.

Per configuration (one engine on one backend at one batch size):
  * warm-up: one untimed chain of `warmup` steps at that batch (arenas, kernels and caches get ready);
  * `repeats` timed chains of `steps` steps through the public API (`Pipeline.sample`: seeded host noise, the
    sampler, uint8 images out), each with every raw engine call timed in place (the backend's own `engine_time` counter);
  * peak memory in a fresh subprocess (see `peak_memory`).
Reported (medians; `*_s` lists keep every repeat):
  ms_per_step   median interval between consecutive engine-call starts (one step: engine + host work)
  engine_ms     median raw engine call
  images_per_s  batch / whole-chain seconds, at `steps` steps (a chain of T steps takes T/steps longer)
  overhead      (whole chain - sum of engine calls) / whole chain: what the runtime adds around the engine
With a checkpoint, the same is measured for the PyTorch reference backend and for diffusers' DDPMPipeline
(DDIMPipeline for --sampler ddim) on the same weights, steps and batch, in this process, and every row gets
`speedup_vs_diffusers` = diffusers' whole-chain time / this row's.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np

from .errors import UserError

RUNTIME_BACKENDS = ("onnxruntime", "openvino", "tensorrt")
CPU_THREADED = ("onnxruntime", "openvino", "torch")
SHORT_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
MEMORY_NOTE = ("peak_rss_mb: peak resident set (Linux VmHWM) of a fresh process that imported the side's library, "
               "loaded the model and ran a 1-step chain at this batch; baseline_rss_mb: that process after the "
               "imports, before loading. The difference is what the model, its runtime and activations add.")


# ---------------------------------------------------------------------------------------------------- inputs
def parse_int_list(text: str, what: str) -> list[int]:
    """'1,4,8' -> [1, 4, 8]; positive integers only."""
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what} must be comma-separated positive integers like 1,4,8, got {text!r}") from None
    if not values or min(values) <= 0:
        raise UserError(f"{what} must be comma-separated positive integers like 1,4,8, got {text!r}")
    return sorted(set(values))


def parse_names(text: str | None, allowed: tuple, what: str) -> list:
    """'a,b' -> ['a', 'b'], each one of `allowed`; None -> [None] (the default)."""
    if text is None:
        return [None]
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in allowed]
    if not names or bad:
        raise UserError(f"{what} must be one or more of {', '.join(allowed)} (comma-separated), got {text!r}")
    return names


def default_threads() -> int:
    """The cores this process may run on: one explicit number for every library, so the sides are comparable."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------------- timing
def median_ms(fn, warmup: int, reps: int) -> float:
    """Median wall time of `fn()` in ms over `reps` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


class ModuleTimer:
    """Times every forward of a torch module with hooks (diffusers calls `unet(...)`, which fires them)."""

    def __init__(self, module):
        self.module, self.calls, self._start, self._hooks = module, [], 0.0, []

    def __enter__(self):
        def pre(*_):
            self._start = time.perf_counter()

        def post(*_):
            self.calls.append((self._start, time.perf_counter() - self._start))

        self._hooks = [self.module.register_forward_pre_hook(pre), self.module.register_forward_hook(post)]
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        return False


def measure(run, calls: list, repeats: int) -> dict:
    """Call `run(i)` for i < `repeats` (one timed chain each); `calls` is the timer's (start, seconds) list."""
    totals, engine_sums, durations, intervals = [], [], [], []
    for r in range(repeats):
        calls.clear()
        t0 = time.perf_counter()
        run(r)
        totals.append(time.perf_counter() - t0)
        starts = [s for s, _ in calls]
        durations += [d for _, d in calls]
        engine_sums.append(sum(d for _, d in calls))
        intervals += np.diff(starts).tolist()
    return {"chain_s": totals, "engine_s": engine_sums, "engine_calls": len(durations), "durations": durations,
            "intervals": intervals}


def summarize(raw: dict, batch: int, steps: int) -> dict:
    """Medians and ratios from `measure`'s raw times."""
    if not raw["durations"]:
        raise UserError("no engine call was timed: the backend did not count its engine time")
    chain = statistics.median(raw["chain_s"])
    overheads = [(t - e) / t for t, e in zip(raw["chain_s"], raw["engine_s"])]
    per_step = statistics.median(raw["intervals"]) if raw["intervals"] else chain / steps
    return {"batch": batch, "steps": steps, "repeats": len(raw["chain_s"]),
            "ms_per_step": 1000 * per_step, "engine_ms": 1000 * statistics.median(raw["durations"]),
            "engine_ms_min": 1000 * min(raw["durations"]), "chain_ms": 1000 * chain,
            "images_per_s": batch / chain, "overhead": statistics.median(overheads),
            "chain_s": raw["chain_s"], "engine_s": raw["engine_s"], "engine_calls": raw["engine_calls"]}


# ---------------------------------------------------------------------------------------------------- sides
def resolve_backend(path: str, backend: str | None) -> str:
    """The backend `runtime.load` picks: the one named, else the file's (.onnx: onnxruntime, .trt: tensorrt)."""
    from .manifest import kind_of

    return backend or {"onnx": "onnxruntime", "tensorrt": "tensorrt", "checkpoint": "torch"}[kind_of(path)]


def open_runtime(path: str, backend: str | None, device: str, precision: str | None, threads: int | None):
    """A runtime Pipeline; `threads` goes to CPU backends, `precision` to OpenVINO only."""
    from .pipelines import open_pipeline

    name = resolve_backend(path, backend)
    opts = {}
    if threads and name in CPU_THREADED and device == "cpu":
        opts["threads"] = threads
    if precision:
        opts["precision"] = precision
    try:
        return open_pipeline(path, device=device, backend=name, **opts)
    except (ImportError, TypeError) as e:  # a backend missing from this install, or an option it does not take
        raise UserError(f"cannot open {path} on backend {name}: {str(e).splitlines()[0]}") from None


def dtype_label(pipe, precision: str | None) -> str:
    if precision:
        return precision
    dtype = pipe.manifest.dtype
    return SHORT_DTYPES.get(dtype, dtype)


def bench_pipeline(pipe, batches, steps: int, sampler: str, warmup: int, repeats: int) -> list[dict]:
    """Time `pipe` (a runtime Pipeline) at each batch size."""
    too_big = [b for b in batches if b > pipe.backend.max_batch]
    if too_big:
        raise UserError(f"batch {too_big[0]} is over this engine's maximum {pipe.backend.max_batch}: re-export with "
                        f"--max-batch {max(batches)} or choose --batch up to {pipe.backend.max_batch}")
    pipe.plan(sampler, steps)  # a bad --steps / --sampler fails here, before anything runs
    rows = []
    for b in batches:
        def chain(seed, k=steps, b=b):
            pipe.sample(b, seed=seed, sampler=sampler, steps=k, batch_size=b)

        if warmup:
            chain(0, min(warmup, pipe.schedule.T))
        calls = pipe.backend.engine_time.record()
        try:
            rows.append(summarize(measure(chain, calls, repeats), b, steps))
        finally:
            pipe.backend.engine_time.stop()
    return rows


def diffusers_pipeline(checkpoint: str, sampler: str):
    """diffusers' DDPMPipeline (or DDIMPipeline) on the checkpoint's weights and exact betas."""
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

    from .nn import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    common = {"num_train_timesteps": ckpt.schedule.T, "trained_betas": np.asarray(ckpt.schedule.betas),
              "clip_sample": ckpt.clip_sample, "clip_sample_range": ckpt.clip_sample_range,
              "prediction_type": "epsilon"}
    if sampler == "ddpm":
        pipe = DDPMPipeline(ckpt.build_unet(), DDPMScheduler(variance_type=ckpt.variance_type, **common))
    else:
        pipe = DDIMPipeline(ckpt.build_unet(), DDIMScheduler(**common))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bench_diffusers(pipe, batches, steps: int, warmup: int, repeats: int) -> list[dict]:
    """Time diffusers' pipeline end to end (noise, UNet, scheduler, numpy output) at each batch size."""
    import torch

    T = pipe.scheduler.config.num_train_timesteps
    if not 1 <= steps <= T:
        raise UserError(f"--steps must be between 1 and T={T}, got {steps}")
    rows = []
    for b in batches:
        def chain(seed, k=steps, b=b):
            pipe(batch_size=b, generator=torch.Generator("cpu").manual_seed(seed), num_inference_steps=k,
                 output_type="np")

        with torch.inference_mode():
            if warmup:
                chain(0, min(warmup, T))
            with ModuleTimer(pipe.unet) as timer:
                rows.append(summarize(measure(chain, timer.calls, repeats), b, steps))
    return rows


# ---------------------------------------------------------------------------------------------------- memory
PROBE = "import sys; from ddpm_deploy.bench import memory_probe; memory_probe(sys.argv[1])"


def peak_memory(spec: dict, timeout: float = 900) -> dict:
    """Run `memory_probe(spec)` in a fresh interpreter; returns its RSS figures (or the error it hit)."""
    try:
        r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(spec)], capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"peak_rss_mb": None, "memory_error": f"probe timed out after {timeout:.0f}s"}
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return {"peak_rss_mb": None, "memory_error": tail[:300]}
    return json.loads(lines[-1])


def _maxrss_mb() -> float:
    """This process's peak resident set. Linux: VmHWM, because ru_maxrss survives fork+exec and would report
    the (bigger) parent's RSS; elsewhere ru_maxrss (bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # kB
    except (OSError, StopIteration):
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def memory_probe(arg: str) -> None:
    """Subprocess body: import the side's library, note RSS, load the model, run a short chain, print RSS."""
    spec = json.loads(arg)
    side, b, k = spec["side"], spec["batch"], spec["steps"]
    if side == "diffusers" or spec.get("backend") == "torch":
        import diffusers  # noqa: F401  (imports torch)
        import torch

        torch.set_num_threads(spec["threads"])
    elif spec.get("backend") == "openvino":
        import openvino  # noqa: F401
    else:
        import onnxruntime  # noqa: F401
    baseline = _maxrss_mb()
    if side == "diffusers":
        pipe = diffusers_pipeline(spec["checkpoint"], spec["sampler"])
        with torch.inference_mode():
            pipe(batch_size=b, num_inference_steps=k, output_type="np")
    else:
        with open_runtime(spec["engine"], spec["backend"], spec["device"], spec.get("precision"),
                          spec["threads"]) as pipe:
            pipe.sample(b, seed=0, sampler=spec["sampler"], steps=k, batch_size=b)
    print(json.dumps({"baseline_rss_mb": round(baseline, 1), "peak_rss_mb": round(_maxrss_mb(), 1)}))


# ---------------------------------------------------------------------------------------------------- driver
def run_benchmark(engines=(), checkpoint: str | None = None, *, backends=(None,), precisions=(None,),
                  device: str = "cpu", batches=(1, 4, 8), steps: int = 20, sampler: str = "ddpm",
                  threads: int | None = None, warmup: int = 3, repeats: int = 3, memory: bool = True,
                  model: str | None = None, torch_reference: bool = True, echo=print) -> dict:
    """Time every engine x backend x precision x batch (and with `checkpoint`, diffusers' pipeline and, unless
    `torch_reference` is False, the PyTorch reference backend); returns {"meta": ..., "results": [row, ...]}."""
    engines, batches = [str(e) for e in engines], sorted(set(int(b) for b in batches))
    _check_request(engines, checkpoint, backends, precisions, batches, steps, repeats, warmup)
    threads = threads or default_threads()
    start = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg_1m": _loadavg()}  # how busy the machine was
    model = model or _model_name(engines, checkpoint)
    common = {"model": model, "sampler": sampler, "device": device, "threads": threads}
    rows = []
    for engine in engines:
        for backend in backends:
            for precision in precisions if backend == "openvino" else (None,):
                rows += _bench_engine(engine, backend, precision, device, threads, batches, steps, sampler, warmup,
                                      repeats, common, checkpoint, echo)
    if checkpoint is not None:
        rows += _bench_checkpoint(checkpoint, threads, batches, steps, sampler, warmup, repeats, common,
                                  torch_reference, echo)
    add_speedups(rows)
    if memory:
        for row in rows:
            row.update(peak_memory(_probe_spec(row, threads)))
            echo(f"  memory {row['backend']:>18s} {row['dtype']:>4s} batch {row['batch']:3d}: "
                 f"peak {row.get('peak_rss_mb')} MB")
    return {"meta": _meta(start, threads, steps, sampler, warmup, repeats, memory), "results": rows}


def _check_request(engines, checkpoint, backends, precisions, batches, steps, repeats, warmup) -> None:
    if not engines and checkpoint is None:
        raise UserError("nothing to time: give --engine PATH (repeatable) and/or --checkpoint CKPT")
    for e in engines:
        if not Path(e).exists():
            raise UserError(f"engine {e} not found: export one with `ddpm-deploy export CHECKPOINT -o {e}`")
    if "torch" in backends:
        raise UserError("--backend torch is the PyTorch reference: give --checkpoint CKPT instead")
    if any(precisions) and "openvino" not in backends:
        raise UserError("--precision applies to --backend openvino only")
    if not batches or min(batches) <= 0:
        raise UserError(f"batch sizes must be positive, got {batches}")
    if steps <= 0 or repeats <= 0 or warmup < 0:
        raise UserError(f"--steps and --repeats must be positive and --warmup >= 0, got {steps}, {repeats}, {warmup}")


def _model_name(engines, checkpoint) -> str:
    return Path(str(checkpoint or engines[0])).name


def _bench_engine(engine, backend, precision, device, threads, batches, steps, sampler, warmup, repeats, common,
                  checkpoint, echo) -> list[dict]:
    with open_runtime(engine, backend, device, precision, threads) as pipe:
        if checkpoint is not None:
            _check_same_model(pipe.manifest, checkpoint, engine)
        base = {**common, "engine": engine, "backend": pipe.backend.name, "dtype": dtype_label(pipe, precision),
                "precision": precision, "runtime_backend": resolve_backend(engine, backend)}
        rows = [{**base, **r} for r in bench_pipeline(pipe, batches, steps, sampler, warmup, repeats)]
    for r in rows:
        echo(_line(r))
    return rows


def _bench_checkpoint(checkpoint, threads, batches, steps, sampler, warmup, repeats, common, torch_reference,
                      echo) -> list[dict]:
    """The PyTorch reference through our runtime, then diffusers' own pipeline, on the same weights."""
    import torch

    torch.set_num_threads(threads)
    rows = []
    if torch_reference:
        with open_runtime(checkpoint, "torch", "cpu", None, threads) as pipe:
            base = {**common, "engine": checkpoint, "backend": pipe.backend.name, "dtype": "fp32",
                    "precision": None, "runtime_backend": "torch"}
            rows += [{**base, **r} for r in bench_pipeline(pipe, batches, steps, sampler, warmup, repeats)]
    pipe = diffusers_pipeline(checkpoint, sampler)
    base = {**common, "engine": checkpoint, "backend": f"diffusers-{type(pipe).__name__}", "dtype": "fp32",
            "precision": None, "runtime_backend": "diffusers", "device": "cpu"}
    rows += [{**base, **r} for r in bench_diffusers(pipe, batches, steps, warmup, repeats)]
    for r in rows:
        echo(_line(r))
    return rows


def _check_same_model(manifest, checkpoint: str, engine: str) -> None:
    """A comparison is only fair on the same weights: the engine must come from this checkpoint."""
    from .nn import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    source = manifest.source_sha256
    if source and ckpt.sha256 and source != ckpt.sha256:
        raise UserError(f"{engine} was exported from other weights than {checkpoint} (sha256 {source[:12]} vs "
                        f"{ckpt.sha256[:12]}): export it from this checkpoint, or leave out --checkpoint")


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_diffusers = diffusers' whole-chain time / the row's, for the same model, batch and steps."""
    ref = {(r["model"], r["batch"], r["steps"]): r["chain_ms"] for r in rows if r["runtime_backend"] == "diffusers"}
    for r in rows:
        base = ref.get((r["model"], r["batch"], r["steps"]))
        r["speedup_vs_diffusers"] = base / r["chain_ms"] if base else None


def _probe_spec(row: dict, threads: int, steps: int = 1) -> dict:
    """One step is enough: the first call at a batch size allocates everything later steps reuse."""
    side = "diffusers" if row["runtime_backend"] == "diffusers" else "runtime"
    return {"side": side, "engine": row["engine"], "checkpoint": row["engine"], "backend": row["runtime_backend"],
            "device": row["device"], "precision": row["precision"], "batch": row["batch"], "steps": steps,
            "sampler": row["sampler"], "threads": row.get("threads", threads)}


def _meta(start, threads, steps, sampler, warmup, repeats, memory) -> dict:
    import onnxruntime

    versions = {"python": platform.python_version(), "numpy": np.__version__, "onnxruntime": onnxruntime.__version__}
    for name in ("torch", "diffusers", "openvino"):
        if name in sys.modules:
            versions[name] = getattr(sys.modules[name], "__version__", "?")
    return {"machine": {"platform": platform.platform(), "processor": _cpu_name(), "cpus_usable": default_threads(),
                        "loadavg_1m_at_start": start["loadavg_1m"], "loadavg_1m_at_end": _loadavg()},
            "versions": versions, "threads": threads, "steps": steps, "sampler": sampler, "warmup_steps": warmup,
            "repeats": repeats, "memory": MEMORY_NOTE if memory else "not measured (--no-memory)",
            "time": start["time"]}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _loadavg():
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------------- output
def _line(r: dict) -> str:
    return (f"  {r['backend']:>24s} {r['dtype']:>4s} {r['threads']}t batch {r['batch']:3d}: "
            f"{r['ms_per_step']:9.2f} ms/step (engine {r['engine_ms']:8.2f} ms)  {r['images_per_s']:8.2f} img/s "
            f"@ {r['steps']} steps  overhead {100 * r['overhead']:5.2f}%")


COLUMNS = ("model", "backend", "dtype", "threads", "batch", "ms/step", "engine ms", "images/s", "loop overhead",
           "peak RSS MB", "vs diffusers")


def markdown_table(report: dict) -> str:
    """One row per configuration; images/s at the timed number of steps (see the header)."""
    meta = report["meta"]
    lines = [f"Steps per chain: {meta['steps']} ({meta['sampler']}), threads: {meta['threads']}, "
             f"repeats: {meta['repeats']}, images/s at {meta['steps']} steps.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in report["results"]:
        sp = r.get("speedup_vs_diffusers")
        peak = r.get("peak_rss_mb")
        cells = (r["model"], r["backend"], r["dtype"], str(r.get("threads", "")), str(r["batch"]),
                 f"{r['ms_per_step']:.2f}", f"{r['engine_ms']:.2f}", f"{r['images_per_s']:.2f}",
                 f"{100 * r['overhead']:.2f}%", "–" if peak is None else f"{peak:.0f}",
                 "–" if not sp else f"{sp:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def check_outputs(*paths) -> None:
    """Fail before a long run, not after it."""
    for path in paths:
        if path and not Path(path).parent.exists():
            raise UserError(f"output folder {Path(path).parent} does not exist: create it first")


def write_report(report: dict, json_path: str | None, md_path: str | None) -> None:
    from .files import write_bytes_atomic

    check_outputs(json_path, md_path)
    for path, text in ((json_path, json.dumps(report, indent=2, default=float)), (md_path, markdown_table(report))):
        if path:
            write_bytes_atomic(text.encode(), path)


# ---------------------------------------------------------------------------------------------------- command
@click.command("bench")
@click.option("--engine", "engines", multiple=True, help=".onnx or .trt to time; repeat for several (fp32, fp16).")
@click.option("--checkpoint", default=None,
              help="The same model's checkpoint: adds the PyTorch reference and diffusers' pipeline side by side.")
@click.option("--backend", default=None, help="Comma-separated: onnxruntime,openvino,tensorrt (default: from file).")
@click.option("--precision", default=None, help="Comma-separated OpenVINO inference precisions: fp32,bf16.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True,
              help="onnxruntime execution provider.")
@click.option("--batch", "batch", default="1,4,8", show_default=True, help="Comma-separated batch sizes.")
@click.option("--steps", type=int, default=20, show_default=True,
              help="Timed steps per chain (a strided plan, as `run --steps`; all T are not needed for timing).")
@click.option("--sampler", type=click.Choice(["ddpm", "ddim"]), default="ddpm", show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True, help="Timed chains per configuration.")
@click.option("--warmup", type=int, default=3, show_default=True, help="Steps of the untimed warm-up chain.")
@click.option("--threads", type=int, default=None, help="CPU threads for every side (default: all usable cores).")
@click.option("--no-memory", is_flag=True, help="Skip the peak-memory subprocess per configuration.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the full report.")
@click.option("--markdown", "md_path", type=click.Path(dir_okay=False), default=None, help="Write the table.")
def bench(engines, checkpoint, backend, precision, device, batch, steps, sampler, repeats, warmup, threads,
          no_memory, json_path, md_path):
    """Time sampling per backend x dtype x batch: ms/step, images/s, loop overhead, peak memory."""
    if threads is not None and threads <= 0:
        raise UserError(f"--threads must be positive, got {threads}")
    check_outputs(json_path, md_path)
    backends = parse_names(backend, RUNTIME_BACKENDS + ("torch",), "--backend")  # torch: refused with a hint
    report = run_benchmark(engines, checkpoint, backends=backends,
                           precisions=parse_names(precision, ("fp32", "bf16"), "--precision"), device=device,
                           batches=parse_int_list(batch, "--batch"), steps=steps, sampler=sampler, threads=threads,
                           warmup=warmup, repeats=repeats, memory=not no_memory, echo=click.echo)
    write_report(report, json_path, md_path)
    click.echo(markdown_table(report), nl=False)
