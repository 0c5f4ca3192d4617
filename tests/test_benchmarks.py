"""The CPU benchmark scripts still run end to end (short settings): they hold the speed targets, and one of them
broke silently once when an API under it changed. Their figures are not checked here (a test machine's speed says
nothing); what is checked is that each produces its report with the rows it promises."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
needs_openvino = pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed")


def _script(name: str, *args, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *map(str, args)], capture_output=True,
                       text=True, timeout=900, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@needs_openvino
def test_bench_cpu_quick(tmp_path):
    _script("bench_cpu.py", "--quick", "--models", "shipped", "--rounds", "1", "--out", tmp_path / "out",
            tmp_path=tmp_path)
    report = json.loads((tmp_path / "out" / "bench_cpu.json").read_text())
    kinds = {r["runtime_backend"] for r in report["results"]}
    assert {"auto", "host-loop", "onnxruntime", "diffusers"} <= kinds, kinds
    targets = [t["target"] for t in report["targets"]]
    assert any("loop overhead" in t for t in targets) and any("numpy host loop" in t for t in targets), targets
    assert (tmp_path / "out" / "bench_cpu.md").read_text().startswith("# CPU benchmark (quick run")


def test_cpu_fused_ab_short(tmp_path):
    r = _script("cpu_fused_ab.py", "--rounds", "1", "--chains", "1", "--steps", "20", "--configs",
                "onnxruntime fp32", "--work", tmp_path / "work", tmp_path=tmp_path)
    rows = [line for line in r.stdout.splitlines() if line.startswith("| onnxruntime fp32 |")]
    assert len(rows) == 1 and rows[0].count("|") == 7, r.stdout


@needs_openvino
def test_openvino_cpu_quick(tmp_path):
    _script("openvino_cpu.py", "--quick", "--models", "digits", "--batches", "1", "--work", tmp_path / "work",
            "--json", tmp_path / "ov.json", tmp_path=tmp_path)
    report = json.loads((tmp_path / "ov.json").read_text())
    (run,) = report["runs"]
    assert run["model"] == "digits" and run["batch"] == 1
    assert {"onnxruntime-fp32", "openvino-fp32"} <= set(run["rows"])
    assert all(run["rows"]["openvino-fp32"][k] > 0 for k in ("eps", "ddpm", "ddim"))
    assert run["rows"]["openvino-fp32"]["config"]["loop"] == "fused step in the engine"
