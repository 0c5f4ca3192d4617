"""Bulk generation never trusts what is on disk (issue 21): every shard is checked (sha256, shape, dtype,
finiteness) before it is kept, served by `load_images` or passed by `generate --check`; shards of another job
(other seed, eta or model weights, external data included) are never adopted; writes are durable (fsync) before
they are recorded; without Ray, `generate` refuses before writing anything.

The tampering tests share one finished job made by the real `ddpm-deploy generate` (one Ray start), each on its own
copy. Ray starts cost ~8 s on 2 cores: three more in all (a resume that recomputes, a resume with another seed,
and one with another eta).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_one_line_error, cli
from ddpm_deploy.errors import UserError

N, SHARD, SEED = 16, 4, 5      # 4 shards; 4 = the tiny engine's max batch, so chunks match `run`'s exactly
SAMPLING = ["--sampler", "ddim", "--steps", "10"]
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
DATA = "tiny.onnx.data"

# `import ray` fails, as in an install without Ray (the way tests/test_cli_errors.py simulates missing extras)
NO_RAY = """import sys
sys.modules["ray"] = None
from ddpm_deploy.cli import main
main(sys.argv[1:])
"""


def no_ray_cli(tmp_path: Path, *args):
    import subprocess

    script = tmp_path / "no_ray.py"
    script.write_text(NO_RAY)
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=120)


def save_with_external_data(src: str, folder: Path) -> str:
    """The same model with every weight in one external file next to it (as large exports are)."""
    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / "tiny.onnx"
    onnx.save_model(onnx.load(src), str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA, size_threshold=0)
    assert (folder / DATA).stat().st_size > 1000
    return str(dst)


def change_weights(folder: Path) -> None:
    """Other weights in the external-data file; the .onnx file itself is untouched."""
    data = folder / DATA
    w = np.frombuffer(data.read_bytes(), dtype=np.float32).copy()
    w[: len(w) // 2] *= 1.001
    data.write_bytes(w.tobytes())


@pytest.fixture(scope="module")
def ext_model(tiny_onnx, tmp_path_factory) -> str:
    return save_with_external_data(tiny_onnx, tmp_path_factory.mktemp("ext") / "model")


def sample(model: str, seed: int = SEED, eta: float = 0.0) -> np.ndarray:
    from ddpm_deploy.runtime import load

    with load(model, backend="onnxruntime") as pipe:
        return pipe.sample(N, seed=seed, sampler="ddim", steps=10, eta=eta, output="float")


def generate(model: str, out: Path, *extra, env=ENV):
    return cli("generate", "--engine", model, "--out", out, "-n", N, "--shard-size", SHARD, "--seed", SEED,
               *SAMPLING, *extra, env=env, timeout=300)


@pytest.fixture(scope="module")
def finished(ext_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "job"
    r = generate(ext_model, out)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture
def job(finished, tmp_path) -> Path:
    """A private copy of the finished job to tamper with."""
    return Path(shutil.copytree(finished, tmp_path / "job"))


def shard(out: Path, s: int) -> Path:
    return out / f"shard-{s:06d}.npy"


def tamper(path: Path, how: str) -> None:
    """Damage one shard file the ways a disk, a crash or a person can."""
    if how in ("missing", "folder"):
        path.unlink()
        if how == "folder":  # a folder where the shard was: read as "unreadable", not a traceback
            path.mkdir()
        return
    if how in ("truncated", "empty"):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if how == "truncated" else b"")
        return
    x = np.load(path)
    if how == "nan":
        x[1, 0, 2, 3] = np.nan
    elif how == "fewer":
        x = x[:-1]
    elif how == "float64":
        x = x.astype(np.float64)
    elif how == "other-images":
        x = x[::-1].copy()   # right shape, dtype and values, wrong order: only the checksum sees it
    np.save(path, x)


def counts(stdout: str) -> tuple[int, int, int]:
    m = re.search(r"(\d+) done(?: \((\d+) adopted\))?, (\d+) to go", stdout)
    assert m, stdout
    return int(m.group(1)), int(m.group(2) or 0), int(m.group(3))


BAD = ["nan", "fewer", "float64", "truncated", "empty", "missing", "folder", "other-images"]


# -- load_images and --check: a finished folder is verified, not trusted ------------------------------------------

@pytest.mark.parametrize("how", BAD)
def test_load_images_refuses_a_bad_shard_in_one_line_naming_it(job, how):
    from ddpm_deploy.generate.job import load_images

    tamper(shard(job, 1), how)
    with pytest.raises(UserError) as e:
        load_images(str(job))
    assert "shard-000001.npy" in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("how,says", [("fortran", "Fortran-ordered"), ("trailing", "data bytes"),
                                      ("huge-header", "shape (1000000000"), ("nan", "non-finite")])
def test_a_shard_whose_record_was_rewritten_too_is_still_parsed_safely(job, how, says):
    """The checksum only says the bytes are what generate.json records; with both rewritten, the bytes are parsed
    from the same buffer that was hashed (read once), header checked before anything is sized from it."""
    from ddpm_deploy.files import sha256_bytes
    from ddpm_deploy.generate.job import load_images

    path = shard(job, 1)
    x = np.load(path)
    if how == "fortran":
        x = np.asfortranarray(x)
    elif how == "nan":
        x[0, 0, 0, 0] = np.nan
    buf = io.BytesIO()
    np.save(buf, x)
    data = buf.getvalue() + (b"\0" * 4 if how == "trailing" else b"")
    if how == "huge-header":
        data = data.replace(f"({x.shape[0]}, ".encode(), b"(1000000000, ", 1)
    path.write_bytes(data)
    record = json.loads((job / "generate.json").read_text())
    for entry in record["done"]:
        if entry["shard"] == 1:
            entry["sha256"] = sha256_bytes(data)
    (job / "generate.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match=f"shard-000001.npy: .*{re.escape(says)}"):
        load_images(str(job))


def test_load_images_of_an_intact_job_is_the_reference(finished, ext_model):
    from ddpm_deploy.generate.job import load_images

    np.testing.assert_array_equal(load_images(str(finished)), sample(ext_model))


def test_check_verifies_a_finished_folder_without_ray(job, tmp_path):
    r = no_ray_cli(tmp_path, "generate", "--check", job)
    assert r.returncode == 0, r.stderr
    assert f"{N} images" in r.stdout and "4 shards" in r.stdout, r.stdout
    tamper(shard(job, 0), "nan")
    tamper(shard(job, 2), "truncated")
    r = no_ray_cli(tmp_path, "generate", "--check", job)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2, r.stderr                  # one line per bad shard, nothing else
    assert "shard-000000.npy" in lines[0] and "non-finite" in lines[0], lines
    assert "shard-000002.npy" in lines[1] and "sha256" in lines[1], lines
    assert_one_line_error(no_ray_cli(tmp_path, "generate", "--check", tmp_path / "nothing"), "nothing")


# -- resume: every kept shard is re-checked, foreign shards are not adopted ----------------------------------------

def test_resume_rechecks_every_kept_shard_and_recomputes_bad_ones(job, ext_model):
    for s, how in ((0, "nan"), (1, "float64"), (3, "empty")):
        tamper(shard(job, s), how)
    kept = shard(job, 2).stat().st_mtime_ns
    r = generate(ext_model, job)
    assert r.returncode == 0, r.stderr
    for s in (0, 1, 3):
        assert any(f"shard-{s:06d}.npy" in ln and "computing it again" in ln for ln in r.stdout.splitlines()), \
            (s, r.stdout)
    assert counts(r.stdout) == (1, 0, 3), r.stdout
    assert shard(job, 2).stat().st_mtime_ns == kept                  # the good shard was not recomputed
    from ddpm_deploy.generate.job import load_images

    np.testing.assert_array_equal(load_images(str(job)), sample(ext_model))


def test_orphans_of_the_same_job_are_adopted_after_checking_them(job, ext_model, tmp_path):
    """generate.json lost (or the driver killed between a shard and its record): the shards' own records
    say which job wrote them, and a shard whose contents no longer match is not adopted."""
    (job / "generate.json").unlink()
    stale = job / "shard-000001.npy.k1ll3d.tmp"       # a driver killed mid-write leaves its temp file
    stale.write_bytes(b"half")
    r = no_ray_cli(tmp_path, "generate", "--check", job)
    assert r.returncode != 0 and "generate.json" in r.stderr, r.stderr
    # same settings: all adopted, nothing to compute (so no Ray start)
    r = generate(ext_model, job)
    assert r.returncode == 0, r.stderr
    assert counts(r.stdout) == (4, 4, 0), r.stdout
    assert not stale.exists()
    from ddpm_deploy.generate.job import load_images

    np.testing.assert_array_equal(load_images(str(job)), sample(ext_model))


@pytest.mark.parametrize("option", [("--seed", "6"), ("--eta", "0.5")], ids=["seed", "eta"])
def test_orphans_of_another_job_are_not_adopted(job, ext_model, option):
    (job / "generate.json").unlink()
    r = generate(ext_model, job, *option)     # the later option wins over generate()'s --seed
    assert r.returncode == 0, r.stderr
    assert counts(r.stdout) == (0, 0, 4), r.stdout
    for s in range(4):
        assert any(f"shard-{s:06d}.npy" in ln and "not adopted" in ln for ln in r.stdout.splitlines()), r.stdout
    from ddpm_deploy.generate.job import load_images

    seed = int(option[1]) if option[0] == "--seed" else SEED
    eta = float(option[1]) if option[0] == "--eta" else 0.0
    np.testing.assert_array_equal(load_images(str(job)), sample(ext_model, seed=seed, eta=eta))


def test_changed_external_weights_are_another_job(job, ext_model, tmp_path):
    model = Path(shutil.copytree(Path(ext_model).parent, tmp_path / "model2")) / "tiny.onnx"
    r = generate(str(model), job)              # the same model content elsewhere resumes (nothing to do)
    assert r.returncode == 0, r.stderr
    assert counts(r.stdout) == (4, 0, 0), r.stdout
    change_weights(model.parent)               # the .onnx file unchanged, its weights not
    assert_one_line_error(generate(str(model), job), "different generate job", "model_sha256")


def test_a_folder_another_driver_holds_is_refused(job, ext_model):
    """Two `generate` drivers on one folder were not kept apart (noted in session 5): the second removed the first's
    temp files and rewrote generate.json under it. The driver holds OUT/.generate.lock while it works; another
    one is refused in one line and changes nothing."""
    from ddpm_deploy.files import folder_lock
    from ddpm_deploy.generate.job import JOB_LOCK

    before = {p.name: p.stat().st_mtime_ns for p in job.iterdir()}
    with folder_lock(job, JOB_LOCK) as held:  # what a running driver holds
        assert held
        assert_one_line_error(generate(ext_model, job), "being written by another", "--out")
        assert {p.name: p.stat().st_mtime_ns for p in job.iterdir()} == before
    r = generate(ext_model, job)                # released: the job resumes (nothing to do)
    assert r.returncode == 0 and counts(r.stdout) == (4, 0, 0), r.stdout + r.stderr


def test_a_folder_in_a_shards_place_is_one_line(job, ext_model):
    """A folder named like a shard: resume found it "unreadable" and then died in a traceback renaming the new
    shard over it (os.replace: IsADirectoryError). Now one line naming the file, and the folder is left alone."""
    tamper(shard(job, 1), "folder")
    assert_one_line_error(generate(ext_model, job), "shard-000001.npy", "folder of that name")
    assert shard(job, 1).is_dir() and not list(job.glob("*.tmp"))


def test_an_older_record_without_checksums_is_refused(job, ext_model):
    record = json.loads((job / "generate.json").read_text())
    record["version"] = 1
    (job / "generate.json").write_text(json.dumps(record))
    assert_one_line_error(generate(ext_model, job), "generate.json", "version")


# -- the model's content: one hash for the job key and auto's cache key --------------------------------------------

def test_model_sha256_covers_external_data_and_engine_sidecars(tiny_onnx, ext_model, tmp_path):
    from ddpm_deploy.files import file_sha256, model_sha256
    from ddpm_deploy.artifact.manifest import sidecar_path

    assert model_sha256(tiny_onnx) == file_sha256(tiny_onnx)   # a self-contained file: its own hash
    model = Path(shutil.copytree(Path(ext_model).parent, tmp_path / "m")) / "tiny.onnx"
    before = model_sha256(model)
    assert before == model_sha256(ext_model) and before != file_sha256(model)
    change_weights(model.parent)
    assert model_sha256(model) != before
    (model.parent / DATA).unlink()
    with pytest.raises(UserError, match=DATA):
        model_sha256(model)
    # an engine: the file and its manifest sidecar (which holds the schedule)
    engine = tmp_path / "m.trt"
    engine.write_bytes(b"engine bytes")
    sidecar_path(engine).write_text('{"schedule": 1}')
    first = model_sha256(engine)
    sidecar_path(engine).write_text('{"schedule": 2}')
    assert model_sha256(engine) != first


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/hostname", "sub/../../outside.bin"])
def test_model_sha256_refuses_external_data_outside_the_model_folder(tiny_onnx, tmp_path, location):
    import onnx

    from ddpm_deploy.files import model_sha256

    (tmp_path / "outside.bin").write_bytes(b"\0" * 4096)
    model = onnx.load(tiny_onnx)
    init = model.graph.initializer[0]
    init.ClearField("raw_data")
    init.data_location = onnx.TensorProto.EXTERNAL
    entry = init.external_data.add()
    entry.key, entry.value = "location", location
    (tmp_path / "m").mkdir()
    onnx.save(model, str(tmp_path / "m" / "hostile.onnx"))
    with pytest.raises(UserError, match="outside"):
        model_sha256(tmp_path / "m" / "hostile.onnx")


def test_auto_cache_key_covers_external_data(ext_model, tmp_path):
    from ddpm_deploy.runtime.auto_check import Candidate
    from ddpm_deploy.runtime.auto import choose

    fast = [Candidate("onnxruntime", "fp32", 1)]
    model = Path(shutil.copytree(Path(ext_model).parent, tmp_path / "m")) / "tiny.onnx"
    first = choose(str(model), cache_dir=tmp_path / "cache", cands=fast, echo=lambda _: None)
    assert choose(str(model), cache_dir=tmp_path / "cache", cands=fast, echo=lambda _: None).cached
    change_weights(model.parent)
    again = choose(str(model), cache_dir=tmp_path / "cache", cands=fast, echo=lambda _: None)
    assert not again.cached and again.cache_file != first.cache_file


# -- durable writes, and nothing written without Ray ---------------------------------------------------------------

def test_atomic_write_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    import stat

    from ddpm_deploy.files import write_bytes_atomic

    target = tmp_path / "shard.npy"
    real_fsync, synced = os.fsync, []

    def spy(fd):  # records what was flushed and whether the final name existed yet, then really flushes
        st = os.fstat(fd)
        synced.append((stat.S_ISDIR(st.st_mode), st.st_ino, target.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    write_bytes_atomic(b"x" * 100, target)
    assert target.read_bytes() == b"x" * 100
    file_ino, dir_ino = target.stat().st_ino, tmp_path.stat().st_ino
    assert (False, file_ino, False) in synced, synced   # the data, before the rename published it
    assert synced[-1] == (True, dir_ino, True), synced  # the folder (the rename itself), last


def test_generate_without_ray_refuses_before_writing_anything(tiny_onnx, tmp_path):
    out = tmp_path / "job"
    r = no_ray_cli(tmp_path, "generate", "--engine", tiny_onnx, "--out", out, "-n", 4)
    assert "ray" in assert_one_line_error(r, "serve").lower()
    assert not out.exists(), list(out.iterdir())


# -- hostile files in a job folder: devices, FIFOs, oversized files, tampered settings --------------------------------

def bounded_check(folder: Path) -> subprocess.CompletedProcess:
    """`generate --check FOLDER` under a 2 GiB address-space limit and a 60 s timeout: a regression that reads a
    device until memory runs out, or blocks on a FIFO, fails the test instead of the machine or the suite."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    return subprocess.run([sys.executable, "-m", "ddpm_deploy.cli", "generate", "--check", str(folder)],
                          capture_output=True, text=True, env=ENV, timeout=60, preexec_fn=limit)


