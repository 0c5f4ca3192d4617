"""What the per-step finiteness check (issue 21 item 9) costs: DDPM-1000 chains of the shipped model at batch 1 on
the CPU backends, with the check ("after") and without it ("before": the fused graph with its `nonfinite` output and
the nodes feeding it stripped, the loop without the per-step flag copy; the numpy host loop without its per-step
np.errstate), in one process.

    python benchmarks/finite_overhead.py                     # ≈6 min on 2 cores
    python benchmarks/finite_overhead.py --rounds 2 --chains 1 --steps 200    # a quick look
    python benchmarks/finite_overhead.py --mode engine --calls 2000           # the engine call alone, interleaved

Chain mode: rounds alternate A B B A ...; each opens its backend, warms it up, times `--chains` chains and closes
it. Reported per configuration: median chain ms before and after, and after / before (median over round pairs, with
range), the 10th percentile of the engine's time per step, and the host's time per step outside the engine.
Profile mode: onnxruntime's own per-node timings of the fused step (`--calls` steps at batch 1), the share of the
nodes that compute `nonfinite` (names fused/*_diff, *_nan*, bad, nonfinite) in the step's node time (per-node
medians): other processes' load cancels out of it better than out of wall times, but it is an upper bound: the
profiler's own cost per node (several µs) dominates nodes as small as these.
Engine mode, for a machine whose load swamps chain-to-chain differences: both graphs open at once at batch 1, one
step of each in turn (order swapped every call) on the same inputs; median and 10th percentile per call, and the
host-side additions timed alone (the flag row copy of the fused loop, np.errstate of the numpy loop).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
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
    p.add_argument("--mode", choices=("chain", "engine", "profile"), default="chain",
                   help="whole chains, engine calls, or onnxruntime's per-node profile of the fused step")
    p.add_argument("--calls", type=int, default=2000, help="engine mode: calls per graph (default 2000)")
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
    from ddpm_deploy.loop import host as host_loop
    from ddpm_deploy.runtime import cpu_steps
    from ddpm_deploy.runtime.backends import onnxruntime_backend, openvino_backend

    saved = []

    def patch(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    real_fused, real_shapes = onnxruntime_backend.fused_model, cpu_steps.output_shapes
    real_launch = cpu_steps.HostFusedSteps.launch

    def launch(self, sync):  # no flags row (the loop times the launch around this)
        self._run()
        self._pending = True

    for mod in (onnxruntime_backend, openvino_backend):
        patch(mod, "fused_model", lambda *a, **k: strip_flag(real_fused(*a, **k)))
    patch(cpu_steps, "output_shapes",
          lambda m, b: {k: v for k, v in real_shapes(m, b).items() if k != "nonfinite"})
    patch(cpu_steps.HostFusedSteps, "launch", launch)
    patch(cpu_steps.HostFusedSteps, "read_flags", lambda self, k0, k1: np.zeros((k1 - k0, 1), np.float32))
    patch(host_loop, "np", _NumpyWithoutErrstate())
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)
        assert cpu_steps.HostFusedSteps.launch is real_launch


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


def open_slot(path: str, backend: str, options: dict, args):
    """(backend, run) of a fused CPU backend at batch 1, its bound buffers filled with a DDPM step's inputs."""
    from ddpm_deploy.runtime import load

    if backend == "openvino":
        options = {**options, "cache_dir": ""}
    pipe = load(path, backend=backend, threads=args.threads, **options)
    dev = pipe.backend.steps
    dev.open(1)
    buffers, run = dev._view(1), dev._run
    rng = np.random.default_rng(0)
    plan = pipe.plan("ddpm")
    buffers["x_t"][:] = rng.standard_normal(buffers["x_t"].shape, dtype=np.float32)
    buffers["z"][:] = rng.standard_normal(buffers["z"].shape, dtype=np.float32)
    buffers["t"][:] = plan.timesteps[500]
    buffers["coefs"][:] = plan.coefs[500].astype(np.float32)
    return pipe, run


def compare_engine(path: str, name: str, args) -> dict:
    backend, options = CONFIGS[name]
    with before_issue_21():
        before = open_slot(path, backend, options, args)  # bound while patched: no `nonfinite` output
    after = open_slot(path, backend, options, args)
    times = {"before": [], "after": []}
    try:
        pair = [("before", before[1]), ("after", after[1])]
        for _, run in pair * 50:  # warm-up
            run()
        for i in range(args.calls):
            for variant, run in (pair if i % 2 == 0 else pair[::-1]):
                t0 = time.perf_counter()
                run()
                times[variant].append(time.perf_counter() - t0)
    finally:
        before[0].close()
        after[0].close()
    stat = {v: (statistics.median(t), float(np.percentile(t, 10))) for v, t in times.items()}
    return {"config": name, **stat}


