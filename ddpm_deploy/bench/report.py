"""The report: machine and library facts, speedups against diffusers, the Markdown table, atomic writes."""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import numpy as np

from ..files import check_output_path, write_bytes_atomic
from .memory import MEMORY_NOTE
from ..tolerances import BENCH_NOISY_SPREAD
from .spec import BenchSpec, default_threads

COLUMNS = ("model", "backend", "dtype", "threads", "batch", "ms/step", "engine ms", "images/s", "spread",
           "loop overhead", "peak RSS MB", "vs diffusers")


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_diffusers = diffusers' whole-chain time / the row's, for the same model, batch and steps (the
    fastest diffusers row where there are several, e.g. on 1 thread and on all)."""
    ref, noisy = {}, {}
    for r in rows:
        key = (r["model"], r["batch"], r["steps"])
        if r["runtime_backend"] == "diffusers" and r["chain_ms"] < ref.get(key, float("inf")):
            ref[key], noisy[key] = r["chain_ms"], r.get("noisy")
    for r in rows:
        key = (r["model"], r["batch"], r["steps"])
        base = ref.get(key)
        r["speedup_vs_diffusers"] = base / r["chain_ms"] if base else None
        # a ratio is only as steady as the noisier of its two cells
        r["speedup_noisy"] = bool(r.get("noisy") or noisy.get(key)) if base else None


def start_facts() -> dict:
    """Taken before timing starts: when, and how busy the machine was."""
    return {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg_1m": loadavg()}


def meta(spec: BenchSpec, start: dict) -> dict:
    import onnxruntime

    versions = {"python": platform.python_version(), "numpy": np.__version__, "onnxruntime": onnxruntime.__version__}
    for name in ("torch", "diffusers", "openvino"):
        if name in sys.modules:
            versions[name] = getattr(sys.modules[name], "__version__", "?")
    return {"machine": {"platform": platform.platform(), "processor": cpu_name(), "cpu_flags": cpu_flags(),
                        "cpus_usable": default_threads(), "loadavg_1m_at_start": start["loadavg_1m"],
                        "loadavg_1m_at_end": loadavg()},
            "versions": versions, "threads": spec.threads,
            "reference_threads": spec.reference_threads if spec.checkpoint is not None else None, "steps": spec.steps, "sampler": spec.sampler,
            "warmup_steps": spec.warmup, "repeats": spec.repeats,
            "memory": MEMORY_NOTE if spec.memory else "not measured (--no-memory)", "time": start["time"],
            **spec.extra}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


# The flags that decide which kernels the CPU libraries can use (vector width, int8/bf16 dot products, AMX).
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16",
               "amx_int8", "amx_tile")


def cpu_flags() -> list[str]:
    """Which of SPEED_FLAGS this CPU has (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return [f for f in SPEED_FLAGS if f in flags]


def loadavg():
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def load_line(meta_: dict) -> str:
    """The load average before and after, and whether the machine was busier than its cores."""
    m = meta_.get("machine", {})
    before, after, cores = m.get("loadavg_1m_at_start"), m.get("loadavg_1m_at_end"), m.get("cpus_usable")
    busy = cores and any(v is not None and v >= cores for v in (before, after))
    return (f"load average (1 min) {before} before / {after} after on {cores} usable cores"
            + (" (busy: other work competes for the cores, expect noisy cells)" if busy else ""))


def _threads(meta_: dict) -> str:
    """The runtime sides' threads, and PyTorch's and diffusers' where they differ (the idle cores by default)."""
    ref = meta_.get("reference_threads")
    if ref is None or ref == meta_["threads"]:
        return str(meta_["threads"])
    return f"{meta_['threads']} (PyTorch and diffusers: {ref}, the cores other work left idle)"


def _spread_cell(r: dict) -> str:
    """(max - min) / median of the row's chains and their ms/step range; 'noisy' above BENCH_NOISY_SPREAD."""
    if r.get("spread") is None:
        return "–"
    lo, hi = r["chain_ms_min"] / r["steps"], r["chain_ms_max"] / r["steps"]
    return f"{'noisy ' if r.get('noisy') else ''}{100 * r['spread']:.0f}% ({lo:.2f}–{hi:.2f})"


def markdown_table(report: dict) -> str:
    """One row per configuration; images/s at the timed number of steps (see the header, one line)."""
    meta_ = report["meta"]
    lines = [f"Steps per chain: {meta_['steps']} ({meta_['sampler']}), threads: {_threads(meta_)}, "
             f"repeats: {meta_['repeats']}, ms/step = median chain / steps, images/s at {meta_['steps']} steps; "
             f"{load_line(meta_)}; spread: (max - min) / median of the repeats (ms/step range), noisy above "
             f"{100 * BENCH_NOISY_SPREAD:.0f}%.",
             "", "| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in report["results"]:
        sp = r.get("speedup_vs_diffusers")
        peak = r.get("peak_rss_mb")
        backend = f"auto: {r['backend']}" if r.get("runtime_backend") == "auto" else r["backend"]
        cells = (r["model"], backend, r["dtype"], str(r.get("threads", "")), str(r["batch"]),
                 f"{r['ms_per_step']:.2f}", f"{r['engine_ms']:.2f}", f"{r['images_per_s']:.2f}", _spread_cell(r),
                 f"{100 * r['overhead']:.2f}%", "–" if peak is None else f"{peak:.0f}",
                 "–" if not sp else f"{sp:.2f}x" + (" (noisy)" if r.get("speedup_noisy") else ""))
        lines.append("| " + " | ".join(cells) + " |")
    noisy = sum(bool(r.get("noisy")) for r in report["results"])
    if noisy:
        lines += ["", f"{noisy} noisy cell{'s' * (noisy > 1)}: their chains spread by more than "
                  f"{100 * BENCH_NOISY_SPREAD:.0f}% (other work on the machine?): rerun on a quieter machine or with "
                  "more --repeats before comparing them."]
    return "\n".join(lines) + "\n"


def write_report(report: dict, json_path: str | None, md_path: str | None, markdown: str | None = None) -> None:
    """The one report writer (the bench command and benchmarks/): JSON, with non-finite floats as strings (JSON has
    none; an exact match gives PSNR inf), and Markdown (`markdown`, default the bench table), each written
    atomically."""
    for path, text in ((json_path, lambda: json.dumps(_json_safe(report), indent=2, default=float)),
                       (md_path, lambda: markdown_table(report) if markdown is None else markdown)):
        if path:
            write_bytes_atomic(text().encode(), check_output_path(path))


def _json_safe(obj):
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else str(float(obj))
    return obj
