"""The benchmark logic on the tiny model: fields, medians, the overhead formula, bad input. No speed assertions
(a test machine's speed says nothing; the targets live in benchmarks/)."""

from __future__ import annotations

import json
import os
import re
import statistics

import pytest

from ddpm_deploy.bench import BenchSpec, markdown_table, run_benchmark, summarize
from ddpm_deploy.bench.report import COLUMNS
from ddpm_deploy.cli import bench
from ddpm_deploy.errors import UserError

STEPS, REPEATS = 3, 2


def quiet(*_):
    pass


def _check_row(row: dict, batch: int) -> None:
    assert row["batch"] == batch and row["steps"] == STEPS and row["repeats"] == REPEATS
    for key in ("ms_per_step", "engine_ms", "engine_ms_min", "chain_ms", "images_per_s"):
        assert row[key] > 0, key
    assert len(row["chain_s"]) == len(row["engine_s"]) == REPEATS
    # every timed engine call is inside its chain, so the engine sum never exceeds the chain
    assert all(0 < e <= t for t, e in zip(row["chain_s"], row["engine_s"]))
    want = statistics.median((t - e) / t for t, e in zip(row["chain_s"], row["engine_s"]))
    assert row["overhead"] == pytest.approx(want, rel=1e-12)
    assert row["images_per_s"] == pytest.approx(batch / statistics.median(row["chain_s"]), rel=1e-12)


def test_runtime_rows(tiny_onnx):
    spec = BenchSpec(engines=[tiny_onnx], backends=["onnxruntime"], batches=[2, 1], steps=STEPS, repeats=REPEATS,
                     warmup=1, threads=1, memory=False)
    report = run_benchmark(spec, echo=quiet)
    rows = report["results"]
    assert [r["batch"] for r in rows] == [1, 2]
    for row, batch in zip(rows, (1, 2)):
        _check_row(row, batch)
        assert row["backend"] == "onnxruntime-cpu" and row["dtype"] == "fp32"
        assert row["engine_calls"] == STEPS * REPEATS  # one eps call per step, warm-up not counted
        assert row["speedup_vs_diffusers"] is None
    assert report["meta"]["threads"] == 1 and report["meta"]["steps"] == STEPS


def test_auto_rows_carry_the_table_it_chose_from(tiny_onnx):
    spec = BenchSpec(engines=[tiny_onnx], batches=[1], steps=STEPS, repeats=REPEATS, warmup=1, memory=False)
    (row,) = run_benchmark(spec, echo=quiet)["results"]  # no backend named: .onnx on the CPU runs on auto
    _check_row(row, 1)
    auto = row["auto"]
    assert row["runtime_backend"] == "auto" and auto["table"][0]["note"] == "reference"
    assert row["backend"].startswith(auto["backend"]) and row["threads"] == auto["threads"]
    assert "* " + chosen_label(auto) in auto["table_text"]
    chosen = [r for r in auto["table"] if (r["backend"], r["precision"], r["threads"]) ==
              (auto["backend"], auto["precision"], auto["threads"])]
    assert len(chosen) == 1 and chosen[0]["verified"]


def chosen_label(auto: dict) -> str:
    return f"{auto['backend']} {auto['precision']} {auto['threads']}t"


def test_cli_prints_the_auto_table(tiny_onnx, capsys):
    bench.main(["--engine", tiny_onnx, "--batch", "1", "--steps", str(STEPS), "--repeats", "1", "--warmup", "0",
                "--no-memory"], standalone_mode=False)
    out = capsys.readouterr().out
    assert "the CPU candidates it chose from" in out and "onnxruntime fp32" in out and "| auto: " in out


def test_overhead_formula():
    raw = {"chain_s": [1.0, 2.0, 4.0], "engine_s": [0.9, 1.0, 3.0], "durations": [0.3] * 9,
           "intervals": [0.35] * 6, "engine_calls": 9}
    row = summarize(raw, batch=2, steps=3)
    assert row["overhead"] == pytest.approx(0.25)  # median of 0.1, 0.5, 0.25
    assert row["ms_per_step"] == pytest.approx(2000 / 3) and row["engine_ms"] == pytest.approx(300.0)
    assert row["step_interval_ms"] == pytest.approx(350.0)  # the pooled engine-call intervals, JSON only
    assert row["images_per_s"] == pytest.approx(1.0)  # batch 2 over the median chain of 2 s


def test_cli_writes_json_and_markdown_with_memory(tiny_onnx, tmp_path):
    js, md = tmp_path / "b.json", tmp_path / "b.md"
    bench.main(["--engine", tiny_onnx, "--backend", "onnxruntime", "--batch", "1,2", "--steps", str(STEPS),
                "--repeats", str(REPEATS), "--warmup", "1", "--threads", "1", "--json", str(js), "--markdown", str(md)],
               standalone_mode=False)
    report = json.loads(js.read_text())
    for row, batch in zip(report["results"], (1, 2)):
        _check_row(row, batch)
        assert 0 < row["baseline_rss_mb"] < row["peak_rss_mb"], row  # loading a model costs memory
    table = md.read_text()
    assert table == markdown_table(report)
    assert "| model | backend |" in table and table.count("| onnxruntime-cpu | fp32 |") == 2


