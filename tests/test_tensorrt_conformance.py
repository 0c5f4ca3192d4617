"""Our TensorRT and cudart code, and the fakes that stand in for them in CI, against the real bindings.

TensorRT cannot run here, but its compiled Python binding can be read: for each supported TensorRT version the
`tensorrt-cuXX-bindings` wheel (~1.2 MB) is downloaded once into pytest's cache (skipped, with pip's reason, when the
package index cannot be reached) and its `tensorrt.so` read as an ELF file without importing it
(tests/api_conformance.py). Every TensorRT name our GPU code uses, collected from the source by AST, and every
public name of tests/fake_tensorrt.py must exist there, with the argument names its docstrings give. cudart is
checked against the installed cuda-bindings (names, signatures by `inspect`, the number of values returned).

What this cannot show: behaviour. Whether TensorRT builds and runs our engines, and whether the fakes behave like
the real thing, is for benchmarks/gpu_check.py and the `gpu` tests on a GPU machine.
"""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import types
import warnings
from dataclasses import replace
from pathlib import Path

import pytest

from api_conformance import collect_uses, cudart_problems, returns_count, tensorrt_api, tensorrt_problems
from fake_tensorrt import fake_tensorrt

ROOT = Path(__file__).resolve().parents[1]
# the files whose TensorRT and cudart uses are checked
OUR_GPU_CODE = [ROOT / p for p in ("runtime/backends/tensorrt_backend.py", "runtime/backends/tensorrt_build.py",
                                   "runtime/cuda.py", "benchmarks/gpu_check.py", "benchmarks/gpu_tensorrt.py")]
# one release per supported major: the [gpu] extra's lowest 10.x line (tensorrt-cu13>=10.13.2) and the newest 11
SUPPORTED = [("tensorrt-cu12-bindings", "10.13.3.9"), ("tensorrt-cu13-bindings", "11.4.0.106")]
DOWNLOAD_TIMEOUT_S = 120


# ---------------------------------------------------------------------------------------------- the real bindings

def download_wheel(package: str, version: str, folder: Path) -> Path:
    """The package's wheel in `folder`, downloaded there first if missing (temp folder, then rename, so parallel
    test workers never read half a file). The CPython 3.11 manylinux wheel whatever runs the tests: the binding's
    names do not depend on the Python that reads them."""
    wanted = f"{package.replace('-', '_')}-{version}-*.whl"
    found = sorted(folder.glob(wanted))
    if found:
        return found[0]
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=folder))
    try:
        try:
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64",
                                "--disable-pip-version-check", "-q", "-d", str(tmp), f"{package}=={version}"],
                               capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.skip(f"{package}=={version} did not download in {DOWNLOAD_TIMEOUT_S} s (package index unreachable?)")
        wheels = sorted(tmp.glob(wanted))
        if r.returncode != 0 or not wheels:
            errors = [line for line in r.stderr.splitlines() if line.startswith("ERROR")] or r.stderr.splitlines()
            pytest.skip(f"cannot download {package}=={version} from the package index "
                        f"({(errors or ['no wheel'])[-1].strip()[:200]})")
        os.replace(wheels[0], folder / wheels[0].name)
        return folder / wheels[0].name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def wheel_folder(request, tmp_path_factory) -> Path:
    """pytest's cache (.pytest_cache, kept between runs), else this session's temp folder."""
    cache = getattr(request.config, "cache", None)
    return Path(cache.mkdir("tensorrt-bindings")) if cache is not None else tmp_path_factory.mktemp("bindings")


@pytest.fixture(scope="session", params=SUPPORTED, ids=[v for _, v in SUPPORTED])
def real_tensorrt(request, wheel_folder):
    package, version = request.param
    return tensorrt_api(download_wheel(package, version, wheel_folder))


def required(problems: list) -> list:
    """The problems that fail a check; a missing optional name (getattr with a default) is a warning."""
    for p in problems:
        if "(optional" in p:
            warnings.warn(p)
    return [p for p in problems if "(optional" not in p]


# ---------------------------------------------------------------------------------------------- our code

def test_our_tensorrt_uses_exist(real_tensorrt):
    api = real_tensorrt
    uses = [u for u in collect_uses(OUR_GPU_CODE, api) if u.api == "tensorrt"]
    names = {u.name for u in uses}
    # the collector must see through self attributes, helper parameters and return values: a walk that lost them
    # would check nothing and pass
    assert {"execute_async_v3", "set_tensor_address", "build_serialized_network", "set_shape", "serialize",
            "get_tensor_profile_shape"} <= names
    problems = required(tensorrt_problems(uses, api))
    assert not problems, "\n".join(problems)


