"""OpenVINO backend: parity with onnxruntime fp32, sampling and noise, explicit precision, torch-free use, errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from ddpm_deploy.errors import UserError
from ddpm_deploy.tolerances import (OPENVINO_FP32_EPS_MAX_ABS, OPENVINO_FP32_X0_MAX_ABS,
                                    VERIFY_REDUCED_EPS_MAX_ABS)

ov = pytest.importorskip("openvino", reason="openvino is not installed (pip install \"ddpm-deploy[openvino]\")")

from ddpm_deploy.runtime import load, request_noise  # noqa: E402
from ddpm_deploy.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend  # noqa: E402
from ddpm_deploy.runtime.backends.openvino_backend import OpenVinoBackend, device_supports_bf16  # noqa: E402

from conftest import TINY_T  # noqa: E402

HAS_BF16 = device_supports_bf16(ov.Core(), "CPU")
CAPS = ", ".join(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))



@pytest.fixture(scope="module")
def backends(tiny_onnx):
    with OnnxRuntimeBackend(tiny_onnx) as ort, OpenVinoBackend(tiny_onnx, cache_dir="") as vino:
        yield ort, vino


def _inputs(batch: int, t: int, seed: int = 0):
    x = np.random.default_rng(seed).standard_normal((batch, 1, 8, 8), dtype=np.float32)
    return x, np.full((batch,), t, np.float32)


@pytest.mark.parametrize("batch", [1, 3, 4])
@pytest.mark.parametrize("t", [0, TINY_T // 2, TINY_T - 1])
def test_eps_matches_onnxruntime(backends, batch, t):
    ort, vino = backends
    x, tv = _inputs(batch, t, seed=batch * 100 + t)
    got, want = vino.eps(x, tv), ort.eps(x, tv)
    assert got.dtype == np.float32 and got.shape == want.shape == (batch, 1, 8, 8)
    np.testing.assert_allclose(got, want, rtol=0, atol=OPENVINO_FP32_EPS_MAX_ABS)


def test_static_and_dynamic_shapes(tiny_onnx, backends):
    """Static shapes and the GroupNormalization rewrite (defaults) against the ONNX exactly as exported with its
    dynamic batch: the same eps, one compiled model per batch size met."""
    ort, static = backends
    with OpenVinoBackend(tiny_onnx, cache_dir="", static_shapes=False, rewrites=False) as dynamic:
        assert dynamic.config["batch_shapes"] == "dynamic" and dynamic.compiled_batches == []
        assert dynamic.config["group_norm_rewrites"] == 0 and static.config["group_norm_rewrites"] > 0
        for batch in (2, 1, 4):
            x, t = _inputs(batch, 9, seed=batch)
            want = ort.eps(x, t)
            np.testing.assert_allclose(dynamic.eps(x, t), want, rtol=0, atol=OPENVINO_FP32_EPS_MAX_ABS)
            np.testing.assert_allclose(static.eps(x, t), want, rtol=0, atol=OPENVINO_FP32_EPS_MAX_ABS)
    assert static.config["batch_shapes"] == "static per batch size"
    assert {1, 2, 4} <= set(static.compiled_batches)


def test_eps_mixed_timesteps_and_reused_request(backends):
    """Per-sample t in one batch; a second call must not overwrite the first call's returned array."""
    ort, vino = backends
    x, _ = _inputs(4, 0, seed=7)
    t = np.array([0, 13, 31, TINY_T - 1], np.float32)
    first = vino.eps(x, t)
    kept = first.copy()
    vino.eps(*_inputs(4, 5, seed=8))
    np.testing.assert_array_equal(first, kept)
    np.testing.assert_allclose(first, ort.eps(x, t), rtol=0, atol=OPENVINO_FP32_EPS_MAX_ABS)


def test_precision_is_set_explicitly_and_recorded(backends):
    _, vino = backends
    assert vino.name == "openvino-fp32"
    assert vino.config["INFERENCE_PRECISION_HINT"] == "f32"
    assert vino.config["compiled.INFERENCE_PRECISION_HINT"] == "f32"
    assert vino.config["PERFORMANCE_HINT"] == "LATENCY" and "CACHE_DIR" not in vino.config
    assert vino.max_batch == 4


