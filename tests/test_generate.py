"""Bulk generation on Ray (issue 14): kill a real `generate` job midway, run it again, and get every image exactly
once, identical to an uninterrupted run (and to `run`'s images); joining a running Ray cluster by address.

Ray start-up is slow on 2 cores, so these are few: three Ray starts in all.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_one_line_error, cli

pytest.importorskip("ray")

N, SHARD, SEED = 96, 8, 3       # 12 shards; 8 = 2 x the tiny engine's max batch, so chunks match `run`'s exactly
ARGS = ["-n", N, "--shard-size", SHARD, "--seed", SEED, "--sampler", "ddpm"]
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def reference(tiny_onnx) -> np.ndarray:
    """The same images from `run`'s pipeline (onnxruntime), one process, no Ray."""
    from ddpm_deploy.runtime import load

    with load(tiny_onnx, backend="onnxruntime") as pipe:
        return pipe.sample(N, seed=SEED, sampler="ddpm", output="float")


def record(out: Path) -> dict:
    return json.loads((out / "generate.json").read_text())


def done(out: Path) -> list[int]:
    return [e["shard"] for e in record(out)["done"]]


def shard_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name not in ("generate.json", ".generate.lock"))


def test_killed_generate_resumes_without_redoing_or_losing_shards(tiny_onnx, tmp_path, reference):
    out = tmp_path / "job"
    cmd = [sys.executable, "-m", "ddpm_deploy.cli", "generate", "--engine", tiny_onnx, "--out", str(out),
           "--workers", "1", *map(str, ARGS)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
                            start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            try:
                if len(done(out)) >= 3:
                    break
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)      # the driver and the local Ray it started
        proc.wait(30)
    done_before = set(done(out))
    assert 3 <= len(done_before) < N // SHARD, done_before       # killed midway
    mtimes = {s: (out / f"shard-{s:06d}.npy").stat().st_mtime_ns for s in done_before}

    r = cli("generate", "--engine", tiny_onnx, "--out", out, *ARGS, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    m = re.search(r"(\d+) done(?: \((\d+) adopted\))?, (\d+) to go", r.stdout)
    assert m, r.stdout
    resumed_with, to_go = int(m.group(1)), int(m.group(3))
    assert resumed_with >= len(done_before) and resumed_with + to_go == N // SHARD
    assert f"({to_go} shards computed" in r.stdout, r.stdout
    # shards done before the kill were not recomputed (untouched files)
    assert all((out / f"shard-{s:06d}.npy").stat().st_mtime_ns == t for s, t in mtimes.items())
    # every image exactly once: all shards recorded, one file (and its record) each, nothing half-written left
    assert done(out) == list(range(N // SHARD))
    assert shard_files(out) == sorted(f"shard-{s:06d}.{ext}" for s in range(N // SHARD) for ext in ("json", "npy"))
    from ddpm_deploy.generate.job import load_images

    images = load_images(str(out))
    assert images.shape == reference.shape and images.dtype == np.float32
    np.testing.assert_array_equal(images, reference)          # bit for bit: same chunks, per-image seeds

    # the same folder with other settings is refused before any work
    assert_one_line_error(cli("generate", "--engine", tiny_onnx, "--out", out, "-n", N, "--shard-size", 4,
                              "--seed", SEED, env=ENV), "different generate job", "shard_size")


def test_uninterrupted_generate_on_a_running_cluster_by_address(tiny_onnx, tmp_path, reference):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        address = ray.get_runtime_context().gcs_address
        out = tmp_path / "uninterrupted"
        # ray.init set RAY_AUTH_MODE=token here (Ray >= 2.5x: token auth by default); a client joins with it
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        r = cli("generate", "--engine", tiny_onnx, "--out", out, *ARGS, "--ray-address", address, env=env,
                timeout=300)
        assert r.returncode == 0, r.stderr
        assert "ray: 2 worker(s) on 2 CPU(s)" in r.stdout and f"({N // SHARD} shards computed" in r.stdout
    finally:
        ray.shutdown()
    from ddpm_deploy.generate.job import load_images

    # bit for bit the reference, as the killed-and-resumed job is: so the two jobs are identical
    np.testing.assert_array_equal(load_images(str(out)), reference)


def test_generate_bad_input_is_one_line(tiny_onnx, tmp_path):
    assert_one_line_error(cli("generate", "--engine", tmp_path / "no.onnx", "-n", 4, "--out", tmp_path / "o"),
                          "no.onnx")
    assert_one_line_error(cli("generate", "--engine", tiny_onnx, "-n", 4, "--out", tmp_path / "o", "--steps", 51),
                          "steps", "T=50")
    assert_one_line_error(cli("generate", "--engine", tiny_onnx, "-n", 0, "--out", tmp_path / "o"), "-n")
    # -n, --engine and --out are required unless --check DIR (which takes none of them)
    assert_one_line_error(cli("generate", "--engine", tiny_onnx, "--out", tmp_path / "o"), "-n", "--check")
    assert_one_line_error(cli("generate", "-n", 4, "--out", tmp_path / "o"), "--engine")
    assert_one_line_error(cli("generate", "--check", tmp_path, "--engine", tiny_onnx), "--check", "--engine")
    assert not (tmp_path / "o").exists()
