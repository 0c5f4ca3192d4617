"""What the per-step finiteness check (issue 21 item 9) costs: DDPM-1000 chains of the shipped model at batch 1 on
the CPU backends, with the check ("after") and without it ("before": the fused graph with its `nonfinite` output and
the nodes feeding it stripped, the loop without the per-step flag copy; the numpy host loop without its per-step
np.errstate), in one process.

    python benchmarks/finite_overhead.py                     # ≈6 min on 2 cores
    python benchmarks/finite_overhead.py --rounds 2 --chains 1 --steps 200    # a quick look

Rounds alternate A B B A ...; each opens its backend, warms it up, times `--chains` chains and closes it. Reported
per configuration: median chain ms before and after, and after / before (median over round pairs, with range).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

CONFIGS = {"onnxruntime fp32 fused": ("onnxruntime", {}), "openvino fp32 fused": ("openvino", {"precision": "fp32"}),
           "openvino bf16 fused": ("openvino", {"precision": "bf16"}),
           "onnxruntime numpy host loop": ("onnxruntime", {"fused_step": False})}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=4, help="rounds per variant and configuration (default 4)")
    p.add_argument("--chains", type=int, default=2, help="timed chains per round (default 2)")
    p.add_argument("--steps", type=int, default=None, help="DDPM steps per chain (default T = 1000)")
    p.add_argument("--threads", type=int, default=1, help="engine threads (default 1: steadier on a shared VM)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of: {', '.join(CONFIGS)}")
    p.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "results" / "finite_overhead",
                   help="folder for the exported model and caches")
    return p.parse_args(argv)


def strip_flag(model):
    """The fused graph as it was before issue 21: no `nonfinite` output, and no node that only fed it."""
    g = model.graph
    outputs = [o for o in g.output if o.name != "nonfinite"]
    del g.output[:]
    g.output.extend(outputs)
    needed, kept = {o.name for o in outputs}, []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
    del g.node[:]
    g.node.extend(reversed(kept))
    return model


class _NumpyWithoutErrstate:
    """numpy, except that errstate does nothing: the host loop as it was before issue 21."""

    def __getattr__(self, name):
        return (lambda **_: contextlib.nullcontext()) if name == "errstate" else getattr(np, name)


@contextlib.contextmanager
def before_issue_21():
    """Patch the loops back to no per-step finiteness check (this process only)."""
    from ddpm_deploy import chain
    from ddpm_deploy.runtime import host_steps
    from ddpm_deploy.runtime.backends import onnxruntime_backend, openvino_backend

    saved = []

    def patch(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    real_fused, real_shapes = onnxruntime_backend.fused_model, host_steps.output_shapes
    real_launch = host_steps.HostFusedSteps.launch

    def launch(self, sync):
        with self.engine_time:
            self._cur[1]()
        self._stepped = True

    for mod in (onnxruntime_backend, openvino_backend):
        patch(mod, "fused_model", lambda *a, **k: strip_flag(real_fused(*a, **k)))
    patch(host_steps, "output_shapes",
          lambda m, b: {k: v for k, v in real_shapes(m, b).items() if k != "nonfinite"})
    patch(host_steps.HostFusedSteps, "launch", launch)
    patch(host_steps.HostFusedSteps, "read_flags", lambda self, k0, k1: np.zeros((k1 - k0, 1), np.float32))
    patch(chain, "np", _NumpyWithoutErrstate())
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)
        assert host_steps.HostFusedSteps.launch is real_launch


def one_round(path: str, backend: str, options: dict, args) -> list[tuple]:
    """(chain seconds, engine seconds per step: 10th percentile, host seconds per step outside the engine) of each
    timed chain, in a freshly opened backend. The percentile is what load from other processes disturbs least."""
    from ddpm_deploy.runtime import load

    if backend == "openvino":
        options = {**options, "cache_dir": ""}  # compile afresh each round (not timed): no cache state shared
    with load(path, backend=backend, threads=args.threads, **options) as pipe:
        pipe.sample(1, seed=0, sampler="ddpm", steps=min(args.steps or 1000, 50))  # warm-up
        out = []
        for i in range(args.chains):
            calls = pipe.backend.engine_time.record()
            t0 = time.perf_counter()
            pipe.sample(1, seed=i, sampler="ddpm", steps=args.steps)
            total = time.perf_counter() - t0
            steps = np.array([d for _, d in calls])
            out.append((total, float(np.percentile(steps, 10)), (total - steps.sum()) / len(steps)))
        pipe.backend.engine_time.stop()
        return out


def compare(path: str, name: str, args) -> dict:
    backend, options = CONFIGS[name]
    runs = {"before": [], "after": []}
    for r in range(args.rounds):
        for variant in (("after", "before") if r % 2 == 0 else ("before", "after")):
            with before_issue_21() if variant == "before" else contextlib.nullcontext():
                runs[variant].append(one_round(path, backend, options, args))
    med = {v: [statistics.median(c[i] for rnd in runs[v] for c in rnd) for i in range(3)] for v in runs}
    ratios = [[statistics.median(c[i] for c in a) / statistics.median(c[i] for c in b) for i in range(2)]
              for a, b in zip(runs["after"], runs["before"])]
    return {"config": name, "before": med["before"], "after": med["after"],
            "ratio": [statistics.median(r[i] for r in ratios) for i in range(2)],
            "ratio_range": [(min(r[i] for r in ratios), max(r[i] for r in ratios)) for i in range(2)]}


def main(argv=None) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    if not names or any(n not in CONFIGS for n in names):
        sys.exit(f"--configs must be a comma-separated subset of: {', '.join(CONFIGS)}")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_cpu import exported, shipped_checkpoint

    path = exported(shipped_checkpoint(args.work)[0], args.work / "shipped.onnx", fp16=False)
    if "openvino bf16 fused" in names:
        import openvino

        from ddpm_deploy.runtime.backends.openvino_backend import device_supports_bf16

        if not device_supports_bf16(openvino.Core(), "CPU"):
            print("openvino bf16 skipped: this CPU has no bf16", file=sys.stderr)
            names.remove("openvino bf16 fused")
    print(f"shipped model, DDPM {args.steps or 1000} steps, batch 1, {args.threads} thread(s), {args.rounds} rounds "
          f"x {args.chains} chains per variant; load average {os.getloadavg()[0]:.2f} at start")
    print("| configuration | chain ms before / after | after / before (range) | engine ms per step, p10, before / "
          "after | after / before (range) | host µs per step before / after |")
    print("|---|---|---|---|---|---|")
    for name in names:
        r = compare(path, name, args)
        (b_chain, b_step, b_host), (a_chain, a_step, a_host) = r["before"], r["after"]
        (lo, hi), (lo_s, hi_s) = r["ratio_range"]
        print(f"| {name} | {1e3 * b_chain:.0f} / {1e3 * a_chain:.0f} | {r['ratio'][0]:.3f}x ({lo:.3f}-{hi:.3f}) | "
              f"{1e3 * b_step:.3f} / {1e3 * a_step:.3f} | {r['ratio'][1]:.3f}x ({lo_s:.3f}-{hi_s:.3f}) | "
              f"{1e6 * b_host:.0f} / {1e6 * a_host:.0f} |", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
