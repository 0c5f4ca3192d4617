"""CPU benchmarks, one script; each mode times all its sides in one process, so the ratios share the machine's state.

    python benchmarks/bench_cpu.py              # auto vs diffusers: the speed targets (a few minutes on 2 cores)
    python benchmarks/bench_cpu.py --quick      # short chains: checks that it works, not for figures
    python benchmarks/bench_cpu.py --fused-ab   # fused step vs numpy host loop per CPU backend (about 3 min)
    python benchmarks/bench_cpu.py --openvino   # OpenVINO fp32/bf16 vs onnxruntime and diffusers, bf16 PSNR

Default mode, what the issue asks for, each as a ratio measured in this one process:
  shipped  ddpm_deploy/models/digits.pt (else preset "small" with random weights), DDPM 1000 steps, batch 1:
           auto >= 3x diffusers' DDPMPipeline; the loop's overhead around the engine <= 2 % of the chain;
  cifar10  the google/ddpm-cifar10-32 architecture (preset "cifar10", 35.7 M parameters, random weights: speed does
           not depend on the values), DDIM 50 steps, batch 1: auto >= 1.6x diffusers' DDIMPipeline.
Auto's choice is timed again with the numpy host loop (`fused_step=False`), so the report shows whether moving the
update into the engine saved time or only moved it out of the overhead figure. Auto times its CPU candidates in
this process (cache OUT/cache, emptied first unless --keep-auto-cache), so the table it chose from is part of the
report; onnxruntime fp32 is timed too. Timing and memory: ddpm_deploy.bench. Writes OUT/bench_cpu.json and .md.

--fused-ab: the fused step (update inside the engine, runtime.cpu_steps) against the numpy host loop per CPU
backend (--configs), --models (default shipped), DDPM --steps (default T), batch 1, --threads (default 1: steadier
on a shared VM); --quick: 1 round of 1 chain of 20 steps. Rounds alternate A B B A ...; each opens its backend, warms it up, times --reps whole chains (default 3) and
closes it, so only one compiled model is alive at a time (several OpenVINO models in one process disturb each
other's timings on 2 cores). Per backend: median chain ms and loop overhead of each loop, and host / fused chain
time (> 1: the fused step is faster) with its range over rounds. Writes OUT/fused_ab.json and .md.

--openvino: per model (default cifar10,shipped) and batch (default 1,8): one eps call (median of --reps after
--warmup) on onnxruntime fp32, OpenVINO fp32, OpenVINO bf16 (where the CPU has bf16) and the diffusers UNet in
torch eager, and whole chains (DDPM and DDIM, --steps steps, default 8) per step on each, against diffusers'
DDPMPipeline / DDIMPipeline on the same weights; eps only for OpenVINO with a dynamic batch axis and without the
GroupNorm rewrite (the backend's defaults, checked). Then bf16 against fp32 on OpenVINO: max|d-eps| at four t
and, for --psnr-models, the PSNR of DDIM (--psnr-steps) final samples from the same noise, judged by the verify
tolerances. Writes OUT/openvino_cpu.json and .md.

Models: benchmarks/common.py, exported once under OUT/artifacts (fp32, max batch 8, parity-checked) and reused
while the weights are the same. OUT: benchmarks/results (--out). Run on an otherwise idle machine (the load
average is recorded next to every figure): with other work on the cores, threads are preempted at random and the
ratios mean little.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from common import (MODELS, OUT, ab_markdown, log, machine, ov_markdown, ov_ratios, ov_targets, prepare, render,
                    targets, versions, write_outputs)
from ddpm_deploy.bench import BenchSpec, add_speedups, default_threads, median_ms, run_benchmark

# per model: sampler, steps, rounds (each times every side once), warm-up steps
PLANS = {"full": {"shipped": ("ddpm", 1000, 5, 20), "cifar10": ("ddim", 50, 3, 2)},
         "quick": {"shipped": ("ddpm", 100, 2, 5), "cifar10": ("ddim", 5, 1, 1)}}
# --fused-ab: row name -> (backend, options); --openvino: its rows (eps-only rows check the backend's defaults)
AB_CONFIGS = {"onnxruntime fp32": ("onnxruntime", {}), "openvino fp32": ("openvino", {"precision": "fp32"}),
              "openvino bf16": ("openvino", {"precision": "bf16"})}
NO_CACHE = {"cache_dir": ""}  # OpenVINO compiles afresh for each row: no compiled model shared between rows
OV_ROWS = {"onnxruntime-fp32": ("onnxruntime", {}), "openvino-fp32": ("openvino", {"precision": "fp32", **NO_CACHE}),
           "openvino-bf16": ("openvino", {"precision": "bf16", **NO_CACHE}),
           "openvino-fp32-dynamic": ("openvino", {"precision": "fp32", "static_shapes": False, **NO_CACHE}),
           "openvino-fp32-as-exported": ("openvino", {"precision": "fp32", "rewrites": False, **NO_CACHE})}
EPS_ONLY_ROWS = ("openvino-fp32-dynamic", "openvino-fp32-as-exported")
# Options of one mode only (None unless given): another mode refuses them instead of ignoring them.
MODE_OPTIONS = {"auto": {"memory", "keep_auto_cache", "rounds"}, "fused_ab": {"configs", "reps", "steps", "rounds"},
                "openvino": {"batches", "warmup", "reps", "steps", "psnr_steps", "psnr_n", "psnr_models"}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--fused-ab", action="store_true", help="fused step vs numpy host loop per CPU backend")
    mode.add_argument("--openvino", action="store_true", help="OpenVINO vs onnxruntime and diffusers, bf16 PSNR")
    p.add_argument("--quick", action="store_true", help="short chains, fewer repeats (checks that it works)")
    p.add_argument("--out", type=Path, default=OUT, help="results folder (default benchmarks/results)")
    p.add_argument("--threads", type=int, default=None, help="threads (default: all usable for diffusers and the "
                   "onnxruntime row, auto picks its own; --fused-ab 1; --openvino each library's own)")
    p.add_argument("--models", default=None, help="comma-separated: shipped,cifar10 (--openvino: cifar10,shipped)")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default: the plan's; --fused-ab 4; fewer on a "
                   "busy machine: every side runs once per round)")
    p.add_argument("--reps", type=int, default=None, help="--fused-ab: chains per round (3); --openvino: timed calls "
                   "per figure (5, quick 3)")
    p.add_argument("--steps", type=int, default=None, help="--fused-ab: DDPM steps per chain (T); --openvino: "
                   "steps of the whole-chain timings (8, quick 4)")
    p.add_argument("--memory", action="store_true", default=None, help="also measure peak memory (subprocesses)")
    p.add_argument("--keep-auto-cache", action="store_true", default=None,
                   help="reuse auto's earlier choice instead of measuring")
    p.add_argument("--configs", default=None, help=f"--fused-ab: comma-separated subset of {', '.join(AB_CONFIGS)}")
    p.add_argument("--batches", default=None, help="--openvino: comma-separated batch sizes <= 8 (default 1,8)")
    p.add_argument("--warmup", type=int, default=None, help="--openvino: warm-up calls (default 2; quick 1)")
    p.add_argument("--psnr-steps", type=int, default=None, help="--openvino: DDIM steps of the bf16 PSNR (50; quick 10)")
    p.add_argument("--psnr-n", type=int, default=None, help="--openvino: images in the bf16 PSNR run (16)")
    p.add_argument("--psnr-models", default=None, help="--openvino: models that get the bf16 PSNR run (shipped)")
    args = p.parse_args(argv)
    args.mode = "fused_ab" if args.fused_ab else "openvino" if args.openvino else "auto"
    foreign = sorted(set().union(*MODE_OPTIONS.values()) - MODE_OPTIONS[args.mode])
    given = [f"--{k.replace('_', '-')}" for k in foreign if getattr(args, k) is not None]
    if given:
        mode_name = "the default mode" if args.mode == "auto" else "--" + args.mode.replace("_", "-")
        p.error(f"{', '.join(given)}: not an option of {mode_name} (see --help)")
    default_models = {"auto": "shipped,cifar10", "fused_ab": "shipped", "openvino": "cifar10,shipped"}[args.mode]
    args.models = [m.strip() for m in (args.models or default_models).split(",") if m.strip()]
    if not args.models or any(m not in MODELS for m in args.models):
        p.error(f"--models must be a comma-separated subset of {','.join(MODELS)}")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be at least 1")
    return args


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
    from ddpm_deploy.runtime.auto_check import Candidate

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
    out = dict(rows[0])
    for key in ("ms_per_step", "engine_ms", "chain_ms", "images_per_s", "overhead"):
        out[key] = statistics.median(r[key] for r in rows)
    out["engine_ms_min"] = min(r["engine_ms_min"] for r in rows)
    out["chain_s"] = [t for r in rows for t in r["chain_s"]]
    out["engine_s"] = [t for r in rows for t in r["engine_s"]]
    out["repeats"] = len(out["chain_s"])
    return out


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["XDG_CACHE_HOME"] = str(args.out / "cache")  # auto's choice, OpenVINO's compiled models: this run's
    load = os.getloadavg()[0]
    if load > 0.5 * default_threads():
        log(f"warning: load average {load:.1f} on {default_threads()} cores: other work is running, so the figures "
            "will not be representative")
    return {"auto": auto_vs_diffusers, "fused_ab": fused_ab, "openvino": openvino}[args.mode](args)


def auto_vs_diffusers(args) -> int:
    plan = PLANS["quick" if args.quick else "full"]
    if not args.keep_auto_cache:
        shutil.rmtree(args.out / "cache" / "ddpm-deploy" / "auto", ignore_errors=True)
    threads = args.threads or default_threads()
    t0 = time.time()
    prepared = {m: prepare(m, args.out / "artifacts") for m in args.models}
    log(f"artifacts ready in {time.time() - t0:.0f}s")
    report = {"meta": None, "results": [], "models": {}}
    for m in args.models:
        ckpt, engines, note = prepared[m]
        sampler, steps, repeats, warmup = plan[m]
        repeats = args.rounds or repeats
        log(f"{m}: {note}; {sampler} {steps} steps, batch 1, {repeats} repeats")
        r = interleaved(m, ckpt, engines[0], sampler, steps, repeats, warmup, threads, bool(args.memory))
        machine_ = r["meta"]["machine"]
        for row in r["results"]:
            row["load"] = f"{machine_['loadavg_1m_at_start']} / {machine_['loadavg_1m_at_end']}"
        report["meta"] = report["meta"] or r["meta"]
        report["results"] += r["results"]
        report["models"][m] = {"checkpoint": ckpt, "engines": engines, "note": note, "sampler": sampler,
                               "steps": steps, "load": row["load"],
                               "auto": next(x["auto"] for x in r["results"] if x.get("auto"))}
    add_speedups(report["results"])
    report["meta"].update(quick=args.quick, seconds=round(time.time() - t0, 1))
    report["meta"]["machine"]["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    for name in ("torch", "diffusers", "openvino"):  # imported by later sides than the first run's meta saw
        if name in sys.modules:
            report["meta"]["versions"][name] = getattr(sys.modules[name], "__version__", "?")
    report["targets"] = targets(report["results"])
    write_outputs(report, args.out, "bench_cpu", render(report))
    return 0


# ---------------------------------------------------------------------------------------------------- --fused-ab
def fused_ab(args) -> int:
    from ddpm_deploy.errors import UserError

    names = [n.strip() for n in (args.configs or ",".join(AB_CONFIGS)).split(",") if n.strip()]
    if not names or any(n not in AB_CONFIGS for n in names):
        sys.exit(f"--configs must be a comma-separated subset of: {', '.join(AB_CONFIGS)}")
    quick = (1, 1, 20) if args.quick else (4, 3, None)
    args.rounds, args.reps, args.steps = args.rounds or quick[0], args.reps or quick[1], args.steps or quick[2]
    args.threads = args.threads or 1
    report = {"machine": machine(), "versions": versions("onnxruntime", "openvino"), "rows": [], "skipped": {},
              "settings": {k: getattr(args, k) for k in ("threads", "rounds", "reps", "steps")}}
    for model in args.models:
        path = prepare(model, args.out / "artifacts")[1][0]
        for name in names:
            try:
                report["rows"].append({"model": model, **ab_compare(path, name, args)})
            except UserError as e:  # e.g. openvino bf16 on a CPU without bf16
                log(f"{name} skipped: {e}")
                report["skipped"][name] = str(e)
    report["machine"]["loadavg_1m_at_end"] = machine()["loadavg_1m"]
    write_outputs(report, args.out, "fused_ab", ab_markdown(report))
    return 0


def ab_round(path: str, backend: str, options: dict, fused: bool, args) -> list[tuple[float, float]]:
    """(chain seconds, overhead fraction) of each timed chain, in a freshly opened backend."""
    from ddpm_deploy.runtime import load

    with load(path, backend=backend, threads=args.threads, fused_step=fused, **options) as pipe:
        pipe.sample(1, seed=0, steps=min(args.steps or 1000, 50))  # warm-up: allocations, first-call compiles
        out = []
        for i in range(args.reps):
            calls = pipe.backend.engine_time.record()
            t0 = time.perf_counter()
            pipe.sample(1, seed=i, steps=args.steps)
            total = time.perf_counter() - t0
            out.append((total, (total - sum(d for _, d in calls)) / total))
        return out


def ab_compare(path: str, name: str, args) -> dict:
    backend, options = AB_CONFIGS[name]
    runs = {True: [], False: []}
    for r in range(args.rounds):
        for fused in ((True, False) if r % 2 == 0 else (False, True)):
            runs[fused].append(ab_round(path, backend, options, fused, args))
    med = {f: statistics.median(t for rnd in runs[f] for t, _ in rnd) for f in runs}
    ratios = [statistics.median(t for t, _ in h) / statistics.median(t for t, _ in f)
              for f, h in zip(runs[True], runs[False])]
    return {"config": name, "fused_ms": 1e3 * med[True], "host_ms": 1e3 * med[False],
            "fused_overhead": statistics.median(o for rnd in runs[True] for _, o in rnd),
            "host_overhead": statistics.median(o for rnd in runs[False] for _, o in rnd),
            "ratio": statistics.median(ratios), "ratio_range": (min(ratios), max(ratios))}


# ---------------------------------------------------------------------------------------------------- --openvino
def openvino(args) -> int:
    for k, (full, quick) in {"warmup": (2, 1), "reps": (5, 3), "steps": (8, 4), "psnr_steps": (50, 10),
                             "psnr_n": (16, 16)}.items():
        setattr(args, k, (quick if args.quick else full) if getattr(args, k) is None else getattr(args, k))
    args.psnr_models = [m.strip() for m in (args.psnr_models or "shipped").split(",")]
    args.batches = [int(b) for b in (args.batches or "1,8").split(",")]
    if any(not 1 <= b <= 8 for b in args.batches):
        sys.exit("--batches must lie in 1..8 (the exports have max batch 8)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    t0 = time.time()
    report = {"machine": machine(), "versions": versions("onnxruntime", "openvino", "torch", "diffusers"),
              "settings": {k: v for k, v in vars(args).items() if k != "out"}, "runs": [], "bf16_verify": {}}
    for name in args.models:
        ckpt, (onnx,), note = prepare(name, args.out / "artifacts")
        for batch in args.batches:
            log(f"{name}: batch {batch}")
            rows = {kind: time_ours(kind, onnx, batch, args) for kind in OV_ROWS}
            rows["diffusers"] = time_diffusers(ckpt, onnx, batch, args)
            r = ov_ratios(rows)
            report["runs"].append({"model": name, "note": note, "batch": batch, "rows": rows, "ratios": r,
                                   "targets": ov_targets(r)})
        log(f"{name}: bf16 verify")
        report["bf16_verify"][name] = bf16_verify(name, onnx, args)
    report["machine"]["loadavg_1m_at_end"] = machine()["loadavg_1m"]
    report["seconds"] = time.time() - t0
    write_outputs(report, args.out, "openvino_cpu", ov_markdown(report))
    return 0


def open_row(kind: str, onnx: str, threads):
    """(Pipeline, None) for an OV_ROWS row, or (None, why it cannot run here)."""
    from ddpm_deploy.errors import UserError
    from ddpm_deploy.runtime import load

    backend, options = OV_ROWS[kind]
    try:
        return load(onnx, backend=backend, threads=threads, **options), None
    except UserError as e:
        return None, str(e)


def eps_inputs(manifest, batch: int, seed: int = 0):
    x = np.random.default_rng(seed).standard_normal((batch, *manifest.image_shape), dtype=np.float32)
    return x, np.full((batch,), manifest.schedule.T // 2, np.float32)


def chain_ms_per_step(sample, steps: int) -> dict:
    """Whole sampling runs (DDPM, then DDIM) of `steps` steps, each once: total time / steps."""
    out = {}
    for sampler in ("ddpm", "ddim"):
        t0 = time.perf_counter()
        sample(sampler)
        out[sampler] = 1000 * (time.perf_counter() - t0) / steps
    return out


def time_ours(kind: str, onnx: str, batch: int, args) -> dict:
    """One row: median ms of an eps call, then per-step ms of whole chains (the eps calls were the warm-up)."""
    pipe, why = open_row(kind, onnx, args.threads)
    if pipe is None:
        return {"error": why}
    with pipe:
        x, t = eps_inputs(pipe.manifest, batch)
        row = {"eps": median_ms(lambda: pipe.backend.eps(x, t), args.warmup, args.reps)}
        if kind not in EPS_ONLY_ROWS:
            row.update(chain_ms_per_step(lambda s: pipe.sample(batch, seed=0, sampler=s, steps=args.steps,
                                                               output="float"), args.steps))
            if kind.startswith("openvino"):
                row.update(config=pipe.backend.config, compiled_batches=pipe.backend.compiled_batches)
    return row


def time_diffusers(ckpt: str, onnx: str, batch: int, args) -> dict:
    """The baseline: the same UNet in torch eager (one call), and DDPMPipeline / DDIMPipeline over the same steps."""
    import torch

    from ddpm_deploy.bench.sides import diffusers_pipeline
    from ddpm_deploy.artifact.manifest import Manifest

    pipes = {s: diffusers_pipeline(ckpt, s) for s in ("ddpm", "ddim")}
    xt, tt = (torch.from_numpy(a) for a in eps_inputs(Manifest.read(onnx), batch))
    with torch.inference_mode():
        row = {"eps": median_ms(lambda: pipes["ddpm"].unet(xt, tt), args.warmup, args.reps)}
        row.update(chain_ms_per_step(lambda s: pipes[s](
            batch_size=batch, generator=torch.Generator().manual_seed(0), num_inference_steps=args.steps,
            output_type="np"), args.steps))
    return row


def bf16_verify(name: str, onnx: str, args) -> dict:
    """bf16 against fp32 on OpenVINO: max|d-eps| over t (every model), and for --psnr-models the PSNR of DDIM final
    samples from the same noise (ddpm_deploy.images.psnr), judged by the verify tolerances."""
    from ddpm_deploy.images import psnr
    from ddpm_deploy.tolerances import VERIFY_REDUCED_EPS_MAX_ABS, VERIFY_REDUCED_X0_MIN_PSNR_DB

    p16, why = open_row("openvino-bf16", onnx, args.threads)
    if p16 is None:
        return {"error": why}
    p32 = open_row("openvino-fp32", onnx, args.threads)[0]
    with p32, p16:
        T = p32.manifest.schedule.T
        x, _ = eps_inputs(p32.manifest, 4, seed=1)
        ts = [np.full((4,), s, np.float32) for s in (0, T // 4, T // 2, T - 1)]
        out = {"eps_max_abs": max(float(np.abs(p32.backend.eps(x, t) - p16.backend.eps(x, t)).max()) for t in ts),
               "thresholds": {"eps_max_abs": VERIFY_REDUCED_EPS_MAX_ABS,
                              "x0_min_psnr_db": VERIFY_REDUCED_X0_MIN_PSNR_DB}}
        if name not in args.psnr_models:
            return out
        kw = dict(seed=0, sampler="ddim", steps=min(args.psnr_steps, T), output="float")
        a, b = p32.sample(args.psnr_n, **kw), p16.sample(args.psnr_n, **kw)
    db = psnr(b, a)
    out.update(x0_psnr_db=db, x0_max_abs=float(np.abs(a - b).max()), images=args.psnr_n, ddim_steps=kw["steps"],
               finite=bool(np.isfinite(b).all()),
               passes_verify=bool(out["eps_max_abs"] <= VERIFY_REDUCED_EPS_MAX_ABS and db >= VERIFY_REDUCED_X0_MIN_PSNR_DB))
    return out




if __name__ == "__main__":
    sys.exit(main())
