"""CPU benchmark: backend auto (the runtime's default for an .onnx on the CPU) against diffusers, in one process.

    python benchmarks/bench_cpu.py            # the figures (a few minutes on 2 cores, plus one-time exports)
    python benchmarks/bench_cpu.py --quick    # short chains: checks that it works, not for figures

What the issue asks for, each as a ratio measured in this one process (same machine state for both sides):
  shipped  ddpm_deploy/models/digits.pt (else preset "small" with random weights), DDPM 1000 steps, batch 1:
           auto >= 3x diffusers' DDPMPipeline; the loop's overhead around the engine <= 2 % of the chain;
  cifar10  the google/ddpm-cifar10-32 architecture (preset "cifar10", 35.7 M parameters, random weights: speed does
           not depend on the values), DDIM 50 steps, batch 1: auto >= 1.6x diffusers' DDIMPipeline.
Auto's choice is timed a second time with the numpy host loop (`fused_step=False`: the update, finiteness check
and noise per step in numpy, as before the CPU backends ran the fused step), so the report shows whether moving
the update into the engine saved time or only moved it out of the overhead figure.
Each model is exported once (fp32, max batch 8, parity-checked) under OUT/artifacts and reused while the weights
are the same. Backend auto times its CPU candidates in this process (its cache folder is OUT/cache, emptied at
the start unless --keep-auto-cache), so the table it chose from is part of the report; onnxruntime fp32 is timed
too, for reference. Timing and peak memory: ddpm_deploy.bench. Writes OUT/bench_cpu.json and OUT/bench_cpu.md
(OUT: benchmarks/results) and prints the Markdown.

Run it on an otherwise idle machine (the load average is recorded next to every figure): with other work on the
cores, torch's and onnxruntime's threads are preempted at random and the ratios mean little.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from importlib import resources
from pathlib import Path

from ddpm_deploy.bench import BenchSpec, default_threads, markdown_table, run_benchmark, write_report

OUT = Path(__file__).resolve().parent / "results"
MAX_BATCH = 8
TARGETS = {"shipped": 3.0, "cifar10": 1.6, "max_overhead": 0.02}
# per model: sampler, steps, rounds (each times every side once), warm-up steps
PLANS = {
    "full": {"shipped": ("ddpm", 1000, 5, 20), "cifar10": ("ddim", 50, 3, 2)},
    "quick": {"shipped": ("ddpm", 100, 2, 5), "cifar10": ("ddim", 5, 1, 1)},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short chains, fewer repeats (checks that it works)")
    p.add_argument("--out", type=Path, default=OUT, help="results folder (default benchmarks/results)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for diffusers and the onnxruntime row (default: all usable); auto picks its own")
    p.add_argument("--models", default="shipped,cifar10", help="comma-separated: shipped,cifar10")
    p.add_argument("--rounds", type=int, default=None, help="rounds per model (default: the plan's; fewer on a "
                   "busy machine: every side runs once per round)")
    p.add_argument("--memory", action="store_true", help="also measure peak memory (a subprocess per row)")
    p.add_argument("--keep-auto-cache", action="store_true", help="reuse auto's earlier choice instead of measuring")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------- models
def shipped_checkpoint(artifacts: Path) -> tuple[str, str]:
    """(checkpoint, note): the shipped digits model, or preset "small" with random weights when it is absent."""
    shipped = Path(str(resources.files("ddpm_deploy") / "models" / "digits.pt"))
    if shipped.is_file():
        return str(shipped), "shipped digits model (ddpm_deploy/models/digits.pt)"
    folder = random_pipeline(artifacts / "small-random", "small", image_size=16, channels=1)
    return str(folder), ("ddpm_deploy/models/digits.pt not present: preset 'small' (the shipped architecture, "
                         "1x16x16) with random weights")


def random_pipeline(folder: Path, preset: str, image_size: int, channels: int) -> Path:
    """A diffusers DDPM pipeline folder with seeded random UNet weights and DDPMScheduler's defaults
    (linear betas 1e-4..0.02, T=1000, fixed_small, clip_sample), written once."""
    if (folder / "model_index.json").is_file():
        return folder
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from ddpm_deploy.config import unet_config

    torch.manual_seed(0)
    unet = UNet2DModel.from_config(unet_config(preset, sample_size=image_size, channels=channels))
    log(f"writing {folder} ({sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M parameters, random weights)")
    DDPMPipeline(unet, DDPMScheduler()).save_pretrained(str(folder))
    return folder


def exported(checkpoint: str, out: Path, fp16: bool) -> str:
    """`out`, exported from `checkpoint` unless it already holds an export of the same weights."""
    from ddpm_deploy.nn import load_checkpoint
    from ddpm_deploy.errors import UserError
    from ddpm_deploy.export import onnx_from_checkpoint
    from ddpm_deploy.manifest import Manifest

    sha = load_checkpoint(checkpoint).sha256
    if out.is_file():
        try:
            m = Manifest.read(out)
            if m.source_sha256 == sha and m.max_batch >= MAX_BATCH:
                return str(out)
        except UserError:
            pass
    log(f"exporting {checkpoint} -> {out} (once; {'fp16' if fp16 else 'fp32'})")
    t0 = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx_from_checkpoint(checkpoint, out, fp16=fp16, max_batch=MAX_BATCH, audit=False, echo=lambda *_: None)
    log(f"  done in {time.time() - t0:.0f}s")
    return str(out)


def prepare(name: str, artifacts: Path, dtypes=("fp32",)) -> tuple[str, list[str], str]:
    """(checkpoint, [onnx per dtype], note) for one model."""
    if name == "shipped":
        ckpt, note = shipped_checkpoint(artifacts)
    else:
        ckpt = str(random_pipeline(artifacts / "cifar10-random", "cifar10", image_size=32, channels=3))
        note = "google/ddpm-cifar10-32 architecture (preset 'cifar10', 35.7 M parameters) with random weights"
    folder = artifacts / name
    engines = [exported(ckpt, folder / f"eps.{d}.onnx", d == "fp16") for d in dtypes]
    return ckpt, engines, note


# ---------------------------------------------------------------------------------------------------- timing
def sides(engine: str, ckpt: str, threads: int) -> list[dict]:
    """What one round times: auto (then its choice with the numpy host loop: `host_loop_rows`), onnxruntime fp32,
    diffusers on all threads and on one."""
    out = [{"engines": (engine,), "backends": ("auto",)}, {"engines": (engine,), "backends": ("onnxruntime",)},
           {"checkpoint": ckpt, "threads": threads}]
    return out + ([{"checkpoint": ckpt, "threads": 1}] if threads > 1 else [])


def host_loop_rows(engine: str, spec: BenchSpec, auto_row: dict) -> list[dict]:
    """Auto's choice again with the numpy host loop (`fused_step=False`: eps in the engine, the update, finiteness
    check and noise per step in numpy, as before issue 17): the same configuration, so the difference in whole-chain
    time is what moving the update into the engine gained, not just a change in what counts as engine time."""
    from ddpm_deploy.bench.sides import bench_pipeline, line
    from ddpm_deploy.runtime import load
    from ddpm_deploy.runtime.auto import Candidate

    auto = auto_row["auto"]
    options = Candidate(auto["backend"], auto["precision"], auto["threads"]).options()
    with load(engine, backend=auto["backend"], fused_step=False, **options) as pipe:
        rows = [{**{k: v for k, v in auto_row.items() if k not in ("auto",)}, **r,
                 "runtime_backend": "host-loop", "backend": f"{pipe.backend.name} (numpy host loop)"}
                for r in bench_pipeline(pipe, spec)]
    for r in rows:
        log(line(r))
    return rows


def interleaved(model, ckpt, engine, sampler, steps, repeats, warmup, threads, memory) -> dict:
    """`repeats` rounds, each timing every side once (ABCD ABCD ...): a change in the machine's load during the run
    hits every side alike instead of whichever ran at that moment. Rows: medians over the rounds."""
    rounds, meta = [], None
    for i in range(repeats):
        log(f"{model}: round {i + 1}/{repeats}")
        rows = []
        for side in sides(engine, ckpt, threads):
            spec = BenchSpec(**{"threads": threads, **side}, batches=(1,), steps=steps, sampler=sampler, repeats=1,
                             warmup=warmup, memory=memory and i == 0, model=model, torch_reference=False)
            r = run_benchmark(spec, echo=log)
            meta = meta or r["meta"]
            meta["machine"]["loadavg_1m_at_end"] = r["meta"]["machine"]["loadavg_1m_at_end"]
            rows += r["results"]
            if side.get("backends") == ("auto",):
                rows += host_loop_rows(engine, spec, r["results"][0])
        rounds.append(rows)
    return {"meta": meta, "results": [merge([rnd[j] for rnd in rounds]) for j in range(len(rounds[0]))]}


def merge(rows: list[dict]) -> dict:
    """One side's rows from several rounds: medians of the figures, every round's chain and engine times kept."""
    import statistics

    out = dict(rows[0])
    for key in ("ms_per_step", "engine_ms", "chain_ms", "images_per_s", "overhead"):
        out[key] = statistics.median(r[key] for r in rows)
    out["engine_ms_min"] = min(r["engine_ms_min"] for r in rows)
    out["chain_s"] = [t for r in rows for t in r["chain_s"]]
    out["engine_s"] = [t for r in rows for t in r["engine_s"]]
    out["repeats"] = len(out["chain_s"])
    return out


# ---------------------------------------------------------------------------------------------------- targets
def speedups_vs_best_diffusers(rows: list[dict]) -> None:
    """speedup_vs_diffusers = the faster diffusers run's whole chain (1 or all threads) / the row's."""
    best = {}
    for r in rows:
        if r["runtime_backend"] == "diffusers":
            key = (r["model"], r["batch"], r["steps"])
            best[key] = min(best.get(key, r["chain_ms"]), r["chain_ms"])
    for r in rows:
        base = best.get((r["model"], r["batch"], r["steps"]))
        r["speedup_vs_diffusers"] = base / r["chain_ms"] if base else None


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, each with the measured value, whether it is met, and the machine's load around it."""
    out = []
    for r in rows:
        if r["runtime_backend"] != "auto" or r["batch"] != 1:
            continue
        d_threads = [x["threads"] for x in rows if x["runtime_backend"] == "diffusers" and x["model"] == r["model"]]
        d_note = "faster of 1 thread / all" if len(d_threads) > 1 else f"on {d_threads[0]} thread(s)"
        out.append({"target": f"{r['model']}: auto ({r['backend']} {r['threads']}t) vs diffusers ({d_note}), "
                              f"{r['sampler'].upper()} {r['steps']}, batch 1",
                    "want": f">= {TARGETS[r['model']]:.1f}x", "got": f"{r['speedup_vs_diffusers']:.2f}x",
                    "met": r["speedup_vs_diffusers"] >= TARGETS[r["model"]], "load": r["load"]})
        if r["model"] == "shipped":
            out.append({"target": f"shipped: loop overhead of auto ({r['backend']}), batch 1",
                        "want": f"<= {100 * TARGETS['max_overhead']:.0f}%", "got": f"{100 * r['overhead']:.2f}%",
                        "met": r["overhead"] <= TARGETS["max_overhead"], "load": r["load"]})
        host = next((x for x in rows if x["runtime_backend"] == "host-loop" and x["model"] == r["model"]), None)
        if host is not None:  # not a target of the issue: shows the overhead fell because time was saved
            gain = host["chain_ms"] / r["chain_ms"]
            out.append({"target": f"{r['model']}: whole chain, update in the engine vs the numpy host loop (same "
                                  f"backend)", "want": "(information)", "got": f"{gain:.3f}x", "met": None,
                        "load": r["load"]})
    return out


