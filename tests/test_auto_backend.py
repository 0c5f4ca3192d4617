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
from ddpm_deploy.runtime.auto import (Candidate, candidates, choose, library_versions, machine_facts,
                                      pick)
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
    assert all(r["verified"] for r in table), table  # fp32 kernels and bf16 both agree on the tiny model
    assert pick(table)["candidate"] == choice.label
    assert not choice.cached and os.path.isfile(choice.cache_file)
    assert any(line.startswith("backend auto: chose " + choice.label) for line in echo), echo
    with load(tiny_onnx, echo=Lines()) as pipe:  # the default for .onnx on the CPU (conftest's cache folder)
        assert pipe.backend_choice.backend == pipe.backend.name.split("-")[0]


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
