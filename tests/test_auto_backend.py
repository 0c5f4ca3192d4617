"""Backend auto (runtime/auto.py): real candidates on the tiny model, a real on-disk cache in tmp, real models that
disagree with the reference. No speed assertions beyond what the measured rows themselves say."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import cli
from ddpm_deploy.errors import UserError
from ddpm_deploy.runtime import load
from ddpm_deploy.runtime.auto_check import Candidate
from ddpm_deploy.runtime.auto import (candidates, choose, library_versions, machine_facts, openvino_available, pick,
                                      usable_cores)
from ddpm_deploy.tolerances import AUTO_FP32_X0_MIN_PSNR_DB

FAST = [Candidate("onnxruntime", "fp32", 1), Candidate("onnxruntime", "fp32", 2)]  # cheap list for cache tests


class Lines(list):
    def __call__(self, line: str) -> None:
        self.append(line)


def _perturbed_copy(src: str, dst, scale: float) -> str:
    """The same ONNX (manifest and graph) with every convolution weight multiplied by (1 + scale * N(0, 1))."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(src)
    rng = np.random.default_rng(0)
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if init.name in conv_weights:
            w = (w * (1 + scale * rng.standard_normal(w.shape))).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(dst))
    return str(dst)


def _cheap_wrong_copy(src: str, dst) -> str:
    """A model with the same inputs, outputs and manifest whose "network" is eps = 0.5 x_t: far faster than the
    UNet and wrong. Without the check, auto would pick it."""
    import onnx
    from onnx import TensorProto, helper

    real = onnx.load(src)
    half = helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])
    node = helper.make_node("Mul", ["x_t", "half"], [real.graph.output[0].name])
    graph = helper.make_graph([node], "cheap", list(real.graph.input), list(real.graph.output), [half])
    model = helper.make_model(graph, opset_imports=list(real.opset_import))
    model.ir_version = real.ir_version
    model.metadata_props.extend(real.metadata_props)
    onnx.save(model, str(dst))
    return str(dst)


def test_default_candidates_and_choice(tiny_onnx, tmp_path):
    echo = Lines()
    choice = choose(tiny_onnx, cache_dir=tmp_path, echo=echo)
    table = choice.table
    assert [r["candidate"] for r in table] == [c.label for c in candidates("float32")]
    assert table[0]["note"] == "reference" and table[0]["backend"] == "onnxruntime"
    fp32 = [r for r in table if r["precision"] == "fp32" and not r.get("error") and "dropped" not in r.get("note", "")]
    assert fp32 and all(r["verified"] for r in fp32), table  # fp32 kernels agree on the tiny model
    for r in table:  # a row is checked, dropped as slower, or could not run
        assert r["verified"] or r.get("error") or "dropped" in r.get("note", "") or "eps error" in r["check"], r
    assert pick(table)["candidate"] == choice.label
    assert not choice.cached and os.path.isfile(choice.cache_file)
    assert any(line.startswith("backend auto: chose " + choice.label) for line in echo), echo
    with load(tiny_onnx, echo=Lines()) as pipe:  # the default for .onnx on the CPU (conftest's cache folder)
        assert pipe.backend_choice.backend == pipe.backend.name.split("-")[0]


def test_auto_does_not_time_openvino_bf16():
    """The tour's default `run` of the shipped model failed under load (session 6): auto had chosen OpenVINO bf16
    (47 dB, 5.3x) and the run's flags refused NaN from it; CI's cached bf16 blob and 17 serve requests did the same.
    auto's default candidates are fp32 only; bf16 is the user's to ask for (--precision bf16)."""
    from ddpm_deploy.runtime.auto import _cpu_has_bf16

    if not openvino_available() or not _cpu_has_bf16():
        pytest.skip("needs OpenVINO on a CPU with bf16: elsewhere auto never offered bf16")
    assert {(c.backend, c.precision) for c in candidates("float32")} == {("onnxruntime", "fp32"),
                                                                         ("openvino", "fp32")}


def test_fp16_file_stays_on_onnxruntime():
    assert {c.backend for c in candidates("float16")} == {"onnxruntime"}