@pytest.mark.parametrize("sampler,steps", [("ddpm", None), ("ddim", 10)])
def test_whole_chain_matches_onnxruntime(tiny_onnx, sampler, steps):
    """Same seed, 5 images in chunks of 4 + 1 (the dynamic batch changes mid-request)."""
    with load(tiny_onnx, backend="onnxruntime") as a, load(tiny_onnx, backend="openvino", cache_dir="") as b:
        want = a.sample(5, seed=3, sampler=sampler, steps=steps, output="float")
        got = b.sample(5, seed=3, sampler=sampler, steps=steps, output="float")
    assert got.shape == (5, 1, 8, 8) and np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=OPENVINO_FP32_X0_MAX_ABS)


def test_noise_injection_reproducible(tiny_onnx):
    """Explicit (x_T, step_noise) from request_noise gives the seeded images exactly; batch size changes nothing."""
    with load(tiny_onnx, backend="openvino", cache_dir="") as pipe:
        plan = pipe.plan("ddpm", 20)
        x_T, z = request_noise(11, 3, pipe.image_shape, plan.steps)
        seeded = pipe.sample(3, seed=11, sampler="ddpm", steps=20, output="float")
        given = pipe.sample(3, x_T=x_T, step_noise=z, sampler="ddpm", steps=20, output="float")
        again = pipe.sample(3, x_T=x_T, step_noise=z, sampler="ddpm", steps=20, output="float")
        one_by_one = pipe.sample(3, x_T=x_T, step_noise=z, sampler="ddpm", steps=20, output="float", batch_size=1)
    np.testing.assert_array_equal(given, seeded)
    np.testing.assert_array_equal(again, given)
    np.testing.assert_allclose(one_by_one, given, rtol=0, atol=OPENVINO_FP32_X0_MAX_ABS)


def test_compiled_model_cache(tiny_onnx, tmp_path):
    cache = tmp_path / "ov_cache"
    x, t = _inputs(2, 17)
    with OpenVinoBackend(tiny_onnx, cache_dir=str(cache)) as first:
        assert first.config["CACHE_DIR"] == str(cache)
        a = first.eps(x, t)
    assert any(cache.glob("*.blob")), "OpenVINO wrote no compiled blob into CACHE_DIR"
    with OpenVinoBackend(tiny_onnx, cache_dir=str(cache)) as second:  # served from the cache
        np.testing.assert_array_equal(second.eps(x, t), a)


