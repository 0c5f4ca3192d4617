"""One backend registry (ddpm_deploy.backend_registry): the CLI's choices, bench, serve, auto and load all take exactly
its names. A fake entry registered before anything else is imported must flow through every one of them, so a
private list of backend names re-added anywhere fails here."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap

import click
import pytest

from ddpm_deploy import backend_registry as registry


def _choices(command: click.Command, option: str) -> tuple:
    param = next(p for p in command.params if p.name == option)
    return tuple(param.type.choices)


def test_every_list_is_the_registry():
    from ddpm_deploy import cli, runtime
    from ddpm_deploy.app import opener as pipelines
    from ddpm_deploy.bench.spec import runtime_backends

    assert registry.names() == ("onnxruntime", "openvino", "tensorrt", "torch")
    for command in (cli.run, cli.verify, cli.eval_):
        assert _choices(command, "backend") == registry.names(with_auto=True)
        assert _choices(command, "precision") == registry.precisions() == ("fp32", "bf16")
    for command in (cli.serve, cli.generate):
        assert _choices(command, "backend") == registry.names()  # no auto: images must not depend on the process
    for command in (cli.run, cli.verify, cli.eval_, cli.serve, cli.generate, cli.bench):
        assert _choices(command, "device") == registry.DEVICES
    assert runtime.BACKENDS == runtime_backends() == registry.names(with_auto=True, runtime=True)
    assert pipelines.BACKENDS == registry.names()
    assert registry.names(auto=True) == ("onnxruntime", "openvino")


def test_defaults_and_rules():
    assert registry.default_backend("onnx") == "auto"
    assert registry.default_backend("onnx", "cuda") == registry.default_backend("onnx", allow_auto=False) == "onnxruntime"
    assert registry.default_backend("tensorrt") == "tensorrt"
    assert registry.default_backend("checkpoint") == "torch"
    assert registry.precision_backends() == ("openvino",)
    assert [e.name for e in registry._ENTRIES if e.cpu_threaded] == ["onnxruntime", "openvino", "torch"]


@pytest.mark.parametrize("entry", registry.entries(), ids=lambda e: e.name)
def test_entry_options_are_the_constructor_s(entry):
    """Each entry's options (and device=) are keyword arguments of its class; its class is where it says."""
    try:
        cls = entry.load_class()
    except ImportError as e:
        pytest.skip(f"{entry.name}: {e}")
    params = inspect.signature(cls.__init__).parameters
    assert set(entry.options) <= set(params), set(entry.options) - set(params)
    assert ("device" in params) >= entry.takes_device


FAKE_MODULE = '''
from ddpm_deploy.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend


class FakeBackend(OnnxRuntimeBackend):
    def __init__(self, path, threads=None, precision="fp32"):
        super().__init__(path, threads=threads)
        self.precision = precision
'''

SCRIPT = '''
import json, sys
from ddpm_deploy import backend_registry as registry

registry.register(registry.BackendEntry(
    name="fakebk", cls="fake_backend_mod:FakeBackend", kinds=("onnx",), needs="needs an .onnx file",
    devices=("cpu",), device_refusal="runs on the CPU only", options=("threads", "precision"),
    precision_rule="fp32 or int8", precisions=("fp32", "int8"), cpu_threaded=True, auto=True,
    library="onnxruntime"))

from ddpm_deploy import cli, runtime
from ddpm_deploy.app import opener as pipelines
from ddpm_deploy.bench import BenchSpec
from ddpm_deploy.bench.sides import open_runtime
from ddpm_deploy.runtime.auto import _check_cached, candidates
from ddpm_deploy.serve.service import fixed_backend

onnx = sys.argv[1]
opt = lambda cmd, name: tuple(next(p for p in cmd.params if p.name == name).type.choices)
out = {
    "run": opt(cli.run, "backend"), "verify": opt(cli.verify, "backend"), "eval": opt(cli.eval_, "backend"),
    "serve": opt(cli.serve, "backend"), "generate": opt(cli.generate, "backend"),
    "precision": opt(cli.run, "precision"), "runtime": runtime.BACKENDS, "pipelines": pipelines.BACKENDS,
    "bench_backends": list(BenchSpec(engines=[onnx], backends=["fakebk"], precisions=["int8"]).configurations()),
    "candidates": sorted({c.backend for c in candidates("float32", 1)}),
    "fixed": fixed_backend(onnx, "fakebk"),
}
_check_cached({"backend": "fakebk", "precision": "int8", "threads": 1, "reason": "a plugin's cached choice"})
with runtime.load(onnx, backend="fakebk", threads=1) as pipe:
    out["load"] = type(pipe.backend).__name__
with open_runtime(onnx, "fakebk", "cpu", "int8", 1) as pipe:
    out["bench_open"] = [type(pipe.backend).__name__, pipe.backend.precision]
print(json.dumps(out))
sys.argv = ["ddpm-deploy", "run", "--engine", onnx, "--backend", "fakebk", "--precision", "int8", "-n", "1",
            "--sampler", "ddim", "--steps", "2", "--quiet", "-o", sys.argv[2]]
cli.main()
'''


def test_a_registered_backend_flows_everywhere(tiny_onnx, tmp_path):
    """Register one entry (before the CLI is imported, as a plugin would): every list offers it and load, bench,
    auto's candidates and `ddpm-deploy run` open it."""
    (tmp_path / "fake_backend_mod.py").write_text(FAKE_MODULE)
    png = tmp_path / "out.png"
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT), tiny_onnx, str(png)], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.splitlines()[0])
    for key in ("run", "verify", "eval", "runtime"):
        assert "fakebk" in out[key] and out[key][0] == "auto", (key, out[key])
    for key in ("serve", "generate", "pipelines"):
        assert "fakebk" in out[key] and "auto" not in out[key], (key, out[key])
    assert "int8" in out["precision"]
    assert out["bench_backends"] == [[tiny_onnx, "fakebk", "int8"]]
    assert "fakebk" in out["candidates"] and out["fixed"] == "fakebk"
    assert out["load"] == "FakeBackend" and out["bench_open"] == ["FakeBackend", "int8"]
    assert png.exists() and "wrote" in r.stdout