def test_cache_hit_then_invalidated_by_model_cpu_and_versions(tiny_onnx, tmp_path):
    first = choose(tiny_onnx, cache_dir=tmp_path, cands=FAST, echo=Lines())
    echo = Lines()
    again = choose(tiny_onnx, cache_dir=tmp_path, cands=FAST, echo=echo)
    assert again.cached and again.cache_file == first.cache_file and again.table == first.table
    assert len(echo) == 1 and "(cached" in echo[0]  # nothing was timed
    other_model = _perturbed_copy(tiny_onnx, tmp_path / "retrained.onnx", 1e-6)  # same graph, other weights
    other_cpu = {**machine_facts(), "flags_sha256": "0" * 16}
    other_libs = {**library_versions(), "onnxruntime": "0.0.0"}
    for kwargs in ({"path": other_model}, {"machine": other_cpu}, {"versions": other_libs}):
        path = kwargs.pop("path", tiny_onnx)
        fresh = choose(path, cache_dir=tmp_path, cands=FAST, echo=Lines(), **kwargs)
        assert not fresh.cached and fresh.cache_file != first.cache_file, kwargs
        assert choose(path, cache_dir=tmp_path, cands=FAST, echo=Lines(), **kwargs).cached, kwargs
    assert choose(tiny_onnx, cache_dir=tmp_path, cands=FAST, echo=Lines()).cached  # the first entry is still good


@pytest.mark.parametrize("garbage", [b"{not json", b"[]", b'{"key": 1}', b"\xff\xfe"])
def test_corrupt_cache_file_is_ignored_with_one_warning(tiny_onnx, tmp_path, garbage):
    first = choose(tiny_onnx, cache_dir=tmp_path, cands=FAST, echo=Lines())
    with open(first.cache_file, "wb") as f:
        f.write(garbage)
    echo = Lines()
    again = choose(tiny_onnx, cache_dir=tmp_path, cands=FAST, echo=echo)
    warnings = [line for line in echo if line.startswith("warning:")]
    assert len(warnings) == 1 and first.cache_file in warnings[0] and "measuring again" in warnings[0], echo
    assert "\n" not in warnings[0] and not again.cached
    assert json.loads(open(first.cache_file).read())["choice"]["backend"] == again.backend  # rewritten whole
    assert choose(tiny_onnx, cache_dir=tmp_path, cands=FAST, echo=Lines()).cached


def test_candidate_that_fails_verification_is_never_chosen(tiny_onnx, tmp_path):
    perturbed = _perturbed_copy(tiny_onnx, tmp_path / "perturbed.onnx", 0.5)
    cheap = _cheap_wrong_copy(tiny_onnx, tmp_path / "cheap.onnx")
    cands = [Candidate("onnxruntime", "fp32", 1), Candidate("onnxruntime", "fp32", 2, path=perturbed),
             Candidate("onnxruntime", "fp32", 2, path=cheap)]
    choice = choose(tiny_onnx, cache_dir=tmp_path, cands=cands, echo=Lines())
    ref, bad, wrong = choice.table
    for row in (bad, wrong):
        assert row["verified"] is False and row["psnr_db"] < AUTO_FP32_X0_MIN_PSNR_DB, row
    # the wrong model really was the fastest: only its failed check kept it out
    assert wrong["ms_per_step"] < ref["ms_per_step"], choice.table
    assert (choice.backend, choice.threads) == ("onnxruntime", 1) and choice.label in choice.table_text
    assert "* onnxruntime fp32 1t" in choice.table_text and "FAIL" in choice.table_text


def test_pick_rules():
    row = lambda label, ms, verified=True, precision="fp32": {  # noqa: E731
        "candidate": label, "ms_per_step": ms, "verified": verified, "precision": precision}
    assert pick([row("a", 2.0), row("b", 1.0, verified=False)])["candidate"] == "a"
    assert pick([row("a", 2.0), row("bf16", 1.0, precision="bf16")])["candidate"] == "bf16"
    assert pick([row("a", 1.05), row("bf16", 1.0, precision="bf16")])["candidate"] == "a"  # gain within noise
    assert pick([row("a", 1.0), row("err", None, verified=False)])["candidate"] == "a"
    with pytest.raises(UserError, match="no CPU candidate passed"):
        pick([row("a", 1.0, verified=False)])


def test_auto_refuses_what_it_cannot_choose_for(tiny_onnx):
    with pytest.raises(UserError, match="chooses among CPU backends"):
        load(tiny_onnx, device="cuda", backend="auto")
    with pytest.raises(UserError, match="takes only threads"):
        load(tiny_onnx, backend="auto", precision="bf16")


