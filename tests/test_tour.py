"""README's Tour, executed as written: every `ddpm-deploy ...` line of its code block, in order, in one folder.

Only the sizes the README names are made smaller (SMALLER below); a Tour line that is not found here, or a
SMALLER entry that no longer matches a Tour line, fails the test, so the two cannot drift apart."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from conftest import assert_one_line_error, cli

README = Path(__file__).resolve().parents[1] / "README.md"

# Tour line (without its comment) -> what the test runs instead: the smaller sizes README states.
SMALLER = {
    "ddpm-deploy train --data digits --out runs/mine --steps 1000":
        "ddpm-deploy train --data digits --out runs/mine --steps 20 --batch-size 16 --sample-n 4",
    "ddpm-deploy train --data digits --out runs/mine --steps 1500 --resume":
        "ddpm-deploy train --data digits --out runs/mine --steps 30 --resume --batch-size 16 --sample-n 4",
    "ddpm-deploy eval --engine digits.onnx --checkpoint digits":
        "ddpm-deploy eval --engine digits.onnx --checkpoint digits -n 2",
    "ddpm-deploy bench --engine digits.onnx --checkpoint digits":
        "ddpm-deploy bench --engine digits.onnx --checkpoint digits --batch 1 --repeats 1 --steps 5 --no-memory",
}


def tour_commands() -> list[str]:
    text = README.read_text()
    block = re.search(r"^## Tour\n.*?^```bash\n(.*?)^```", text, re.S | re.M)
    assert block, "README has no ## Tour bash block"
    lines = [ln.split(" # ")[0].strip() for ln in block.group(1).splitlines()]
    return [ln for ln in lines if ln.startswith("ddpm-deploy ")]


def _has_tensorrt_gpu() -> bool:
    from ddpm_deploy.runtime.cuda import tensorrt_problem

    return tensorrt_problem() is None


def test_tour_names_what_it_shrinks():
    commands = tour_commands()
    assert len(commands) >= 10
    missing = [k for k in SMALLER if k not in commands]
    assert not missing, f"README Tour no longer has these lines (update SMALLER and README together): {missing}"


@pytest.mark.slow
def test_tour_runs_as_written(tmp_path):
    import os

    pytest.importorskip("torch")
    # One OpenMP thread: on a 2-core machine shared with other jobs, PyTorch's default 2 spinning threads run
    # ~10x slower (measured: this test 541 s with them, 142 s without, at load ~4-5); same commands, same results.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for command in tour_commands():
        argv = shlex.split(SMALLER.get(command, command))[1:]
        r = cli(*argv, cwd=tmp_path, env=env)
        if argv[0] == "build" and not _has_tensorrt_gpu():
            assert_one_line_error(r, "TensorRT")
            assert not (tmp_path / "digits.trt").exists()
            continue
        assert r.returncode == 0, (command, r.stdout[-2000:], r.stderr[-2000:])
        assert "Traceback" not in r.stderr and "torchvision" not in r.stderr, (command, r.stderr[-2000:])
    for name in ("digits.onnx", "digits.fp16.onnx", "samples.png", "ref.png", "verify.json", "verify.png",
                 "runs/mine/model.pt", "runs/mine/samples.png", "mine.onnx", "verify-mine.json", "mine.png"):
        assert (tmp_path / name).is_file(), name


def test_demo_runs_every_stage(tiny_ckpt, tmp_path):
    """The demo's stages on the tiny model (the CLI runs the same function on `digits`): both precisions exported,
    sampled and verified whole-chain, every file written, a verdict returned."""
    pytest.importorskip("torch")
    from ddpm_deploy.app.demo import run_demo

    lines = []
    ok = run_demo(str(tmp_path / "demo"), n=2, echo=lines.append, model=tiny_ckpt)
    names = sorted(p.name for p in (tmp_path / "demo").iterdir())
    assert names == ["model.fp16.onnx", "model.onnx", "samples_fp16.png", "samples_fp32.png", "verify_fp16.json",
                     "verify_fp16.png", "verify_fp32.json", "verify_fp32.png"], names
    verdicts = [ln for ln in lines if "verdict:" in ln and "parity verdict:" not in ln]  # export prints its own
    assert len(verdicts) == 2 and sum("parity verdict: PASS" in ln for ln in lines) == 2, lines
    assert lines[-1].startswith("\ndemo ")
    assert ok == all("verdict: PASS" in ln for ln in lines if "verdict:" in ln)


def _stderr_on_a_terminal(*args) -> str:
    """Run `ddpm-deploy ARGS` with stderr on a pseudo-terminal (as a person sees it); what it wrote there."""
    import os
    import pty
    import subprocess
    import sys

    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    try:
        subprocess.run([sys.executable, "-m", "ddpm_deploy.cli", *args], stdout=subprocess.DEVNULL, stderr=slave,
                       check=True, timeout=300)
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
    return b"".join(chunks).decode(errors="replace")


def test_progress_bars_only_on_a_terminal(tiny_onnx, tmp_path):
    args = ["run", "--engine", tiny_onnx, "--backend", "onnxruntime", "-n", "2", "--sampler", "ddim", "--steps", "20",
            "-o", str(tmp_path / "s.png")]
    shown = _stderr_on_a_terminal(*args)
    assert "sampling" in shown and "/20 [" in shown and "step/s" in shown, shown  # tqdm: count, ETA, rate
    assert _stderr_on_a_terminal(*args, "--quiet").strip() == ""
    piped = cli(*args)
    assert piped.returncode == 0 and piped.stderr.strip() == "", piped.stderr