@pytest.mark.parametrize("how,says", [("dev-zero", "not a regular file"), ("fifo", "not a regular file"),
                                      ("sparse-10GB", "bytes, more than")])
def test_a_shard_that_is_a_device_fifo_or_huge_is_refused_unread(job, how, says):
    """A shard linked to /dev/zero was read until MemoryError, a FIFO blocked forever: a shard must be a regular
    file, and no more than its expected size is read."""
    path = shard(job, 1)
    path.unlink()
    if how == "dev-zero":
        path.symlink_to("/dev/zero")
    elif how == "fifo":
        os.mkfifo(path)
    else:
        with open(path, "wb") as f:
            f.truncate(10 << 30)
    r = bounded_check(job)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "shard-000001.npy" in lines[0] and says in lines[0], lines


def _edit_record(job: Path, **settings) -> None:
    record = json.loads((job / "generate.json").read_text())
    record["settings"].update(settings)
    (job / "generate.json").write_text(json.dumps(record))


@pytest.mark.parametrize("settings,says", [
    ({"n": 10 ** 9, "shard_size": 1}, "n = 1000000000"),     # 40 s and 2.3 GB to list 1e9 missing shards
    ({"n": 10 ** 7, "shard_size": 1}, "shards"),           # within MAX_IMAGES, but 1e7 shards
    ({"n": 4.5}, "n = 4.5"), ({"n": "4"}, "n = 4"), ({"shard_size": True}, "shard_size"),
    ({"image_shape": [1, 8, 10 ** 9]}, "image_shape"), ({"image_shape": "1,8,8"}, "image_shape"),
])
def test_tampered_job_settings_are_one_line(job, settings, says):
    _edit_record(job, **settings)
    assert_one_line_error(bounded_check(job), "generate.json", says)


