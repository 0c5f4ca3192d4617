"""Every command in an install without one of the extras (torch, openvino, serve): one `error:` line naming the
extra and its `pip install` line, exit status 2, no traceback, nothing written; commands that do not need the extra
keep working.

An install without an extra is simulated by a sitecustomize.py on PYTHONPATH that sets sys.modules[m] = None for
the extra's modules: every import of them then fails, in this process and in any process it starts (Ray's workers
inherit the environment), as in a venv where they were never installed. (tests/test_cli_errors.py covers the torch
extra's commands the same way with a `-c` wrapper.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import assert_one_line_error

EXTRAS = {  # the extra -> the top-level modules it installs (pyproject.toml)
    "torch": "torch,diffusers,safetensors,sklearn,onnxscript,matplotlib",
    "openvino": "openvino",
    "int8": "nncf",
    "serve": "fastapi,starlette,uvicorn,httpx,ray",
}

SITECUSTOMIZE = """import os, sys
for _m in filter(None, os.environ.get("DDPM_TEST_BLOCK", "").split(",")):
    sys.modules[_m] = None  # import of _m now fails: as if never installed
"""

# (extra missing, command line). {onnx}: the tiny exported model, {ckpt}: its checkpoint, {d}: a scratch folder.
NEEDS = [
    ("serve", ["serve", "--engine", "{onnx}", "--port", "1"]),
    ("serve", ["serve", "--engine", "{onnx}", "--ray", "--port", "1"]),
    ("serve", ["generate", "--engine", "{onnx}", "-n", "2", "--out", "{d}/g"]),
    ("openvino", ["run", "--engine", "{onnx}", "--backend", "openvino", "-n", "1", "-o", "{d}/s.png"]),
    ("openvino", ["verify", "--engine", "{onnx}", "--checkpoint", "{ckpt}", "--backend", "openvino",
                  "--report", "{d}/v.json"]),
    ("openvino", ["eval", "--engine", "{onnx}", "--backend", "openvino", "-n", "1"]),
    ("openvino", ["bench", "--engine", "{onnx}", "--backend", "openvino", "--no-memory"]),
    ("openvino", ["serve", "--engine", "{onnx}", "--backend", "openvino", "--port", "1"]),
    ("openvino", ["generate", "--engine", "{onnx}", "--backend", "openvino", "-n", "2", "--out", "{d}/g"]),
    ("int8", ["export", "{ckpt}", "--int8", "-o", "{d}/m.int8.xml"]),
    ("torch", ["serve", "--engine", "{ckpt}", "--port", "1"]),
    ("torch", ["serve", "--engine", "{onnx}", "--backend", "torch", "--port", "1"]),
    ("torch", ["run", "--engine", "{onnx}", "--backend", "torch", "-o", "{d}/s.png"]),
]

# what needs none of the extra it runs without (quick settings)
STILL_WORKS = [
    ("serve", ["run", "--engine", "{onnx}", "-n", "1", "--sampler", "ddim", "--steps", "2", "--backend",
               "onnxruntime", "-o", "{d}/s.png"]),
    ("openvino", ["run", "--engine", "{onnx}", "-n", "1", "--sampler", "ddim", "--steps", "2", "-o", "{d}/s.png"]),
    ("torch", ["info", "{onnx}"]),
]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("site")
    (d / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return str(d)


def without(extra: str, args: list, site: str, subs: dict, cwd) -> subprocess.CompletedProcess:
    argv = []
    for a in args:
        for k, v in subs.items():
            a = a.replace(k, v)
        argv.append(a)
    env = {**os.environ, "DDPM_TEST_BLOCK": EXTRAS[extra],
           "PYTHONPATH": os.pathsep.join([site, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "ddpm_deploy.cli", *argv], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_the_simulation_blocks_the_modules(site, tmp_path):
    for extra, modules in EXTRAS.items():
        r = subprocess.run([sys.executable, "-c", f"import {modules.split(',')[0]}"], capture_output=True, text=True,
                           env={**os.environ, "DDPM_TEST_BLOCK": modules, "PYTHONPATH": site})
        assert r.returncode == 1 and "ModuleNotFoundError" in r.stderr, (extra, r.stderr)


@pytest.mark.parametrize("extra,args", NEEDS, ids=[f"no-{e}-{' '.join(a[:1] + a[3:4])}" for e, a in NEEDS])
def test_command_without_its_extra_is_one_line(extra, args, site, tiny_onnx, tiny_ckpt, tmp_path):
    r = without(extra, args, site, {"{onnx}": tiny_onnx, "{ckpt}": tiny_ckpt, "{d}": str(tmp_path)}, tmp_path)
    assert_one_line_error(r, f'pip install "ddpm-deploy[{extra}]"', "not installed")
    assert list(tmp_path.iterdir()) == []  # refused before anything was written (no generate.json, no folders)


@pytest.mark.parametrize("extra,args", STILL_WORKS, ids=[f"no-{e}-{a[0]}" for e, a in STILL_WORKS])
def test_command_that_needs_no_such_extra_runs(extra, args, site, tiny_onnx, tmp_path):
    r = without(extra, args, site, {"{onnx}": tiny_onnx, "{d}": str(tmp_path)}, tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
