"""One sampler spec, one refusal (issue 22 item 2): the same bad sampler options, given to the Python API
(`Pipeline.sample`, keywords or a `SamplerSpec`), the CLI (`run`, `verify`, `generate`, `bench`) and HTTP
(`POST /generate` on a real `ddpm-deploy serve`), are refused with the same one-line text by each."""

from __future__ import annotations

import pytest

from conftest import TINY_T, assert_one_line_error, cli

httpx = pytest.importorskip("httpx")

from ddpm_deploy.errors import UserError  # noqa: E402

# (spec fields, words the refusal must hold); the tiny model has T = TINY_T = 50
BAD = [
    ({"sampler": "dpmpp", "eta": 0.5}, ["eta applies to sampler ddim only", "dpmpp has no eta"]),
    ({"eta": 0.5}, ["eta applies to sampler ddim only", "the default sampler has no eta"]),
    ({"sampler": "ddim", "eta": 1.5}, ["eta must be a finite number between 0 and 1", "got 1.5"]),
    ({"sampler": "dpmpp", "order": 5}, ["order for dpmpp must be between 1 and 3", "got 5"]),
    ({"sampler": "ddim", "order": 2}, ["sampler ddim has no order"]),
    ({"sampler": "ddim", "steps": 0}, ["steps must be between 1 and T", "got 0"]),
    ({"sampler": "euler"}, ["unknown sampler 'euler'", "dpmpp_sde"]),
    ({"sampler": "ddim", "variant": "bh1"}, ["sampler ddim has no variant", "unipc"]),
    ({"sampler": "unipc", "variant": "bh9"}, ["unknown unipc variant 'bh9'"]),
    ({"sampler": "dpmpp", "spacing": "sideways"}, ["unknown timestep spacing 'sideways'", "trailing"]),
    ({"sampler": "ddim", "spacing": "linspace"}, ["sampler ddim uses 'leading' timestep spacing only"]),
    ({"sampler": "ddim", "steps": TINY_T + 1}, [f"steps must be between 1 and T={TINY_T}", f"got {TINY_T + 1}"]),
]
IDS = ["-".join(f"{k}={v}" for k, v in fields.items()) for fields, _ in BAD]


@pytest.fixture(scope="module")
def pipe(tiny_onnx):
    from ddpm_deploy.runtime import load

    with load(tiny_onnx, backend="onnxruntime", threads=1) as p:
        yield p


def _flags(fields: dict) -> list[str]:
    return [a for k, v in fields.items() for a in (f"--{k}", str(v))]


def _python_refusal(pipe, **fields) -> str:
    with pytest.raises(UserError) as e:
        pipe.sample(1, **fields)
    return str(e.value)


@pytest.mark.parametrize("fields,words", BAD, ids=IDS)
def test_python_cli_and_http_refuse_with_the_same_line(server, pipe, tiny_onnx, tiny_ckpt, tmp_path, fields, words):
    said = {"python keywords": _python_refusal(pipe, **fields)}
    from ddpm_deploy.sampling.spec import SamplerSpec

    try:
        said["python SamplerSpec"] = _python_refusal(pipe, spec=SamplerSpec(**fields))
    except UserError as e:   # refused when built: the rules that need no model
        said["python SamplerSpec"] = str(e)
    r = httpx.post(server.url + "/generate", json={"n": 1, **fields}, timeout=60)
    assert r.status_code == 422, (r.status_code, r.text)
    said["http"] = r.json()["error"]
    commands = {
        "run": ["run", "--engine", tiny_onnx, "--backend", "onnxruntime", "-n", "1", "-o", tmp_path / "s.png"],
        "generate": ["generate", "--engine", tiny_onnx, "-n", "1", "--out", tmp_path / "gen"],
        "verify": ["verify", "--engine", tiny_onnx, "--backend", "onnxruntime", "--checkpoint", tiny_ckpt, "-n", "1",
                   "--report", tmp_path / "v.json"],
    }
    for name, args in commands.items():
        line = assert_one_line_error(cli(*args, *_flags(fields)), *words)
        said[f"cli {name}"] = line.removeprefix("error: ")
    assert len(set(said.values())) == 1, said
    assert all(w in said["http"] for w in words), said["http"]
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "gen").exists() and not (tmp_path / "v.json").exists()


def test_bench_refuses_with_the_same_line(pipe, tiny_onnx, tmp_path):
    """bench times chains of a sampler and a step count: those two follow the same rules."""
    for fields in ({"sampler": "euler"}, {"sampler": "ddim", "steps": 0}, {"sampler": "ddim", "steps": TINY_T + 1}):
        want = _python_refusal(pipe, **fields)
        r = cli("bench", "--engine", tiny_onnx, "--backend", "onnxruntime", "--batch", "1", "--repeats", "1",
                "--no-memory", *_flags(fields))
        assert assert_one_line_error(r) == f"error: {want}", (r.stderr, want)


