"""Peak memory per configuration, each in a fresh interpreter (so one side's allocations never count for another).

Imports inside `memory_probe` are local on purpose: the probe process imports exactly the side's library before
it reads its baseline, so what the baseline includes is what the probe chose, not what this module pulled in."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

from .. import backend_registry as registry

MEMORY_NOTE = ("peak_rss_mb: peak resident set (Linux VmHWM) of a fresh process that imported the side's library, "
               "loaded the model and ran a 1-step chain at this batch; baseline_rss_mb: that process after the "
               "imports, before loading. The difference is what the model, its runtime and activations add.")
PROBE = "import sys; from ddpm_deploy.bench.memory import memory_probe; memory_probe(sys.argv[1])"


def probe_spec(row: dict, steps: int = 1) -> dict:
    """What the probe needs to rebuild a row's side. One step is enough: the first call at a batch size allocates
    everything later steps reuse."""
    side = "diffusers" if row["runtime_backend"] == "diffusers" else "runtime"
    return {"side": side, "engine": row["engine"], "checkpoint": row["engine"], "backend": row["runtime_backend"],
            "device": row["device"], "precision": row["precision"], "batch": row["batch"], "steps": steps,
            "sampler": row["sampler"], "sampling": row.get("sampling"), "threads": row["threads"]}


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


def maxrss_mb() -> float:
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
    from ..sampling.spec import SamplerSpec

    spec = json.loads(arg)
    side, b, k = spec["side"], spec["batch"], spec["steps"]
    sampling = SamplerSpec(**{**(spec.get("sampling") or {"sampler": spec["sampler"]}), "steps": k})
    if side == "diffusers" or spec.get("backend") == "torch":
        import diffusers  # noqa: F401  (imports torch)
        import torch

        torch.set_num_threads(spec["threads"])
    else:  # the backend's library; for auto every library it may pick, so the baseline counts their imports
        name = spec.get("backend") or "onnxruntime"
        chosen = registry.entries(auto=True) if name == registry.AUTO else [registry.get(name)]
        for library in {e.library for e in chosen if e is not None and e.available()}:
            importlib.import_module(library)
    baseline = maxrss_mb()
    if side == "diffusers":
        from .sides import diffusers_pipeline

        pipe = diffusers_pipeline(spec["checkpoint"], sampling)
        with torch.inference_mode():
            pipe(batch_size=b, num_inference_steps=k, output_type="np")
    else:
        from .sides import open_runtime

        with open_runtime(spec["engine"], spec["backend"], spec["device"], spec.get("precision"),
                          spec["threads"]) as pipe:
            pipe.sample(b, seed=0, spec=sampling, batch_size=b)
    print(json.dumps({"baseline_rss_mb": round(baseline, 1), "peak_rss_mb": round(maxrss_mb(), 1)}))