def host_additions(calls: int = 20000) -> dict:
    """Seconds per step of what the check adds on the host: the fused loop's flag row copy, the numpy loop's
    np.errstate around its step."""
    flags, flag = np.zeros((1000, 1), np.float32), np.zeros(1, np.float32)
    t0 = time.perf_counter()
    for i in range(calls):
        flags[i % 1000] = flag
    copy = (time.perf_counter() - t0) / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        with np.errstate(over="raise", invalid="raise"):
            pass
    return {"flag_copy": copy, "errstate": (time.perf_counter() - t0) / calls}


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
    try:  # the benchmarks' shared helpers (benchmarks/common.py; bench_cpu held them before)
        from common import exported, shipped_checkpoint
    except ImportError:
        from bench_cpu import exported, shipped_checkpoint

    path = exported(shipped_checkpoint(args.work)[0], args.work / "shipped.onnx", fp16=False)
    if "openvino bf16 fused" in names:
        import openvino

        from ddpm_deploy.runtime.backends.openvino_backend import device_supports_bf16

        if not device_supports_bf16(openvino.Core(), "CPU"):
            print("openvino bf16 skipped: this CPU has no bf16", file=sys.stderr)
            names.remove("openvino bf16 fused")
    if args.mode == "profile":
        return main_profile(path, args)
    if args.mode == "engine":
        return main_engine(path, [n for n in names if "fused" in n], args)
    print_table(f"shipped model, DDPM {args.steps or 1000} steps, batch 1, {args.threads} thread(s), {args.rounds} "
                f"rounds x {args.chains} chains per variant",
                ["configuration", "chain ms before / after", "after / before (range)",
                 "engine ms per step, p10, before / after", "after / before (range)", "host µs per step before / after"],
                (chain_row(name, compare(path, name, args)) for name in names))
    return 0


def chain_row(name: str, r: dict) -> list[str]:
    (b_chain, b_step, b_host), (a_chain, a_step, a_host) = r["before"], r["after"]
    (lo, hi), (lo_s, hi_s) = r["ratio_range"]
    return [name, f"{1e3 * b_chain:.0f} / {1e3 * a_chain:.0f}", f"{r['ratio'][0]:.3f}x ({lo:.3f}-{hi:.3f})",
            f"{1e3 * b_step:.3f} / {1e3 * a_step:.3f}", f"{r['ratio'][1]:.3f}x ({lo_s:.3f}-{hi_s:.3f})",
            f"{1e6 * b_host:.0f} / {1e6 * a_host:.0f}"]


def print_table(title: str, columns: list[str], rows) -> None:
    """A markdown table, each row printed as soon as it is measured, between two readings of the load average
    (other processes' load is what disturbs these timings most)."""
    print(f"{title}; load average {os.getloadavg()[0]:.2f} at start")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for cells in rows:
        print("| " + " | ".join(cells) + " |", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} at end")


FLAG_NODE_MARKS = ("_diff", "_nan", "fused/fused/bad", "fused/nonfinite")


def main_profile(path: str, args) -> int:
    """onnxruntime's profile of the fused step (the CPU backend's graph, rewrites included): the flag nodes' share."""
    import json

    import onnxruntime as ort

    from ddpm_deploy.graph.fused import fused_model
    from ddpm_deploy.graph.rewrite import save_for_cpu
    from ddpm_deploy.artifact.manifest import Manifest

    manifest = Manifest.read(path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.enable_profiling = args.threads, True
    opts.profile_file_prefix = str(args.work / "ort_profile")
    with tempfile.TemporaryDirectory() as tmp:
        sess = ort.InferenceSession(save_for_cpu(fused_model(path, manifest), tmp, True)[0], opts,
                                    providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    from ddpm_deploy.fused_io import input_shapes

    feeds = {k: rng.standard_normal(v).astype(np.float32) for k, v in input_shapes(manifest, 1).items()}
    feeds["t"][:] = 500
    for _ in range(args.calls):
        sess.run(None, feeds)
    events = json.loads(Path(sess.end_profiling()).read_text())
    durations: dict = {}  # node -> its time in each call (µs); a node's median discounts calls that were preempted
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            durations.setdefault(e["name"][:-len("_kernel_time")], []).append(e["dur"])
    median = {name: statistics.median(d) for name, d in durations.items()}
    flags = sorted(name for name in median if any(m in name for m in FLAG_NODE_MARKS))
    total, flag = sum(median.values()), sum(median[n] for n in flags)
    print(f"shipped model, onnxruntime fused step at batch 1, {args.calls} calls, {args.threads} thread(s); "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{len(flags)} flag nodes of {len(median)} ({', '.join(flags)}): sum of per-node medians {flag:.1f} µs of "
          f"{total:.1f} µs per step = {100 * flag / total:.2f} %")
    return 0


def main_engine(path: str, names: list, args) -> int:
    print_table(f"shipped model, one fused step at batch 1 (t = 500 of DDPM), {args.threads} thread(s), {args.calls} "
                "calls per graph, interleaved",
                ["configuration", "ms per call, median: before / after", "after / before",
                 "ms per call, p10: before / after", "after / before"],
                (engine_row(name, compare_engine(path, name, args)) for name in names))
    h = host_additions()
    print(f"host additions per step: flag row copy {1e6 * h['flag_copy']:.2f} µs, "
          f"np.errstate {1e6 * h['errstate']:.2f} µs")
    return 0


def engine_row(name: str, r: dict) -> list[str]:
    (b_med, b_p10), (a_med, a_p10) = r["before"], r["after"]
    return [name, f"{1e3 * b_med:.3f} / {1e3 * a_med:.3f}", f"{a_med / b_med:.3f}x",
            f"{1e3 * b_p10:.3f} / {1e3 * a_p10:.3f}", f"{a_p10 / b_p10:.3f}x"]


if __name__ == "__main__":
    sys.exit(main())
