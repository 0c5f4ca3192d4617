"""Bad input at the command line: one `error:` line and exit status 2, before any work and with nothing written.
One table; each row is (command line, words the line must contain). Placeholders: {onnx} {ckpt} the tiny model,
{d} a scratch folder, {ro} a folder this process cannot write to, {resumed} a run at step 30, {png} a picture."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from conftest import assert_one_line_error, cli

RESUME_FLAGS = ["--preset", "tiny", "--image-size", "8", "-T", "50", "--batch-size", "8", "--threads", "1"]

CASES = [
    # train
    (["train", "--preset", "huge", "--out", "{d}/o"], ["Invalid value for '--preset'", "huge"]),
    (["train", "--batch-size", "0", "--out", "{d}/o"], ["--batch-size", "0"]),
    (["train", "--steps", "0", "--out", "{d}/o"], ["--steps", "0"]),
    (["train", "--out", "{resumed}", "--resume", "--steps", "12", *RESUME_FLAGS],
     ["already at step 30", "--steps 12 is the total", "greater than 30"]),
    (["train", "--out", "{resumed}", "--resume", "--steps", "30", *RESUME_FLAGS], ["already at step 30"]),
    (["train", "--out", "{ro}/run", "--preset", "tiny"], ["not writable"]),
    # knobs that trained NaN models with exit 0 (--lr nan: a ValueError traceback), refused at parse time
    (["train", "--lr", "nan", "--out", "{d}/o"], ["--lr", "finite number > 0", "nan"]),
    (["train", "--lr", "inf", "--out", "{d}/o"], ["--lr", "finite number > 0", "inf"]),
    (["train", "--ema-decay", "5", "--out", "{d}/o"], ["--ema-decay", "[0, 1)"]),
    (["train", "--ema-decay", "nan", "--out", "{d}/o"], ["--ema-decay", "[0, 1)"]),
    (["train", "--checkpoint-every", "0", "--out", "{d}/o"], ["--checkpoint-every", "0"]),
    # a run's resume state is only continued: never replaced by a new run or by the other command
    (["train", "--out", "{resumed}", "--steps", "40", *RESUME_FLAGS],
     ["already holds a `ddpm-deploy train` run", "--resume", "another --out"]),
    # distill
    (["distill", "{ckpt}", "--lr", "nan", "--out", "{d}/o"], ["--lr", "finite number > 0", "nan"]),
    (["distill", "{ckpt}", "--lr", "inf", "--out", "{d}/o"], ["--lr", "finite number > 0", "inf"]),
    (["distill", "{ckpt}", "--ema-decay", "nan", "--out", "{d}/o"], ["--ema-decay", "[0, 1)"]),
    (["distill", "{ckpt}", "--ema-decay", "5", "--out", "{d}/o"], ["--ema-decay", "[0, 1)"]),
    (["distill", "{ckpt}", "--out", "{resumed}", "--threads", "1"],
     ["holds a `ddpm-deploy train` run", "another --out"]),
    (["distill", "{ckpt}", "--out", "{resumed}", "--resume", "--threads", "1"],
     ["`ddpm-deploy train` run's resume state", "not a `ddpm-deploy distill` one"]),
    # run
    (["run", "--engine", "{onnx}", "--seed", "-1"], ["--seed", "-1"]),
    (["run", "--engine", "{onnx}", "--batch-size", "0"], ["--batch-size", "0"]),
    (["run", "--engine", "{onnx}", "--eta", "0.5"], ["eta applies to sampler ddim only"]),
    (["run", "--engine", "{png}"], ["--engine", "pic.png", "is not an engine"]),
    # a checkpoint given to --engine ran on PyTorch while the line named no engine: it goes to --checkpoint
    (["run", "--engine", "{ckpt}", "-o", "{d}/s.png"], ["--engine", "is a checkpoint", "--checkpoint"]),
    (["run", "--engine", "digits-1step", "-o", "{d}/s.png"], ["is a checkpoint", "`--checkpoint digits-1step`"]),
    (["run", "--engine", "{d}/nosuch", "-o", "{d}/s.png"], ["--engine", "nosuch not found", ".onnx"]),
    (["verify", "--engine", "digits", "--checkpoint", "digits", "--report", "{d}/v.json"],
     ["--engine digits is a checkpoint"]),
    (["eval", "--engine", "{ckpt}", "-n", "1"], ["is a checkpoint", "--checkpoint"]),
    (["bench", "--engine", "digits", "--no-memory"], ["--engine digits is a checkpoint"]),
    (["run", "--engine", "{onnx}", "-o", "{ro}/s.png"], ["not writable"]),
    (["run", "--engine", "{onnx}", "-o", "{d}"], ["is a directory"]),
    (["run", "--engine", "{onnx}", "-o", "{d}/out.txt"], ["out.txt", ".png"]),  # was: a PNG named out.txt
    (["run", "--engine", "{onnx}", "-o", "{d}/s.png", "--save-npy", "{d}/x.txt"], ["x.txt", ".npy"]),
    # was: minutes of silence, then an out-of-memory kill; now the estimate and --yes (issue 24)
    (["run", "--engine", "{onnx}", "--backend", "onnxruntime", "-n", "5000", "-o", "{d}/s.png"],
     ["-n 5000", "images", "about", "MB", "--yes", "ddpm-deploy generate"]),
    (["run", "--engine", "{onnx}", "--backend", "onnxruntime", "-n", "1000000000", "--yes", "-o", "{d}/s.png"],
     ["-n 1000000000", "GB", "memory", "available", "ddpm-deploy generate"]),
    # export, build, verify, eval, demo
    (["export", "{ckpt}", "-o", "{ro}/m.onnx"], ["not writable"]),
    (["build", "{onnx}", "-o", "{ro}/m.trt"], ["not writable"]),
    (["verify", "--engine", "{onnx}", "--checkpoint", "{ckpt}", "--report", "{ro}/v.json"], ["not writable"]),
    (["verify", "--engine", "{png}", "--checkpoint", "{ckpt}", "--report", "{d}/v.json"], ["pic.png", "not an engine"]),
    (["verify", "--engine", "{onnx}", "--checkpoint", "{ckpt}", "--sampler", "ddpm", "--eta", "1",
      "--report", "{d}/v.json"], ["eta applies to sampler ddim only"]),
    (["verify", "--engine", "{onnx}", "--checkpoint", "{ckpt}", "--seed", "-3", "--report", "{d}/v.json"],
     ["--seed", "-3"]),
    # checked from the file's manifest before either model is loaded (was: after both, and after a compile)
    (["verify", "--engine", "{onnx}", "--checkpoint", "{ckpt}", "--steps", "5000", "--report", "{d}/v.json"],
     ["steps must be between 1 and T="]),
    (["eval", "--engine", "{png}", "--checkpoint", "{ckpt}"], ["pic.png", "not an engine"]),
    (["eval", "--engine", "{onnx}", "-n", "0"], ["-n", "0"]),
    (["eval", "--engine", "{onnx}", "-n", "4", "--all"], ["-n N or --all"]),
    (["demo", "--out", "{ro}/demo"], ["not writable"]),
]


def _can_write(folder: Path) -> bool:
    try:
        fd, probe = tempfile.mkstemp(dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


@pytest.fixture(scope="module")
def unwritable(tmp_path_factory) -> Path:
    """A folder that really refuses new files: a read-only one, or (root ignores modes) sysfs."""
    d = tmp_path_factory.mktemp("ro")
    d.chmod(0o555)
    if not _can_write(d):
        return d
    if Path("/sys").is_dir() and not _can_write(Path("/sys")):
        return Path("/sys")
    pytest.skip("no folder here refuses writes to this user")


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> Path:
    """A training run at step 30 (tiny UNet, T=50): its checkpoint.pt and model.pt."""
    pytest.importorskip("torch")
    from ddpm_deploy.train.trainer import TrainConfig, Trainer

    out = tmp_path_factory.mktemp("run30")
    cfg = TrainConfig(out=str(out), preset="tiny", image_size=8, num_train_timesteps=50, steps=30, batch_size=8,
                      checkpoint_every=30, sample_n=0, threads=1)
    Trainer(cfg, progress=False).fit()
    return out


@pytest.mark.parametrize("args,words", CASES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in CASES])
def test_bad_input_is_one_line(args, words, tiny_onnx, tiny_ckpt, tmp_path, unwritable, resumed):
    (tmp_path / "pic.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    model, checkpoint = resumed / "model.pt", resumed / "checkpoint.pt"
    before, before_checkpoint = model.read_bytes(), checkpoint.read_bytes()
    subs = {"{onnx}": tiny_onnx, "{ckpt}": tiny_ckpt, "{d}": str(tmp_path), "{ro}": str(unwritable),
            "{resumed}": str(resumed), "{png}": str(tmp_path / "pic.png")}
    argv = []
    for a in args:
        for k, v in subs.items():
            a = a.replace(k, v)
        argv.append(a)
    r = cli(*argv, cwd=tmp_path)
    assert_one_line_error(r, *words)
    assert model.read_bytes() == before  # a refused --resume leaves the run as it was
    assert checkpoint.read_bytes() == before_checkpoint and sorted(p.name for p in resumed.iterdir()) == [
        "checkpoint.pt", "model.pt"]
    written = sorted(p.name for p in tmp_path.iterdir() if p.name != "pic.png")
    assert written == [], written  # nothing half-written, no empty output folders


# A plain install (`pip install ddpm-deploy`): none of the torch extra's modules can be imported.
NO_TORCH_EXTRA = r"""
import sys
for m in ("torch", "diffusers", "safetensors", "sklearn", "onnxscript", "matplotlib"):
    sys.modules[m] = None  # any import of them now fails, as in a plain install
