"""The package runs on the oldest Python pyproject.toml allows: no standard-library API newer than that floor.

An AST scan of every module of the package for names the floor lacks (a 3.11 name on a 3.10 floor is an
AttributeError or ImportError only when that line runs, e.g. every POST /generate of `serve`), and the server's
body read run with `asyncio.timeout` taken away, as on 3.10. .ci/run also runs the torch-free serve tests on the floor
interpreter where one is installed.
"""

from __future__ import annotations

import ast
import asyncio
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "ddpm_deploy", ROOT / "runtime", ROOT / "export"]

# standard-library names by the Python version that added them: (module, name)
ADDED = {
    (3, 11): {("asyncio", "timeout"), ("asyncio", "timeout_at"), ("asyncio", "TaskGroup"), ("asyncio", "Runner"),
              ("asyncio", "Barrier"), ("tomllib", None), ("typing", "Self"), ("typing", "LiteralString"),
              ("typing", "Never"), ("typing", "assert_never"), ("typing", "reveal_type"), ("typing", "Required"),
              ("typing", "NotRequired"), ("typing", "TypeVarTuple"), ("typing", "Unpack"), ("enum", "StrEnum"),
              ("datetime", "UTC"), ("hashlib", "file_digest"), ("contextlib", "chdir"), ("wsgiref.types", None),
              ("builtins", "ExceptionGroup"), ("builtins", "BaseExceptionGroup"), ("syntax", "except*")},
    (3, 12): {("itertools", "batched"), ("typing", "override"), ("calendar", "Month"), ("calendar", "Day")},
    (3, 13): {("warnings", "deprecated"), ("copy", "replace")},
}


def floor() -> tuple[int, int]:
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r'requires-python\s*=\s*">=\s*(\d+)\.(\d+)', text)
    assert m, "pyproject.toml has no requires-python = \">=X.Y\""
    return int(m[1]), int(m[2])


def too_new(names_floor: tuple[int, int]) -> set:
    return {name for version, names in ADDED.items() if version > names_floor for name in names}


def uses(tree: ast.AST, banned: set) -> list[tuple[int, str]]:
    """(line, what) for each use of a banned (module, name) in `tree`: `mod.name`, `from mod import name`,
    `import mod` of a banned module, a banned builtin by name, and `except*` (3.11 syntax)."""
    modules = {m for m, n in banned if n is None}
    builtins = {n for m, n in banned if m == "builtins"}
    aliases: dict[str, str] = {}   # local name -> module, from `import mod [as alias]`
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
                if a.name in modules:
                    found.append((node.lineno, f"import {a.name}"))
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module in modules:
                found.append((node.lineno, f"from {node.module} import ..."))
            found += [(node.lineno, f"from {node.module} import {a.name}") for a in node.names
                      if (node.module, a.name) in banned]
        elif type(node).__name__ == "TryStar" and ("syntax", "except*") in banned:
            found.append((node.lineno, "except*"))
        elif isinstance(node, ast.Name) and node.id in builtins:
            found.append((node.lineno, node.id))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            if (aliases[node.value.id], node.attr) in banned:
                found.append((node.lineno, f"{aliases[node.value.id]}.{node.attr}"))
    return found


def test_the_scan_finds_what_it_looks_for():
    """The scan itself, on code using 3.11 names the ways the package could."""
    code = ("import asyncio\nimport asyncio as aio\nimport tomllib\nfrom typing import Self\n"
            "async def f():\n    async with asyncio.timeout(1):\n        pass\n    aio.TaskGroup()\n"
            "raise ExceptionGroup('x', [])\n")
    expected = ["import tomllib", "from typing import Self", "asyncio.timeout", "asyncio.TaskGroup", "ExceptionGroup"]
    if sys.version_info >= (3, 11):   # an interpreter that parses except* (the floor's cannot: nothing to find)
        code += "try:\n    pass\nexcept* ValueError:\n    pass\n"
        expected.append("except*")
    what = [w for _, w in uses(ast.parse(code), too_new((3, 10)))]
    assert sorted(what) == sorted(expected), what
    assert uses(ast.parse(code), too_new((3, 11))) == []


def test_package_uses_no_stdlib_api_newer_than_its_python_floor():
    banned = too_new(floor())
    bad = []
    for folder in SOURCES:
        for path in sorted(folder.rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            bad += [f"{path.relative_to(ROOT)}:{line}: {what}" for line, what in uses(tree, banned)]
    assert not bad, f"newer than Python {'.'.join(map(str, floor()))} (pyproject's floor): {bad}"


def test_request_body_is_read_without_asyncio_timeout(monkeypatch):
    """The server's body read (a real Starlette Request over an ASGI receive) with asyncio.timeout gone, as on
    Python 3.10: the body comes back, and a body that stalls is a 408 within its deadline."""
    pytest.importorskip("starlette")
    from starlette.requests import Request

    from ddpm_deploy.serve.app import _HTTPError, _read_body

    monkeypatch.delattr(asyncio, "timeout", raising=False)

    def request(chunks: list[bytes], stall: bool) -> Request:
        events = [{"type": "http.request", "body": c, "more_body": True} for c in chunks]
        events.append({"type": "http.request", "body": b"", "more_body": False})

        async def receive():
            if stall and len(events) == 1:
                await asyncio.sleep(30)
            return events.pop(0)

        scope = {"type": "http", "method": "POST", "path": "/generate", "headers": [], "query_string": b""}
        return Request(scope, receive)

    body = asyncio.run(_read_body(request([b'{"n": ', b"1}"], stall=False), 1000, 5.0))
    assert body == b'{"n": 1}'
    with pytest.raises(_HTTPError) as e:
        asyncio.run(_read_body(request([b'{"n": '], stall=True), 1000, 0.2))
    assert e.value.status == 408 and "6 bytes came" in str(e.value), str(e.value)
    with pytest.raises(_HTTPError) as e:
        asyncio.run(_read_body(request([b"x" * 600, b"x" * 600], stall=False), 1000, 5.0))
    assert e.value.status == 413

