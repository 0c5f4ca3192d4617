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


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    """One results folder for the module: the models are exported once and reused by every mode."""
    return tmp_path_factory.mktemp("bench_out")


def _script(name: str, *args, tmp_path, code: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *map(str, args)], capture_output=True,
                       text=True, timeout=900, env=env, cwd=tmp_path)
    assert r.returncode == code, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@needs_openvino
def test_bench_cpu_quick(tmp_path, out):
    _script("bench_cpu.py", "--quick", "--models", "shipped", "--rounds", "1", "--out", out, tmp_path=tmp_path)
    report = json.loads((out / "bench_cpu.json").read_text())
    kinds = {r["runtime_backend"] for r in report["results"]}
    assert {"auto", "host-loop", "onnxruntime", "diffusers"} <= kinds, kinds
    targets = [t["target"] for t in report["targets"]]
    assert any("loop overhead" in t for t in targets) and any("numpy host loop" in t for t in targets), targets
    assert (out / "bench_cpu.md").read_text().startswith("# CPU benchmark (quick run")


def test_bench_cpu_fused_ab_quick(tmp_path, out):
    """--fused-ab (was benchmarks/cpu_fused_ab.py): both loops timed on each backend asked for."""
    r = _script("bench_cpu.py", "--fused-ab", "--quick", "--configs", "onnxruntime fp32", "--out", out,
                tmp_path=tmp_path)
    (row,) = json.loads((out / "fused_ab.json").read_text())["rows"]
    assert row["config"] == "onnxruntime fp32" and row["fused_ms"] > 0 and row["host_ms"] > 0 and row["ratio"] > 0
    rows = [line for line in r.stdout.splitlines() if line.startswith("| shipped | onnxruntime fp32 |")]
    assert len(rows) == 1 and rows[0].count("|") == 8, r.stdout


@needs_openvino
def test_bench_cpu_openvino_quick(tmp_path, out):
    """--openvino (was benchmarks/openvino_cpu.py): every row, the diffusers baseline, the bf16 check."""
    _script("bench_cpu.py", "--openvino", "--quick", "--models", "shipped", "--batches", "1", "--out", out,
            tmp_path=tmp_path)
    report = json.loads((out / "openvino_cpu.json").read_text())
    (run,) = report["runs"]
    assert run["model"] == "shipped" and run["batch"] == 1
    assert {"onnxruntime-fp32", "openvino-fp32", "openvino-fp32-dynamic", "diffusers"} <= set(run["rows"])
    for row in ("openvino-fp32", "onnxruntime-fp32", "diffusers"):
        assert all(run["rows"][row][k] > 0 for k in ("eps", "ddpm", "ddim")), row
    assert run["rows"]["openvino-fp32"]["config"]["loop"] == "fused step in the engine"
    assert run["ratios"]["eps: openvino-fp32 vs onnxruntime-fp32"] > 0
    assert "shipped" in report["bf16_verify"] and (out / "openvino_cpu.md").read_text().count("| shipped | 1 |") >= 5


def test_bench_cpu_refuses_options_of_another_mode(tmp_path):
    r = _script("bench_cpu.py", "--configs", "onnxruntime fp32", tmp_path=tmp_path, code=2)
    assert "--configs" in r.stderr.strip().splitlines()[-1] and "Traceback" not in r.stderr
