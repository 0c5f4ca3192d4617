"""A/B of the CPU loops: the fused step (update inside the engine, runtime.host_steps) against the numpy host loop
(`fused_step=False`), per CPU backend, on the shipped model (DDPM 1000, batch 1).

    python benchmarks/cpu_fused_ab.py                 # ≈3 min on 2 cores
    python benchmarks/cpu_fused_ab.py --rounds 2 --chains 2 --steps 100    # a quick look

Rounds alternate A B B A ...; each round opens its backend, warms it up, times `--chains` whole chains and closes it,
so only one compiled model is alive at a time (several OpenVINO models in one process disturb each other's timings
on 2 cores). Reported per backend: median whole-chain ms and loop overhead of each loop, and host/fused chain time
(> 1: the fused step is faster), with the range over rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

CONFIGS = {"onnxruntime fp32": ("onnxruntime", {}), "openvino fp32": ("openvino", {"precision": "fp32"}),
           "openvino bf16": ("openvino", {"precision": "bf16"})}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=4, help="rounds per loop and backend (default 4)")
    p.add_argument("--chains", type=int, default=3, help="timed chains per round (default 3)")
    p.add_argument("--steps", type=int, default=None, help="DDPM steps per chain (default T = 1000)")
    p.add_argument("--threads", type=int, default=1, help="engine threads (default 1: steadier on a shared VM)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of: {', '.join(CONFIGS)}")
    p.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "results" / "fused_ab",
                   help="folder for the exported model and caches")
    return p.parse_args(argv)


def exported_model(work: Path) -> str:
    """The shipped model's ONNX under `work`, exported again only when the weights changed (bench_cpu's helpers)."""
    from bench_cpu import exported, shipped_checkpoint  # this folder: sys.path[0] when run as a script

    return exported(shipped_checkpoint(work)[0], work / "shipped.onnx", fp16=False)


def one_round(path: str, backend: str, options: dict, fused: bool, args) -> list[tuple[float, float]]:
    """(chain seconds, overhead fraction) of each timed chain, in a freshly opened backend."""
    from ddpm_deploy.runtime import load

    with load(path, backend=backend, threads=args.threads, fused_step=fused, **options) as pipe:
        pipe.sample(1, seed=0, steps=min(args.steps or 1000, 50))  # warm-up: allocations, first-call compiles
        out = []
        for i in range(args.chains):
            calls = pipe.backend.engine_time.record()
            t0 = time.perf_counter()
            pipe.sample(1, seed=i, steps=args.steps)
            total = time.perf_counter() - t0
            out.append((total, (total - sum(d for _, d in calls)) / total))
        return out


def compare(path: str, name: str, args) -> dict:
    backend, options = CONFIGS[name]
    runs = {True: [], False: []}
    for r in range(args.rounds):
        for fused in ((True, False) if r % 2 == 0 else (False, True)):
            runs[fused].append(one_round(path, backend, options, fused, args))
    med = {f: statistics.median(t for rnd in runs[f] for t, _ in rnd) for f in runs}
    ratios = [statistics.median(t for t, _ in h) / statistics.median(t for t, _ in f)
              for f, h in zip(runs[True], runs[False])]
    return {"config": name, "fused_ms": 1e3 * med[True], "host_ms": 1e3 * med[False],
            "fused_overhead": statistics.median(o for rnd in runs[True] for _, o in rnd),
            "host_overhead": statistics.median(o for rnd in runs[False] for _, o in rnd),
            "ratio": statistics.median(ratios), "ratio_range": (min(ratios), max(ratios))}


def main(argv=None) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    if not names or any(n not in CONFIGS for n in names):
        sys.exit(f"--configs must be a comma-separated subset of: {', '.join(CONFIGS)}")
    os.environ.setdefault("XDG_CACHE_HOME", str(args.work / "cache"))  # OpenVINO's compiled-model cache
    path = exported_model(args.work)
    if "openvino bf16" in names:
        import openvino

        from ddpm_deploy.runtime.backends.openvino_backend import device_supports_bf16

        if not device_supports_bf16(openvino.Core(), "CPU"):
            print("openvino bf16 skipped: this CPU has no bf16", file=sys.stderr)
            names.remove("openvino bf16")
    load = os.getloadavg()[0]
    print(f"shipped model, DDPM {args.steps or 1000} steps, batch 1, {args.threads} thread(s), {args.rounds} rounds "
          f"x {args.chains} chains per loop; load average {load:.2f} at start")
    print("| backend | fused step: chain ms | overhead | numpy host loop: chain ms | overhead | host / fused (range) |")
    print("|---|---|---|---|---|---|")
    for name in names:
        r = compare(path, name, args)
        lo, hi = r["ratio_range"]
        print(f"| {name} | {r['fused_ms']:.1f} | {100 * r['fused_overhead']:.2f}% | {r['host_ms']:.1f} | "
              f"{100 * r['host_overhead']:.2f}% | {r['ratio']:.3f}x ({lo:.3f}-{hi:.3f}) |", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