def test_compiles_into_a_shared_cache_take_turns(tiny_onnx, tmp_path):
    """Two processes compiling one model into one cache raced on OpenVINO's in-place blob writes: 4 concurrent
    compiles of the shipped model once died of SIGBUS, and 1 of 20 concurrent `run`s failed (session 6). A compile
    that uses the cache now holds the cache folder's lock: while this test holds it, another process's compile
    waits and writes no blob; released, it goes on."""
    import fcntl

    cache = tmp_path / "ov_cache"
    cache.mkdir()
    code = textwrap.dedent(f"""
        from ddpm_deploy.runtime.backends.openvino_backend import OpenVinoBackend
        print("start", flush=True)
        OpenVinoBackend({tiny_onnx!r}, threads=1, cache_dir={str(cache)!r}).close()
        print("compiled", flush=True)
    """)
    with open(cache / ".ddpm-deploy.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            assert p.stdout.readline() == "start\n"
            with pytest.raises(subprocess.TimeoutExpired):  # the tiny model compiles in well under a second
                p.wait(timeout=5)
            assert not list(cache.glob("*.blob"))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
        try:
            assert p.wait(timeout=120) == 0 and p.stdout.read() == "compiled\n"
        finally:
            p.kill()
    assert list(cache.glob("*.blob"))


def test_default_cache_dir_under_xdg_cache_home(tiny_onnx):
    with OpenVinoBackend(tiny_onnx) as b:
        assert b.config["CACHE_DIR"] == os.path.join(os.environ["XDG_CACHE_HOME"], "ddpm-deploy", "openvino")


@pytest.mark.skipif(not HAS_BF16, reason=f"this CPU has no bf16 (OpenVINO reports {CAPS})")
def test_bf16_differs_a_little(tiny_onnx, backends):
    _, fp32 = backends
    with OpenVinoBackend(tiny_onnx, precision="bf16", cache_dir="") as bf16:
        assert bf16.name == "openvino-bf16" and bf16.config["compiled.INFERENCE_PRECISION_HINT"] == "bf16"
        worst = 0.0
        for t in (0, TINY_T // 2, TINY_T - 1):
            x, tv = _inputs(4, t, seed=t)
            got, want = bf16.eps(x, tv), fp32.eps(x, tv)
            assert np.isfinite(got).all()
            worst = max(worst, float(np.abs(got - want).max()))
    assert OPENVINO_FP32_EPS_MAX_ABS < worst <= VERIFY_REDUCED_EPS_MAX_ABS, worst


@pytest.mark.skipif(HAS_BF16, reason="this CPU has bf16; the refusal is for CPUs without it")
def test_bf16_refused_without_cpu_support(tiny_onnx):
    with pytest.raises(UserError, match="no bf16 support.*use --precision fp32"):
        OpenVinoBackend(tiny_onnx, precision="bf16")


def test_bad_options(tiny_onnx):
    with pytest.raises(UserError, match="unknown precision 'fp16'.*fp32 or bf16"):
        OpenVinoBackend(tiny_onnx, precision="fp16")
    with pytest.raises(UserError, match="device 'GPU' not available"):
        OpenVinoBackend(tiny_onnx, device="GPU")
    with pytest.raises(UserError, match="--threads must be at least 1"):
        OpenVinoBackend(tiny_onnx, threads=-1)


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_torch_free(tiny_onnx):
    r = _python(f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        from ddpm_deploy.runtime import load
        with load({tiny_onnx!r}, backend="openvino", cache_dir="") as pipe:
            x = pipe.sample(2, seed=0, sampler="ddim", steps=3)
        assert x.shape == (2, 8, 8, 1) and x.dtype.name == "uint8", (x.shape, x.dtype)
        assert sys.modules["torch"] is None
        print(pipe.backend.name)
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "openvino-fp32"


def test_missing_openvino_is_one_line(tiny_onnx):
    r = _python(f"""
        import sys
        sys.modules["openvino"] = None
        from ddpm_deploy.errors import UserError
        from ddpm_deploy.runtime import load
        try:
            load({tiny_onnx!r}, backend="openvino")
        except UserError as e:
            print(e)
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1 and 'pip install "ddpm-deploy[openvino]"' in r.stdout


def _cli_run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ddpm_deploy.cli", "run", "--backend", "openvino", "--quiet", *args],
                          capture_output=True, text=True, timeout=300)


def test_cli_run(tiny_onnx, tmp_path):
    out = tmp_path / "grid.png"
    r = _cli_run("--engine", tiny_onnx, "-n", "3", "--sampler", "ddim", "--steps", "4", "--precision", "fp32",
                 "--threads", "1", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert out.is_file() and "openvino-fp32" in r.stdout


def _no_manifest_copy(tiny_onnx, tmp_path) -> str:
    import onnx

    model = onnx.load(tiny_onnx)
    del model.metadata_props[:]
    path = tmp_path / "bare.onnx"
    onnx.save(model, str(path))
    return str(path)


@pytest.mark.parametrize("case", ["missing", "no_manifest", "bad_precision", "bf16_unsupported"])
def test_cli_bad_inputs_one_line(tiny_onnx, tmp_path, case):
    if case == "bf16_unsupported" and HAS_BF16:
        pytest.skip("this CPU has bf16")
    engine, extra, expect = {
        "missing": (str(tmp_path / "nope.onnx"), [], "not found"),
        "no_manifest": (_no_manifest_copy(tiny_onnx, tmp_path), [], "no ddpm-deploy manifest"),
        "bad_precision": (tiny_onnx, ["--precision", "fp16"], "'--precision'"),
        "bf16_unsupported": (tiny_onnx, ["--precision", "bf16"], "no bf16 support"),
    }[case]
    r = _cli_run("--engine", engine, "-o", str(tmp_path / "x.png"), *extra)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], r.stderr
    assert not (tmp_path / "x.png").exists()


def test_a_cached_compile_with_nonfinite_output_is_compiled_again(tiny_onnx, tmp_path, capfd):
    """OpenVINO's compiled-model cache can hand back a model that computes NaN (seen here: cached bf16 blobs of the
    shipped model at batch 1 and 16 gave NaN for half the images of every step, a fresh compile did not). Made here
    for real by poisoning a cache: the blob of a model whose eps is inf at t = T - 1 is stored under the tiny model's
    key. The backend's probe step finds it, says so in one line, compiles again and replaces the blob (session 5
    only compiled around it, so every later run warned again); a model non-finite compiled afresh too is refused."""
    from test_finiteness import inject_eps_onnx

    bad = inject_eps_onnx(tiny_onnx, str(tmp_path / "bad.onnx"), TINY_T - 1, float("inf"))
    good_cache, bad_cache = tmp_path / "good", tmp_path / "bad"
    OpenVinoBackend(tiny_onnx, threads=1, cache_dir=str(good_cache)).close()
    with pytest.raises(UserError, match="non-finite output at batch 4 on a probe step"):
        OpenVinoBackend(bad, threads=1, cache_dir=str(bad_cache))
    (blob,), (bad_blob,) = list(good_cache.glob("*.blob")), list(bad_cache.glob("*.blob"))
    blob.write_bytes(bad_blob.read_bytes())  # the tiny model's key now holds the bad model's compile
    capfd.readouterr()
    with OpenVinoBackend(tiny_onnx, threads=1, cache_dir=str(good_cache)) as be:
        err = capfd.readouterr().err
        assert err.count("\n") == 1 and "cached compiled model" in err and "batch 4" in err, err
        with OpenVinoBackend(tiny_onnx, threads=1, cache_dir="") as fresh:
            x, t = np.random.default_rng(1).standard_normal((4, 1, 8, 8), dtype=np.float32), np.full(4, TINY_T - 1,
                                                                                                      np.float32)
            np.testing.assert_array_equal(be.eps(x, t), fresh.eps(x, t))
    assert "replaced it in" in err, err
    assert [p.name for p in good_cache.iterdir() if p.name != ".ddpm-deploy.lock"] == [blob.name]  # no temp folder
    assert blob.read_bytes() != bad_blob.read_bytes()
    with OpenVinoBackend(tiny_onnx, threads=1, cache_dir=str(good_cache)):  # the next run: the healed blob, quiet
        assert capfd.readouterr().err == ""


def test_temp_folders_of_killed_replacing_compiles_are_removed(tiny_onnx, tmp_path):
    """A process killed while it compiled a replacement blob leaves its .fresh-* folder in the cache; the next
    backend on that cache removes those a day old (a younger one may be another process's, at work now)."""
    from ddpm_deploy.runtime.backends.openvino_backend import FRESH_PREFIX, FRESH_STALE_S

    cache = tmp_path / "ov_cache"
    old, new = cache / f"{FRESH_PREFIX}old", cache / f"{FRESH_PREFIX}new"
    for folder in (old, new):
        folder.mkdir(parents=True)
        (folder / "1.blob").write_bytes(b"x")
    stale = time.time() - FRESH_STALE_S - 60
    os.utime(old, (stale, stale))
    OpenVinoBackend(tiny_onnx, threads=1, cache_dir=str(cache)).close()
    assert not old.exists() and new.is_dir()


def test_openvino_errors_name_the_reason_not_a_source_line():
    """A concurrent compile failed with "OpenVINO cannot compile digits.onnx: Exception from
    src/inference/src/cpp/core.cpp:117:": the first line of OpenVINO's message is a C++ location."""
    from ddpm_deploy.runtime.backends.openvino_backend import openvino_message

    e = RuntimeError("Exception from src/inference/src/cpp/core.cpp:117:\nException from src/plugin.cpp:9:\n"
                     "[ GENERAL_ERROR ] Could not read the cached blob\n")
    assert openvino_message(e) == "[ GENERAL_ERROR ] Could not read the cached blob"
    assert openvino_message(RuntimeError("plain reason")) == "plain reason"


# -- the cache lock and the cache folder's owner -----------------------------------------------------------------------

HOLD_LOCK = """
import sys, time
from ddpm_deploy.files import folder_lock
with folder_lock(sys.argv[1], ".ddpm-deploy.lock", record_pid=True) as held:   # as a compile holds it
    print("held" if held else "not held", flush=True)
    time.sleep(120)
"""

OPEN_BACKEND = """
import sys, numpy as np
from ddpm_deploy.runtime.backends.openvino_backend import OpenVinoBackend
with OpenVinoBackend(sys.argv[1], threads=1, cache_dir=sys.argv[2]) as b:
    eps = b.eps(np.zeros((1, 1, 8, 8), np.float32), np.zeros(1, np.float32))
    print("compiled", bool(np.isfinite(eps).all()), "CACHE_DIR" in b.config, flush=True)
"""


@pytest.mark.parametrize("stopped", [False, True], ids=["running", "stopped"])
def test_a_held_cache_lock_is_named_then_given_up(tiny_onnx, tmp_path, stopped):
    """Another process holds the cache lock (a `run` stopped with Ctrl-Z mid-compile held it for ever, and every
    OpenVINO open waited silently): a line names its pid (and that it is stopped) within the notice time, and after
    the bound (2 s here, by the environment variable) the model compiles without the cache, in one more line."""
    import signal

    cache = tmp_path / "ov_cache"
    cache.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(cache)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        if stopped:
            os.kill(holder.pid, signal.SIGSTOP)
        t0 = time.time()
        r = subprocess.run([sys.executable, "-c", OPEN_BACKEND, tiny_onnx, str(cache)], capture_output=True,
                           text=True, timeout=60, env={**os.environ, "DDPM_DEPLOY_CACHE_LOCK_WAIT_S": "2"})
        took = time.time() - t0
    finally:
        holder.kill()
        holder.wait(10)
    assert r.returncode == 0 and r.stdout.startswith("compiled True"), (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("waiting for the OpenVINO cache lock") and f"process {holder.pid} (" in lines[0], lines
    assert ("stopped" in lines[0]) is stopped, lines[0]
    assert lines[1].startswith("warning: ") and "still held after 2 s" in lines[1] and "without the cache" in lines[1]
    assert took < 30, took
    assert not list(cache.glob("*.blob"))   # nothing written while another process holds the cache


def test_a_symlinked_cache_lock_is_not_followed(tiny_onnx, tmp_path, capsys):
    """The lock file is opened with O_NOFOLLOW: a link planted in a shared cache folder must not make a compile
    create (or lock) a file elsewhere. The compile goes on without the cache, with one line."""
    cache, elsewhere = tmp_path / "ov_cache", tmp_path / "elsewhere"
    cache.mkdir()
    elsewhere.mkdir()
    (cache / ".ddpm-deploy.lock").symlink_to(elsewhere / "victim")
    with OpenVinoBackend(tiny_onnx, threads=1, cache_dir=str(cache)) as b:
        assert np.isfinite(b.eps(*_inputs(1, 3))).all()
    assert not (elsewhere / "victim").exists()
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err and all("is a symbolic link" in ln for ln in err), err
    assert not list(cache.glob("*.blob"))


@pytest.mark.parametrize("how", ["another user's", "world-writable"])
def test_a_cache_folder_others_can_write_is_not_used(tiny_onnx, tmp_path, capsys, how):
    """Its blobs are code this process would run: a folder of another (non-root) user, or one anyone may write,
    could hold a planted blob. One warning line, and the model compiles without a cache."""
    cache = tmp_path / "ov_cache"
    cache.mkdir()
    if how == "world-writable":
        cache.chmod(0o777)
    else:
        if os.geteuid() != 0:
            pytest.skip("making a folder another user's needs root")
        os.chown(cache, 65534, 65534)   # nobody
    with OpenVinoBackend(tiny_onnx, threads=1, cache_dir=str(cache)) as b:
        assert "CACHE_DIR" not in b.config and np.isfinite(b.eps(*_inputs(1, 3))).all()
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("warning: not using the OpenVINO cache folder"), err
    assert ("user id 65534" if how != "world-writable" else "anyone may write") in err[0], err
    assert not list(cache.glob("*.blob")) and not (cache / ".ddpm-deploy.lock").exists()