def test_a_used_name_removed_from_the_binding_is_reported(real_tensorrt):
    """The check fails for each name our code uses once that name is deleted from the parsed binding."""
    api = real_tensorrt
    uses = [u for u in collect_uses(OUR_GPU_CODE, api) if u.api == "tensorrt"]
    assert tensorrt_problems(uses, api) == []
    for name in sorted({u.name for u in uses}):
        crippled = replace(api, names=api.names - {name}, module_names=api.module_names - {name})
        problems = tensorrt_problems(uses, crippled)
        assert problems and all(f"has no {name!r}" in p for p in problems), (name, problems)


WRONG_USES = '''
import tensorrt as trt

def build(logger):
    builder = trt.Builder(logger)
    config = builder.create_builder_config()
    _configure(config)

def _configure(cfg):
    cfg.set_flag(trt.BuilderFlag.FP16)
    cfg.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, size=1 << 20)
    cfg.clear_flagz(0)

def run(data):
    engine = _engine(data)
    context = engine.create_execution_context()
    context.execute_async_v3(0, 1)
    context.set_tensor_address("x_t", ptr=0)

def _engine(data):
    return trt.Runtime(trt.Logger()).deserialize_cuda_engine(data)

class Logger(trt.ILogger):
    def log(self, level, message):
        pass
'''


def test_wrong_uses_are_reported(real_tensorrt, tmp_path):
    """Names TensorRT lacks (a typo reached through a helper's parameter; BuilderFlag.FP16, removed in 11), calls
    its documented arguments refuse, and an ILogger override with other parameter names are each reported."""
    api = real_tensorrt
    src = tmp_path / "wrong.py"
    src.write_text(WRONG_USES)
    problems = "\n".join(tensorrt_problems(collect_uses([src], api), api))
    assert "'clear_flagz'" in problems and "wrong.py:12" in problems
    assert "set_memory_pool_limit" in problems and "keywords ['size']" in problems
    assert "execute_async_v3" in problems and "called with 2 positional" in problems
    assert "set_tensor_address" in problems and "keywords ['ptr']" in problems
    assert ("'FP16'" in problems) == api.version.startswith("11."), problems
    if api.doc_args("ILogger", "log"):  # documented in the 11 binding's table, not in 10.13's
        assert "our override takes ('level', 'message')" in problems


# ---------------------------------------------------------------------------------------------- the fake TensorRT

def _engine_work():
    return types.SimpleNamespace(inputs={"x_t": (-1, 1, 8, 8)}, outputs={"eps": (-1, 1, 8, 8)})


def fake_surface():
    """[(owner, name, value)] of every public name the fake TensorRT offers: module attributes, class members,
    enum members, and the attributes of the objects it hands out (engine, execution context)."""
    trt = fake_tensorrt("0.0.0", lambda data: _engine_work(), 4)
    surface = [("tensorrt", "__version__", trt.__version__)]
    seen = set()

    def walk(owner: str, cls) -> None:
        if cls in seen:
            return
        seen.add(cls)
        for name, value in vars(cls).items():
            if name.startswith("_") and name != "__init__":
                continue
            surface.append((owner, name, value))
            if isinstance(value, type):
                walk(f"{owner}.{name}", value)
        if isinstance(cls, type) and issubclass(cls, int) and hasattr(cls, "__members__"):
            surface.extend((owner, m, v) for m, v in cls.__members__.items())

    for name, value in vars(trt).items():
        if not name.startswith("_"):
            surface.append(("tensorrt", name, value))
            if isinstance(value, type):
                walk(name, value)
    logger = trt.ILogger()
    engine = trt.Runtime(logger).deserialize_cuda_engine(b"")
    context = engine.create_execution_context()
    for obj in (engine, context):
        surface.append(("tensorrt", type(obj).__name__, type(obj)))  # a class TensorRT has, named as there
        walk(type(obj).__name__, type(obj))
        surface.extend((type(obj).__name__, n, v) for n, v in vars(obj).items() if not n.startswith("_"))
    return surface


def fake_problems(api, surface) -> list:
    problems = []
    for owner, name, value in surface:
        module_level = owner == "tensorrt"
        if name != "__init__" and name not in api.names and not (module_level and name in api.module_names):
            problems.append(f"fake {owner}.{name}: TensorRT {api.version} has no {name!r}")
            continue
        fn = value.fget if isinstance(value, property) else value
        if not inspect.isfunction(fn) or isinstance(value, property):
            continue
        params = list(inspect.signature(fn).parameters)[1:]
        cls = owner.split(".")[-1]
        documented = api.doc_args(cls, "descr" if name == "__init__" else name)
        if documented and params != documented[:len(params)]:  # fewer is fine: the fake refuses more
            problems.append(f"fake {owner}.{name}{tuple(params)}: TensorRT {api.version} documents {tuple(documented)}")
    return problems


