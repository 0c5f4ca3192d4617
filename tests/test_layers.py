"""The layer contract in `.importlinter` holds, sees every module of the package, and catches a violation.

import-linter (grimp) reads a package from its folder. In an editable install `ddpm_deploy/` holds only the core,
graph, nn, train and app modules (export/ and runtime/ are mapped in by setuptools), so a check there would
silently skip half the package. These tests check a regular install instead (`pip install --no-deps --target`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / ".importlinter"
# pyproject's package-dir: source folder -> package name
SOURCE_DIRS = {"ddpm_deploy": "ddpm_deploy", "export": "ddpm_deploy.export", "runtime": "ddpm_deploy.runtime"}

grimp = pytest.importorskip("grimp")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The project as a regular install, the layout users and import-linter see."""
    target = tmp_path_factory.mktemp("installed")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(target), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return target


def _lint(tree: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(exe), "--no-cache", "--no-logo", str(CONFIG)], cwd=tree, capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"})


def _source_modules() -> set[str]:
    """Every module the source folders define, named as installed."""
    names = set()
    for folder, package in SOURCE_DIRS.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if folder == "ddpm_deploy" and parts and parts[0] in ("export", "runtime"):
                continue  # not a thing: export/runtime live in their own top-level folders
            names.add(".".join([package, *parts]))
    return names


def _graph(tree: Path):
    """grimp's graph of the package in `tree`. grimp finds the package through importlib, so the test process's own
    ddpm_deploy modules step aside meanwhile and are put back afterwards (other tests hold references to them)."""
    ours = {m: mod for m, mod in sys.modules.items() if m == "ddpm_deploy" or m.startswith("ddpm_deploy.")}
    for name in ours:
        del sys.modules[name]
    sys.path.insert(0, str(tree))
    try:
        return grimp.build_graph("ddpm_deploy", cache_dir=None)
    finally:
        sys.path.remove(str(tree))
        for name in [m for m in sys.modules if m == "ddpm_deploy" or m.startswith("ddpm_deploy.")]:
            del sys.modules[name]
        sys.modules.update(ours)


def test_contract_sees_every_module(installed):
    modules = set(_graph(installed).modules)
    expected = _source_modules()
    assert expected - modules == set(), "modules the layer check would not see"
    assert {"ddpm_deploy.export.onnx_export", "ddpm_deploy.runtime.pipeline"} <= modules


def test_layer_contracts_are_kept(installed):
    r = _lint(installed)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout and "KEPT" in r.stdout


def test_no_import_cycles(installed):
    """No strongly connected set of modules (Tarjan over module-level import edges, function-local ones included)."""
    g = _graph(installed)
    edges = {m: {i for i in g.find_modules_directly_imported_by(m) if i in g.modules} for m in g.modules}
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        work = [(v, iter(sorted(edges[v])))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        while work:
            node, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                    break
                if w in on:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    scc = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        scc.append(w)
                        if w == node:
                            break
                    if len(scc) > 1:
                        cycles.append(sorted(scc))

    for m in sorted(g.modules):
        if m not in index:
            visit(m)
    assert cycles == []


def test_a_violation_breaks_the_contract(installed, tmp_path):
    """The check is not vacuous: the runtime importing torch, or export, fails it."""
    tree = tmp_path / "broken"
    shutil.copytree(installed, tree)
    loop = tree / "ddpm_deploy" / "runtime" / "cpu_steps.py"
    loop.write_text(loop.read_text() + "\n\ndef _bad():\n    import torch  # noqa\n"
                    "    from ..export import onnx_export  # noqa\n")
    r = _lint(tree)
    assert r.returncode != 0
    assert "2 broken" in r.stdout, r.stdout


def test_numpy_only_tests_run_without_torch(tmp_path):
    """The schedule, sampler and noise tests need no torch: they run (not skip) with torch made unimportable."""
    (tmp_path / "block_torch.py").write_text('import sys\nsys.modules["torch"] = None\nsys.modules["diffusers"] = None\n')
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "block_torch", "-p", "no:cacheprovider",
                        "tests/test_schedule_samplers.py", "tests/test_runtime.py::test_noise_documented_generator"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    summary = r.stdout.strip().splitlines()[-1]
    passed = int(summary.split(" passed")[0].split()[-1])
    assert passed >= 5 and "skipped" in summary, summary  # numpy tests ran; diffusers comparisons skipped


def test_every_top_level_module_has_a_layer(installed):
    """A module left out of the layers contract would be checked by nothing: each child of ddpm_deploy is listed."""
    import configparser
    import re

    cfg = configparser.ConfigParser()
    cfg.read(CONFIG)
    listed = set(re.findall(r"ddpm_deploy\.\w+", cfg["importlinter:contract:layers"]["layers"]))
    children = _graph(installed).find_children("ddpm_deploy")
    assert children - listed == set(), "add these to a layer in .importlinter"