def test_checkpoint_adds_torch_and_diffusers(tiny_onnx, tiny_ckpt):
    pytest.importorskip("diffusers")
    spec = BenchSpec(engines=[tiny_onnx], checkpoint=tiny_ckpt, backends=["onnxruntime"], batches=[2], steps=STEPS,
                     repeats=REPEATS, warmup=1, threads=1, memory=False)
    rows = run_benchmark(spec, echo=quiet)["results"]
    by = {r["runtime_backend"]: r for r in rows}
    assert set(by) == {"onnxruntime", "torch", "diffusers"}
    for r in rows:
        _check_row(r, 2)
        assert r["speedup_vs_diffusers"] == pytest.approx(by["diffusers"]["chain_ms"] / r["chain_ms"])
    assert by["diffusers"]["engine_calls"] == STEPS * REPEATS  # the UNet forward hooks saw every step


def test_engine_from_other_weights_is_refused(tiny_onnx, tiny_ckpt, tmp_path):
    torch = pytest.importorskip("torch")
    obj = torch.load(tiny_ckpt, weights_only=True)
    name = next(iter(obj["weights"]))
    obj["weights"][name] = obj["weights"][name] + 1
    other = tmp_path / "other.pt"
    torch.save(obj, other)
    with pytest.raises(UserError, match="exported from checkpoint sha256"):
        run_benchmark(BenchSpec(engines=[tiny_onnx], checkpoint=str(other), backends=["onnxruntime"], batches=[1],
                                steps=1, repeats=1, memory=False), echo=quiet)