def test_cli_run_says_what_it_chose_and_then_starts_from_the_cache(tiny_onnx, tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    args = ["run", "--engine", tiny_onnx, "-n", "1", "--steps", "2", "--quiet", "-o", tmp_path / "a.png"]
    first = cli(*args, env=env)
    assert first.returncode == 0, first.stderr
    assert "backend auto: chose " in first.stderr and "x_0 PSNR" in first.stderr, first.stderr
    second = cli(*args, env=env)
    assert second.returncode == 0 and "timing" not in second.stderr and "(cached: " in second.stderr, second.stderr
    forced = cli(*args[:-2], "--backend", "onnxruntime", "-o", tmp_path / "b.png", env=env)
    assert forced.returncode == 0 and "backend auto" not in forced.stderr, forced.stderr


def test_candidate_that_cannot_run_is_left_out_with_its_reason(tiny_onnx, tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx file")
    cands = [Candidate("onnxruntime", "fp32", 1), Candidate("onnxruntime", "fp32", 2, path=str(broken))]
    choice = choose(tiny_onnx, cache_dir=tmp_path, cands=cands, echo=Lines())
    bad = choice.table[1]
    assert bad["verified"] is False and bad["ms_per_step"] is None and "not a readable ONNX" in bad["error"], bad
    assert (choice.backend, choice.threads) == ("onnxruntime", 1) and "error: " in choice.table_text


# ---------------------------------------------------------------------------------------------------- issue 21/24
def test_machine_facts_read_the_real_cpu():
    """/proc/cpuinfo keys end in a tab ("model name\t: ..."): the facts must hold the CPU's name and a hash of its
    real flags, so a choice cached on a CPU with bf16 is never reused on one without."""
    import hashlib

    if not os.path.isfile("/proc/cpuinfo"):
        pytest.skip("no /proc/cpuinfo on this system")
    fields = {}
    for line in open("/proc/cpuinfo"):
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    if "flags" not in fields:
        pytest.skip("this /proc/cpuinfo lists no flags")
    facts = machine_facts()
    expected_flags = hashlib.sha256(" ".join(sorted(fields["flags"].split())).encode()).hexdigest()[:16]
    assert facts["flags_sha256"] == expected_flags != hashlib.sha256(b"").hexdigest()[:16], facts
    if "model name" in fields:
        assert facts["cpu"] == fields["model name"], facts


# threads above the usable cores: 2 x cores + 1 rather than the 3000, which on the unfixed code really started
# that many threads (load average > 700 on 2 cores)
OVER = 2 * usable_cores() + 1


@pytest.mark.parametrize("tamper", [{"backend": "torch"}, {"threads": -3}, {"threads": OVER}, {"threads": 0},
                                    {"precision": "fp16"}, {"backend": "onnxruntime", "precision": "bf16"},
                                    {"threads": 1.5}])
def test_tampered_cache_value_gives_one_warning_and_a_fresh_measurement(tiny_onnx, tmp_path, tamper):
    first = choose(tiny_onnx, cache_dir=tmp_path, cands=FAST, echo=Lines())
    data = json.loads(open(first.cache_file).read())
    data["choice"].update(tamper)
    with open(first.cache_file, "w") as f:
        json.dump(data, f)
    echo = Lines()
    again = choose(tiny_onnx, cache_dir=tmp_path, cands=FAST, echo=echo)
    warnings = [line for line in echo if line.startswith("warning:")]
    assert len(warnings) == 1 and first.cache_file in warnings[0] and "measuring again" in warnings[0], echo
    assert not again.cached and again.table[0]["ms_per_step"] > 0 and again.table != first.table  # measured afresh
    assert again.backend == "onnxruntime" and 1 <= again.threads <= usable_cores()
    assert choose(tiny_onnx, cache_dir=tmp_path, cands=FAST, echo=Lines()).cached  # the rewritten file is good


@pytest.mark.parametrize("threads", [0, -3])
def test_threads_below_one_are_refused(tiny_onnx, tmp_path, threads):
    for backend in ("onnxruntime", "auto"):
        with pytest.raises(UserError, match="--threads must be at least 1"):
            load(tiny_onnx, backend=backend, threads=threads, echo=Lines())
    r = cli("run", "--engine", tiny_onnx, "-n", "1", "--steps", "2", "--threads", threads, "-o", tmp_path / "a.png",
            env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--threads" in r.stderr, r.stderr
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "xdg").exists()  # nothing timed, nothing cached


def test_threads_above_the_usable_cores_are_capped(tiny_onnx, tmp_path):
    echo = Lines()
    with load(tiny_onnx, backend="onnxruntime", threads=OVER, echo=echo) as pipe:
        assert pipe.backend.session.get_session_options().intra_op_num_threads == usable_cores()
    assert len(echo) == 1 and f"{OVER}" in echo[0] and f"{usable_cores()}" in echo[0], echo
    assert [c.threads for c in candidates("float32", threads=OVER)] == [usable_cores()] * len(candidates("float32", 1))
    r = cli("run", "--engine", tiny_onnx, "-n", "1", "--steps", "2", "--threads", OVER, "--backend", "onnxruntime",
            "-o", tmp_path / "a.png")
    assert r.returncode == 0 and "capped" in r.stderr and r.stderr.count("capped") == 1, r.stderr


def test_reason_never_contradicts_itself():
    """2.25 / 2.05 = 1.0976: shown as "1.10x ... (needs >= 1.10x)" it read as if the rule were broken."""
    import re

    from ddpm_deploy.runtime.auto import REDUCED_MIN_GAIN, reason, table_text

    rows = [{"candidate": "onnxruntime fp32 2t", "backend": "onnxruntime", "precision": "fp32", "threads": 2,
             "ms_per_step": 2.25, "verified": True, "psnr_db": None, "min_psnr_db": None, "note": "reference"},
            {"candidate": "openvino bf16 2t", "backend": "openvino", "precision": "bf16", "threads": 2,
             "ms_per_step": 2.05, "verified": True, "psnr_db": 48.0, "min_psnr_db": 35.0}]
    best = pick(rows)
    assert best is rows[0]
    text = reason(best, rows)
    shown, needed = re.search(r"only ([0-9.]+)x faster .*needs >= ([0-9.]+)x", text).groups()
    assert float(shown) < float(needed) and float(needed) == REDUCED_MIN_GAIN, text
    failing = {**rows[1], "psnr_db": 34.96, "verified": False}  # "35.0 dB (>= 35: FAIL)" was the table's version
    line = table_text([rows[0], failing], rows[0]["candidate"]).splitlines()[-1]
    got, bound = re.search(r"PSNR ([0-9.]+) dB \(>= ([0-9.]+): FAIL", line).groups()
    assert float(got) < float(bound), line


def _slow_copy(src: str, dst, matmuls: int = 128, width: int = 1024) -> str:
    """The same model with a chain of width x width MatMuls on x_t whose result is multiplied by 0 and added to eps:
    the same numbers, many times the work per step."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(src)
    g = m.graph
    eps = g.output[0].name
    rng = np.random.default_rng(0)
    size = int(np.prod([d.dim_value for d in g.input[0].type.tensor_type.shape.dim[1:]]))
    g.initializer.extend([numpy_helper.from_array(np.array([1, -1], np.int64), "s_shape"),
                          numpy_helper.from_array(rng.standard_normal((size, width)).astype(np.float32) / 8, "s_in"),
                          numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32) / 32, "s_w"),
                          numpy_helper.from_array(np.array(0.0, np.float32), "s_zero")])
    nodes = [helper.make_node("Reshape", ["x_t", "s_shape"], ["s_flat"]),
             helper.make_node("MatMul", ["s_flat", "s_in"], ["s_h0"])]
    for i in range(matmuls):
        nodes.append(helper.make_node("MatMul", [f"s_h{i}", "s_w"], [f"s_h{i + 1}"]))
    nodes += [helper.make_node("ReduceMean", [f"s_h{matmuls}"], ["s_mean"], keepdims=0),
              helper.make_node("Mul", ["s_mean", "s_zero"], ["s_nothing"]),
              helper.make_node("Add", [eps, "s_nothing"], ["eps_slow"])]
    g.node.extend(nodes)
    g.output[0].name = "eps_slow"
    onnx.save(m, str(dst))
    return str(dst)


def test_clearly_slower_candidate_is_dropped_early_and_the_duration_is_announced(tiny_onnx, tmp_path):
    """Budgeted first use: a candidate clearly slower than the best so far stops after a few steps instead of
    running its whole check, and auto says up front how long the measurement should take."""
    from ddpm_deploy.runtime.auto_check import CHECK_STEPS

    # 1024 MatMuls of 1024 x 1024 per step (~1 G multiply-adds, >= 0.1 s on any CPU here): the rest of its check
    # always exceeds DROP_MIN_S, so it is dropped on a quiet machine too (128 passed alone but not in the suite)
    slow = _slow_copy(tiny_onnx, tmp_path / "slow.onnx", matmuls=1024)
    cands = [Candidate("onnxruntime", "fp32", 1), Candidate("onnxruntime", "fp32", 1, path=slow)]
    echo = Lines()
    choice = choose(tiny_onnx, cache_dir=tmp_path, cands=cands, echo=echo)
    ref, dropped = choice.table
    assert dropped["warmup_s"] > 2 * ref["warmup_s"], choice.table  # it really is slower (dropped after its warm-up)
    assert dropped["verified"] is False and "dropped" in dropped["note"], dropped
    assert dropped["steps_timed"] < CHECK_STEPS - 1, dropped
    assert (choice.backend, choice.threads) == ("onnxruntime", 1) and "dropped" in choice.table_text
    import re

    assert any(re.match(r"backend auto: first use takes about \d+ s", line) for line in echo[:2]), echo


def _bad_tables():
    row = {"candidate": "onnxruntime fp32 1t", "backend": "onnxruntime", "precision": "fp32", "threads": 1,
           "ms_per_step": 1.0, "verified": True, "psnr_db": None, "min_psnr_db": None, "note": "reference"}
    return {"a string": "abc", "an object": {"candidate": 1}, "empty": [], "rows not objects": [1, 2],
            "a row without candidate": [{k: v for k, v in row.items() if k != "candidate"}],
            "ms_per_step a string": [{**row, "ms_per_step": "fast"}], "ms_per_step NaN": [{**row, "ms_per_step": "NaN"}],
            "threads true": [{**row, "threads": True}], "min_psnr_db a list": [{**row, "min_psnr_db": [1]}],
            "a non-reference row without a PSNR bound": [row, {**row, "note": "x", "min_psnr_db": None}],
            "nested": [[[[[]]]]] * 3}


@pytest.mark.parametrize("what", list(_bad_tables()))
def test_tampered_cache_table_gives_one_warning_and_a_fresh_measurement(tiny_onnx, tmp_path, what):
    """A cached `table` that `run` and `bench --backend auto` cannot print (bench raised TypeError) is a bad file:
    one warning naming it, and a fresh measurement."""
    first = choose(tiny_onnx, cache_dir=tmp_path, cands=FAST, echo=Lines())
    text = open(first.cache_file).read()
    data = json.loads(text)
    data["table"] = _bad_tables()[what]
    text = json.dumps(data).replace('"NaN"', "NaN")   # json's non-standard NaN literal, as Python writes it
    with open(first.cache_file, "w") as f:
        f.write(text)
    echo = Lines()
    again = choose(tiny_onnx, cache_dir=tmp_path, cands=FAST, echo=echo)
    warnings = [line for line in echo if line.startswith("warning:")]
    assert len(warnings) == 1 and first.cache_file in warnings[0] and "measuring again" in warnings[0], echo
    assert not again.cached and again.table[0]["ms_per_step"] > 0
    assert "onnxruntime fp32" in again.table_text and json.dumps(again.to_dict())   # what bench prints and writes
    assert choose(tiny_onnx, cache_dir=tmp_path, cands=FAST, echo=Lines()).cached


@pytest.mark.parametrize("where", ["file", "table", "reason"])
def test_deeply_nested_cache_json_gives_one_warning_and_a_fresh_measurement(tiny_onnx, tmp_path, where):
    """JSON nested 100 000 deep (json.loads raised RecursionError on every run until the file was deleted)."""
    first = choose(tiny_onnx, cache_dir=tmp_path, cands=FAST, echo=Lines())
    deep = "[" * 100_000 + "]" * 100_000
    text = open(first.cache_file).read()
    if where == "file":
        text = deep
    else:
        data = json.loads(text)
        if where == "table":
            data["table"] = "DEEP"
        else:
            data["choice"]["reason"] = "DEEP"
        text = json.dumps(data).replace('"DEEP"', deep)
    with open(first.cache_file, "w") as f:
        f.write(text)
    for _ in range(2):   # the warning once, then the rewritten file is good
        echo = Lines()
        again = choose(tiny_onnx, cache_dir=tmp_path, cands=FAST, echo=echo)
        if _ == 0:
            warnings = [line for line in echo if line.startswith("warning:")]
            assert len(warnings) == 1 and first.cache_file in warnings[0], echo
            assert not again.cached
        else:
            assert again.cached and not [line for line in echo if line.startswith("warning:")]