@pytest.mark.parametrize("how", ["nested", "fifo", "dev-zero", "list"])
def test_a_hostile_job_record_is_one_line(job, how):
    path = job / "generate.json"
    path.unlink()
    if how == "nested":
        path.write_text("[" * 100_000 + "]" * 100_000)
    elif how == "list":
        path.write_text("[1, 2]")
    elif how == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    assert_one_line_error(bounded_check(job), "generate.json")


def test_a_job_over_the_bounds_is_refused_before_anything_is_written(tiny_onnx, tmp_path):
    from ddpm_deploy.generate.job import MAX_SHARDS

    out = tmp_path / "job"
    r = cli("generate", "--engine", tiny_onnx, "--out", out, "-n", 10 ** 9, "--shard-size", 1, env=ENV, timeout=120)
    assert_one_line_error(r, "-n 1000000000", "more than")
    r = cli("generate", "--engine", tiny_onnx, "--out", out, "-n", MAX_SHARDS + 1, "--shard-size", 1, env=ENV,
            timeout=120)
    assert_one_line_error(r, f"{MAX_SHARDS + 1} shards", "--shard-size of at least 2")
    assert not out.exists()


def test_a_long_tampered_setting_is_cut_in_the_refusal(job, ext_model):
    """A record whose sampler is a megabyte of text: the refusal names it in a line of bounded length."""
    _edit_record(job, sampler="x" * 10 ** 6)
    line = assert_one_line_error(generate(ext_model, job), "different generate job", "sampler")
    assert len(line) < 1000, len(line)