@pytest.mark.parametrize("args, msg", [
    ([], "nothing to time"),
    (["--batch", "0"], "positive integers"),
    (["--batch", "1,x"], "positive integers"),
    (["--batch", "8"], "over this engine's maximum 4"),
    (["--steps", "0"], "steps must be between 1 and T"),
    (["--steps", "51"], "between 1 and T=50"),
    (["--repeats", "0"], "must be positive"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--backend", "torch"], "--checkpoint"),
    (["--backend", "onnx"], "--backend must be"),
    (["--precision", "bf16"], "openvino only"),
    (["--json", "/no/such/folder/b.json"], "does not exist"),
])
def test_bad_input(tiny_onnx, args, msg):
    engine = [] if args == [] else ["--engine", tiny_onnx]
    if "--backend" not in args and "--precision" not in args:
        args = args + ["--backend", "onnxruntime"]
    with pytest.raises(UserError, match=msg):
        bench.main(engine + ["--no-memory", "--warmup", "0", "--batch", "1"] + args, standalone_mode=False)


def test_missing_engine(tmp_path):
    with pytest.raises(UserError, match="not found"):
        bench.main(["--engine", str(tmp_path / "none.onnx"), "--no-memory"], standalone_mode=False)


def test_spread_is_reported_and_a_wide_one_is_noisy():
    """Issue 24: on a busy machine bench printed torch at batch 1 slower than at batch 4 and a 213x speedup with no
    warning. Every cell reports its spread over the repeats; above BENCH_NOISY_SPREAD it is marked noisy."""
    from ddpm_deploy.tolerances import BENCH_NOISY_SPREAD

    def raw(chains):
        return {"chain_s": chains, "engine_s": [0.9 * c for c in chains], "durations": [0.1] * 9,
                "intervals": [0.1] * 6, "engine_calls": 9}

    steady = summarize(raw([1.00, 1.02, 1.01]), batch=1, steps=10)
    assert steady["chain_ms_min"] == pytest.approx(1000) and steady["chain_ms_max"] == pytest.approx(1020)
    assert steady["spread"] == pytest.approx(0.02 / 1.01) and not steady["noisy"]
    busy = summarize(raw([1.0, 1.0 + 2 * BENCH_NOISY_SPREAD, 1.1]), batch=1, steps=10)
    assert busy["spread"] > BENCH_NOISY_SPREAD and busy["noisy"]
    single = summarize(raw([1.0]), batch=1, steps=10)  # one repeat: no spread to judge, not called steady
    assert single["spread"] is None and single["noisy"] is None


def test_table_header_has_the_load_and_marks_noisy_cells(tiny_onnx):
    spec = BenchSpec(engines=[tiny_onnx], backends=["onnxruntime"], batches=[1, 2], steps=STEPS, repeats=3,
                     warmup=1, threads=1, memory=False)
    report = run_benchmark(spec, echo=quiet)
    m = report["meta"]["machine"]
    assert m["loadavg_1m_at_start"] is not None and m["loadavg_1m_at_end"] is not None
    report["results"][0].update(noisy=False, spread=0.04)  # this machine's real spreads vary: fix them here
    report["results"][1].update(noisy=True, spread=0.42)
    text = markdown_table(report)
    header, blank, *table = text.split("\n")
    assert blank == "" and table[0].startswith("| model |")  # one header line: benchmarks/bench_cpu.py drops it
    assert f"load average (1 min) {m['loadavg_1m_at_start']} before / {m['loadavg_1m_at_end']} after" in header
    assert "spread" in table[0]
    assert "noisy" in table[3] and "42%" in table[3] and "noisy" not in table[2], table
    assert "1 noisy cell" in text


def test_speedup_from_a_noisy_cell_says_so():
    from ddpm_deploy.bench import add_speedups

    rows = [{"model": "m", "batch": 1, "steps": 3, "chain_ms": 10.0, "runtime_backend": "onnxruntime",
             "noisy": False},
            {"model": "m", "batch": 1, "steps": 3, "chain_ms": 2130.0, "runtime_backend": "diffusers", "noisy": True}]
    add_speedups(rows)
    assert rows[0]["speedup_vs_diffusers"] == pytest.approx(213.0) and rows[0]["speedup_noisy"]


def test_default_repeats_give_a_spread():
    repeats = next(p for p in bench.params if p.name == "repeats")
    assert repeats.default >= 5  # min / median / max of 5 chains: a spread, not just two points


def _cell_figures(table_row: str) -> tuple[float, float, float]:
    """(ms/step, low, high) as printed in one Markdown row: the ms/step cell and the spread cell's range."""
    cells = [c.strip() for c in table_row.strip("|").split("|")]
    ms = float(cells[COLUMNS.index("ms/step")])
    low, high = re.search(r"\(([\d.]+)–([\d.]+)\)", cells[COLUMNS.index("spread")]).groups()
    return ms, float(low), float(high)


def test_printed_ms_per_step_lies_within_its_printed_range():
    """bench printed `23.56 ms/step ... noisy 522% (31.72–248.67)`: ms/step was the median of engine-call intervals
    pooled over the chains, the range came from whole chains, and the chains' fixed costs put every chain above the
    interval median. Every printed figure now comes from the chains its range comes from."""
    raw = {"chain_s": [0.6342, 1.0, 4.9734], "engine_s": [0.3, 0.4, 0.5], "durations": [0.02] * 60,
           "intervals": [0.02356] * 57, "engine_calls": 60}  # 20 steps: each chain well above 20 intervals
    row = summarize(raw, batch=1, steps=20)
    report = {"meta": {"steps": 20, "sampler": "ddpm", "threads": 1, "repeats": 3, "machine": {}},
              "results": [{**row, "model": "m", "backend": "torch-cpu", "dtype": "fp32", "threads": 1}]}
    ms, low, high = _cell_figures(markdown_table(report).splitlines()[-3])
    assert low <= ms <= high, (ms, low, high)
    assert row["images_per_s"] == pytest.approx(1000 / (row["ms_per_step"] * 20))  # one chain, one figure


def test_real_cells_lie_within_their_ranges(tiny_onnx):
    spec = BenchSpec(engines=[tiny_onnx], backends=["onnxruntime"], batches=[1, 2], steps=STEPS, repeats=3,
                     warmup=1, threads=1, memory=False)
    table = markdown_table(run_benchmark(spec, echo=quiet)).splitlines()
    rows = [r for r in table if r.startswith("| ") and "onnxruntime-cpu" in r]
    assert len(rows) == 2
    for r in rows:
        ms, low, high = _cell_figures(r)
        assert low <= ms <= high, r


def test_reference_sides_default_to_the_idle_cores(tiny_onnx, tiny_ckpt, monkeypatch):
    """run/verify/eval run PyTorch on the cores other work leaves idle; bench ran it, and diffusers, on every core
    (torch's spinning threads then fight the other work). Without --threads the runtime sides keep all usable cores."""
    pytest.importorskip("diffusers")
    torch = pytest.importorskip("torch")
    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        pytest.skip("one usable core: idle and all cores are the same")
    before = torch.get_num_threads()
    monkeypatch.setattr(os, "getloadavg", lambda: (50.0, 50.0, 50.0))  # a busy machine: 1 idle core at most
    spec = BenchSpec(engines=[tiny_onnx], checkpoint=tiny_ckpt, backends=["onnxruntime"], batches=[1], steps=STEPS,
                     repeats=1, warmup=0, memory=False)
    try:
        report = run_benchmark(spec, echo=quiet)
    finally:
        torch.set_num_threads(before)
    by = {r["runtime_backend"]: r["threads"] for r in report["results"]}
    assert by == {"onnxruntime": cores, "torch": 1, "diffusers": 1}, by
    assert "PyTorch and diffusers: 1" in markdown_table(report).splitlines()[0]