def test_fake_tensorrt_offers_only_real_names(real_tensorrt):
    surface = fake_surface()
    owners = {o for o, _, _ in surface}
    assert {"ICudaEngine", "IExecutionContext", "Runtime", "ILogger.Severity"} <= owners  # the walk reached them
    problems = fake_problems(real_tensorrt, surface)
    assert not problems, "\n".join(problems)


def test_a_fake_name_the_binding_lacks_is_reported(real_tensorrt):
    """A name the fake offers and TensorRT lacks, or a fake method with other argument names, fails the check."""
    surface = fake_surface() + [("ICudaEngine", "io_names", []),
                                ("IExecutionContext", "set_tensor_address", lambda self, name, ptr: True)]
    problems = "\n".join(fake_problems(real_tensorrt, surface))
    assert "fake ICudaEngine.io_names" in problems
    assert "fake IExecutionContext.set_tensor_address('name', 'ptr')" in problems and "'memory'" in problems


# ---------------------------------------------------------------------------------------------- cudart

@pytest.fixture(scope="module")
def real_cudart():
    return pytest.importorskip("cuda.bindings.runtime", reason="cuda-bindings is not installed")


def test_our_cudart_uses_exist(real_cudart):
    uses = [u for u in collect_uses(OUR_GPU_CODE) if u.api == "cudart"]
    calls = {u.name for u in uses if u.call is not None}
    assert {"cudaMalloc", "cudaMemcpyAsync", "cudaGraphInstantiate", "cudaGraphExecDestroy", "cudaFree"} <= calls
    assert any(u.unpack for u in uses) and any(u.owner == "cudaError_t" for u in uses)
    assert any(u.owner == "cudaGetDeviceProperties[1]" and u.name == "major" for u in uses)  # prop.major
    problems = cudart_problems(uses, real_cudart)
    assert not problems, "\n".join(problems)


def test_cudart_checker_reports_wrong_uses(real_cudart, tmp_path):
    uses = [u for u in collect_uses(OUR_GPU_CODE) if u.api == "cudart"]
    removed = "cudaGraphInstantiate"
    crippled = types.SimpleNamespace(**{n: getattr(real_cudart, n) for n in dir(real_cudart) if n != removed})
    problems = cudart_problems(uses, crippled)
    assert problems and all(removed in p for p in problems)
    src = tmp_path / "wrong.py"
    src.write_text(textwrap.dedent('''
        from cuda.bindings import runtime as cudart

        def f(dev):
            dev.call("cudaMemcpyAsync", 0, 0, 8, 0)
            err, ptr, extra = cudart.cudaMalloc(8)
            cudart.cudaMemcpyKind.cudaMemcpyHostToHostAsync
            err, prop = cudart.cudaGetDeviceProperties(0)
            return prop.computeCapability
        '''))
    problems = "\n".join(cudart_problems(collect_uses([src]), real_cudart))
    assert "cudaMemcpyAsync (wrong.py:5): called with 4 positional" in problems
    assert "cudaMalloc (wrong.py:6): unpacked into 3 values, it returns 2" in problems
    assert "no cudaMemcpyKind.cudaMemcpyHostToHostAsync" in problems
    assert "no cudaGetDeviceProperties[1].computeCapability" in problems


def test_fake_cudart_matches_real_cudart(real_cudart):
    """Every cudart name the emulation offers exists in cuda-bindings: functions with the same parameter names,
    enums with the same members and values, constants with the same value."""
    from fake_cudart import CUDART_NAMES, FakeCudart

    problems = []
    for name in sorted(CUDART_NAMES):
        fake, real = getattr(FakeCudart, name), getattr(real_cudart, name, None)
        if real is None:
            problems.append(f"{name}: not in cuda.bindings.runtime")
        elif inspect.isfunction(fake):
            ours, theirs = list(inspect.signature(fake).parameters)[1:], list(inspect.signature(real).parameters)
            if ours != theirs:
                problems.append(f"{name}{tuple(ours)}: cuda-bindings takes {tuple(theirs)}")
        elif isinstance(fake, type):
            for member, value in fake.__members__.items():
                if int(getattr(real, member, -1)) != int(value):
                    problems.append(f"{name}.{member} = {int(value)}: cuda-bindings has {getattr(real, member, None)}")
        elif int(fake) != int(real):
            problems.append(f"{name} = {fake}: cuda-bindings has {real}")
    assert not problems, "\n".join(problems)
    assert returns_count(real_cudart.cudaStreamEndCapture) == 2  # (err, graph): what FakeCudart returns too


def test_fake_cudart_module_refuses_what_cudart_lacks():
    """The module the emulation installs as cuda.bindings.runtime offers FakeCudart's cudart names only."""
    from fake_cudart import FakeCudart, cudart_module

    rt = FakeCudart()
    module = cudart_module(rt)
    assert module.cudaMalloc(256)[1] in rt.live
    for name in ("heap", "live", "faults", "flush", "cudaMallocManaged"):
        with pytest.raises(AttributeError):
            getattr(module, name)