def test_a_spec_is_one_frozen_hashable_value():
    import dataclasses

    from ddpm_deploy.sampling.spec import SamplerSpec

    a = SamplerSpec("unipc", 8, order=3, variant="bh1", spacing="trailing")
    assert a == SamplerSpec(sampler="unipc", steps=8, order=3, variant="bh1", spacing="trailing") and hash(a)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.steps = 9
    with pytest.raises(UserError, match="order for unipc must be between 1 and 3"):
        dataclasses.replace(a, order=4)          # a changed copy is checked like a new one
    # options that only a multistep sampler has name the default one, as `run --order 2` always did
    assert SamplerSpec(order=1).sampler == "dpmpp_sde"
    assert SamplerSpec().sampler is None and SamplerSpec().with_default("ddpm").sampler == "ddpm"
    for bad in ({"steps": "4"}, {"steps": True}, {"eta": "0"}, {"order": 2.5}):
        with pytest.raises(UserError, match="must be"):
            SamplerSpec("dpmpp", **bad)


def test_a_spec_or_its_fields_not_both(pipe):
    from ddpm_deploy.sampling.spec import SamplerSpec
    from ddpm_deploy.sampling.plan import make_plan

    spec = SamplerSpec("ddim", 5)
    assert pipe.plan(spec=spec) is pipe.plan("ddim", 5)          # one cached plan per spec, however it was given
    with pytest.raises(UserError, match="not both"):
        pipe.sample(1, spec=spec, steps=6)
    with pytest.raises(UserError, match="not both"):
        make_plan(pipe.schedule, spec, 6)


def test_http_takes_order_variant_and_spacing(server, pipe):
    """The multistep options over HTTP give the images `Pipeline.sample` gives with the same spec."""
    import io

    import numpy as np

    from ddpm_deploy.tolerances import SERVE_BATCHING_X0_ATOL

    fields = {"sampler": "unipc", "steps": 6, "order": 3, "variant": "bh1", "spacing": "trailing"}
    r = httpx.post(server.url + "/generate", json={"n": 2, "seed": 3, "format": "npy", **fields}, timeout=60)
    assert r.status_code == 200, r.text
    got = np.load(io.BytesIO(r.content), allow_pickle=False)
    want = pipe.sample(2, seed=3, output="float", **fields)
    np.testing.assert_allclose(got, want, rtol=0, atol=SERVE_BATCHING_X0_ATOL)
    other = pipe.sample(2, seed=3, output="float", **{**fields, "variant": "bh2"})
    assert not np.allclose(got, other, rtol=0, atol=SERVE_BATCHING_X0_ATOL)  # the variant did reach the plan


def test_generate_takes_the_multistep_options_and_they_are_part_of_the_job(pipe, tiny_onnx, tmp_path):
    """`generate` refused --order before; now the spec reaches its plan (the images equal `Pipeline.sample`'s), and
    a folder made with one order is not resumed with another (the job's plan hash covers every option)."""
    import os

    import numpy as np

    pytest.importorskip("ray")
    from ddpm_deploy.generate.job import load_images

    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    fields = {"sampler": "unipc", "steps": 4, "order": 3, "variant": "bh1", "spacing": "trailing"}
    out = tmp_path / "job"
    r = cli("generate", "--engine", tiny_onnx, "-n", 4, "--shard-size", 4, "--seed", 2, "--workers", 1, "--out", out,
            *_flags(fields), env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(load_images(str(out)), pipe.sample(4, seed=2, output="float", **fields))
    again = cli("generate", "--engine", tiny_onnx, "-n", 4, "--shard-size", 4, "--seed", 2, "--out", out,
                *_flags({**fields, "order": 2}), env=env, timeout=300)
    assert_one_line_error(again, "holds a different generate job", "plan_sha256")


def test_bench_times_the_spec_it_was_given(tiny_onnx, tiny_ckpt, tmp_path, monkeypatch):
    """bench's flags are run's: the timed chains and the warm-up sample the whole spec (only steps differ), the
    report's rows record it, and diffusers' side is built with the same order, variant and spacing."""
    import json

    from ddpm_deploy.bench.sides import diffusers_pipeline
    from ddpm_deploy.cli import bench
    from ddpm_deploy.runtime.pipeline import Pipeline
    from ddpm_deploy.sampling.spec import SamplerSpec

    seen, real = [], Pipeline.sample
    monkeypatch.setattr(Pipeline, "sample", lambda self, n, **kw: seen.append(kw.get("spec")) or real(self, n, **kw))
    fields = {"sampler": "unipc", "steps": 4, "order": 3, "variant": "bh1", "spacing": "trailing"}
    bench.main(["--engine", tiny_onnx, "--backend", "onnxruntime", "--batch", "1", "--repeats", "2", "--warmup", "2",
                "--no-memory", "--quiet", "--json", str(tmp_path / "b.json"), *_flags(fields)], standalone_mode=False)
    want = SamplerSpec(**fields)
    assert seen == [SamplerSpec(**{**fields, "steps": 2}), want, want], seen
    assert json.loads((tmp_path / "b.json").read_text())["results"][0]["sampling"] == want.to_dict()
    config = diffusers_pipeline(tiny_ckpt, want).scheduler.config
    assert (config.solver_order, config.solver_type, config.timestep_spacing) == (3, "bh1", "trailing")