def targets_markdown(items: list[dict]) -> str:
    lines = ["| target | want | measured | met | load average (1 min) before / after |", "|---|---|---|---|---|"]
    met = {True: "yes", False: "NO", None: "–"}
    lines += [f"| {t['target']} | {t['want']} | {t['got']} | {met[t['met']]} | {t['load']} |" for t in items]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    plan = PLANS["quick" if args.quick else "full"]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or any(m not in plan for m in models):
        sys.exit(f"--models must be a comma-separated subset of {','.join(plan)}")
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / "cache"
    os.environ["XDG_CACHE_HOME"] = str(cache)  # auto's choice (and OpenVINO's compiled models) for this run only
    if not args.keep_auto_cache:
        shutil.rmtree(cache / "ddpm-deploy" / "auto", ignore_errors=True)
    threads = args.threads or default_threads()
    load = os.getloadavg()[0]
    if load > 0.5 * default_threads():
        log(f"warning: load average {load:.1f} on {default_threads()} cores: other work is running, so the figures "
            "will not be representative")
    t0 = time.time()
    prepared = {m: prepare(m, args.out / "artifacts") for m in models}
    log(f"artifacts ready in {time.time() - t0:.0f}s")
    report = {"meta": None, "results": [], "models": {}}
    for m in models:
        ckpt, engines, note = prepared[m]
        sampler, steps, repeats, warmup = plan[m]
        repeats = args.rounds or repeats
        log(f"{m}: {note}; {sampler} {steps} steps, batch 1, {repeats} repeats")
        r = interleaved(m, ckpt, engines[0], sampler, steps, repeats, warmup, threads, args.memory)
        machine = r["meta"]["machine"]
        for row in r["results"]:
            row["load"] = f"{machine['loadavg_1m_at_start']} / {machine['loadavg_1m_at_end']}"
        report["meta"] = report["meta"] or r["meta"]
        report["results"] += r["results"]
        report["models"][m] = {"checkpoint": ckpt, "engines": engines, "note": note, "sampler": sampler,
                               "steps": steps, "load": row["load"],
                               "auto": next(x["auto"] for x in r["results"] if x.get("auto"))}
    speedups_vs_best_diffusers(report["results"])
    report["meta"].update(quick=args.quick, seconds=round(time.time() - t0, 1))
    report["meta"]["machine"]["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    for name in ("torch", "diffusers", "openvino"):  # imported by later sides than the first run's meta saw
        if name in sys.modules:
            report["meta"]["versions"][name] = getattr(sys.modules[name], "__version__", "?")
    report["targets"] = targets(report["results"])
    write_report(report, str(args.out / "bench_cpu.json"), None)
    md = render(report)
    (args.out / "bench_cpu.md").write_text(md)
    print(md)
    return 0


def render(report: dict) -> str:
    meta, machine = report["meta"], report["meta"]["machine"]
    head = [f"# CPU benchmark ({'quick run, not for figures' if meta['quick'] else 'full run'})", "",
            f"{machine['processor']} ({', '.join(machine['cpu_flags'])}), {machine['cpus_usable']} usable cores, "
            f"{meta['threads']} threads for diffusers and the onnxruntime row, auto's own choice for its row; "
            f"{meta['time']}; {json.dumps(meta['versions'])}.", ""]
    for m, v in report["models"].items():
        head += [f"- **{m}**: {v['note']}; {v['sampler'].upper()} {v['steps']} steps per chain, batch 1 (diffusers: "
                 f"num_inference_steps={v['steps']}); load average {v['load']}.", "",
                 "```", v["auto"]["table_text"], "```", ""]
    body = markdown_table(report).split("\n", 2)[2]  # drop the one-steps-count header line: steps differ by model
    notes = ["", "ms/step: median step (engine call + host work); engine ms: median raw network call; images/s at "
             "the timed number of steps; loop overhead = (whole chain - sum of engine calls) / whole chain; "
             "vs diffusers: the faster diffusers run's whole-chain time (1 thread or all) / ours, same weights, "
             "sampler, steps and batch. "
             f"{meta['memory']}"]
    return "\n".join(head + [targets_markdown(report["targets"]), body] + notes) + "\n"


if __name__ == "__main__":
    sys.exit(main())