from ddpm_deploy.cli import main
main(sys.argv[1:])
"""

NEEDS_TORCH = [
    ["export", "digits", "-o", "{d}/d.onnx"],
    ["run", "--checkpoint", "digits", "-o", "{d}/s.png"],
    ["demo", "--out", "{d}/ddpm-demo"],
    ["info", "digits"],
    ["train", "--out", "{d}/run"],
    ["verify", "--engine", "{onnx}", "--checkpoint", "digits", "--report", "{d}/v.json"],
    ["bench", "--checkpoint", "digits"],
    ["eval", "--engine", "{onnx}"],
]


@pytest.mark.parametrize("args", NEEDS_TORCH, ids=[a[0] for a in NEEDS_TORCH])
def test_plain_install_names_the_extra(args, tiny_onnx, tmp_path):
    import subprocess
    import sys

    argv = [a.replace("{d}", str(tmp_path)).replace("{onnx}", tiny_onnx) for a in args]
    r = subprocess.run([sys.executable, "-c", NO_TORCH_EXTRA, *argv], capture_output=True, text=True, cwd=tmp_path,
                       timeout=120)
    assert_one_line_error(r, 'pip install "ddpm-deploy[torch]"', "is not installed")
    assert list(tmp_path.iterdir()) == []  # no empty ddpm-demo/ or runs/ left behind


def test_plain_install_still_runs_engines(tiny_onnx, tmp_path):
    """The base install keeps what needs no torch: run on an .onnx, info on an .onnx."""
    import subprocess
    import sys

    for args in (["run", "--engine", tiny_onnx, "-n", "2", "--sampler", "ddim", "--steps", "3", "-o",
                  str(tmp_path / "s.png"), "--quiet"], ["info", tiny_onnx]):
        r = subprocess.run([sys.executable, "-c", NO_TORCH_EXTRA, *args], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
    assert (tmp_path / "s.png").is_file()


def test_large_run_with_yes_states_its_estimate_first(tiny_onnx, tmp_path):
    """Past RUN_CONFIRM_N images `run --yes` goes ahead, saying up front how long and how large it will be."""
    from ddpm_deploy.cli import RUN_CONFIRM_N

    n = RUN_CONFIRM_N + 1
    r = cli("run", "--engine", tiny_onnx, "--backend", "onnxruntime", "-n", n, "--sampler", "ddim", "--steps", "2",
            "--yes", "--quiet", "-o", tmp_path / "s.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    first = r.stderr.splitlines()[0]
    assert first.startswith(f"-n {n}: about ") and "MB" in first, r.stderr
    assert (tmp_path / "s.png").is_file()


@pytest.mark.parametrize("command", [["train", "--data", "digits", "--out", "unused-out"],
                                     ["distill", "digits", "--steps-to", "4", "--out", "unused-out"],
                                     ["bench", "--engine", "unused.onnx"]])
@pytest.mark.parametrize("threads", ["0", "-3"])
def test_threads_below_one_is_one_line_for_every_command(tmp_path, command, threads):
    """issue 24: train, distill and bench took --threads 0 / -3 (torch and onnxruntime then ran with a nonsense
    thread count); run/verify/eval/serve/generate already refused it."""
    r = cli(*command, "--threads", threads, cwd=tmp_path)
    assert_one_line_error(r, "--threads")
    assert not (tmp_path / "unused-out").exists()


def test_threads_above_the_usable_cores_are_capped_with_a_note():
    """The torch-side commands cap --threads like the runtime does (a tampered 3000 drove the load past 900)."""
    from ddpm_deploy.cli import cap_threads
    from ddpm_deploy.runtime.auto import usable_cores

    cores = usable_cores()
    assert cap_threads(None, None, None) is None and cap_threads(None, None, 1) == 1
    assert cap_threads(None, None, cores + 5) == cores


def test_run_keeps_an_existing_default_output(tiny_onnx, tmp_path):
    """`run` without -o replaced an earlier run's samples.png without a word. Now: kept, with one line, unless
    --force; a file named with -o is what was asked for, so it is replaced."""
    quick = ["run", "--engine", tiny_onnx, "--backend", "onnxruntime", "-n", "1", "--sampler", "ddim", "--steps", "2",
             "--quiet"]
    earlier = tmp_path / "samples.png"
    earlier.write_bytes(b"an earlier run's grid")
    r = cli(*quick, cwd=tmp_path)
    assert_one_line_error(r, "samples.png exists", "-o FILE.png", "--force")
    assert earlier.read_bytes() == b"an earlier run's grid"
    for extra in (["--force"], ["-o", "samples.png"]):
        earlier.write_bytes(b"an earlier run's grid")
        r = cli(*quick, *extra, cwd=tmp_path)
        assert r.returncode == 0 and "wrote samples.png" in r.stdout, r.stderr
        assert earlier.read_bytes().startswith(b"\x89PNG"), extra
