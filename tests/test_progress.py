"""Progress off a terminal (CI logs, nohup, pipes): `train`, `eval` and `bench` print one line to stderr at a
bounded interval (what, how far, ETA); `--quiet` silences it. On a terminal the same helper draws a tqdm bar."""

from __future__ import annotations

import io
import re

import pytest

from conftest import TINY_T, cli

LINE = re.compile(r"^(?P<what>.+?): (?P<done>\d+)/(?P<total>\d+) \S+ \((?P<pct>\d+)%\), .*ETA", re.M)


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_lines_every_tenth_and_every_interval():
    from ddpm_deploy.progress import LINE_EVERY_S, Progress

    out, clock = io.StringIO(), _Clock()
    with Progress("work", 1000, unit="step", stream=out, clock=clock) as p:
        for _ in range(1000):
            clock.now += 0.001
            p.update(1)
    lines = out.getvalue().splitlines()
    found = [LINE.match(ln) for ln in lines[:-1]]
    assert all(found) and [int(m["pct"]) for m in found] == list(range(10, 101, 10)), lines
    assert lines[-1].startswith("work: done, 1000 steps in "), lines[-1]

    out, clock = io.StringIO(), _Clock()  # a slow run: a line every LINE_EVERY_S seconds between the 10 % marks
    p = Progress("slow", 1000, stream=out, clock=clock)
    for _ in range(50):
        clock.now += LINE_EVERY_S / 4
        p.update(1)
    lines = out.getvalue().splitlines()
    assert len(lines) == 50 // 4, lines  # 5 % of the work in 12.5 intervals: one line per interval, no more
    assert "ETA" in lines[0] and "1/1000" not in lines[0]


def test_disabled_prints_nothing_and_a_terminal_gets_a_bar():
    from ddpm_deploy.progress import Progress

    out = io.StringIO()
    with Progress("work", 10, enabled=False, stream=out) as p:
        p.update(10)
    assert out.getvalue() == ""

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    with Progress("work", 10, stream=tty) as p:
        p.update(10)
    assert "/10 [" in tty.getvalue() and "step/s" in tty.getvalue() and "\r" in tty.getvalue()  # a tqdm bar


def _progress_lines(stderr: str, what: str) -> list:
    return [m for m in LINE.finditer(stderr) if m["what"].startswith(what)]


TRAIN = ["train", "--preset", "tiny", "--image-size", "8", "-T", str(TINY_T), "--steps", "20", "--batch-size", "8",
         "--sample-n", "0", "--threads", "1", "--checkpoint-every", "20"]


@pytest.mark.parametrize("quiet", [False, True])
def test_train_eval_bench_report_progress_into_a_pipe(tiny_onnx, tmp_path, quiet):
    pytest.importorskip("torch")
    q = ["--quiet"] if quiet else []
    commands = {
        "train": TRAIN + ["--out", str(tmp_path / "run")] + q,
        "bound": ["eval", "--engine", tiny_onnx, "--backend", "onnxruntime", "-n", "2", "--threads", "1"] + q,
        "bench": ["bench", "--engine", tiny_onnx, "--backend", "onnxruntime", "--batch", "1,2", "--steps", "2",
                  "--repeats", "2", "--warmup", "0", "--threads", "1", "--no-memory"] + q,
    }
    for what, args in commands.items():
        r = cli(*args, cwd=tmp_path)  # stdout and stderr are pipes here
        assert r.returncode == 0, (args, r.stderr[-2000:])
        lines = _progress_lines(r.stderr, what)
        if quiet:
            assert lines == [] and "ETA" not in r.stderr, (what, r.stderr)
        else:
            assert lines, (what, r.stderr)
            assert int(lines[-1]["done"]) == int(lines[-1]["total"]) and lines[-1]["pct"] == "100", r.stderr
            assert len(lines) <= 11 * (2 if what == "bound" else 1), r.stderr  # bounded: every 10 % (per side)
        assert "\r" not in r.stderr  # no bar redrawn into a log


def test_no_done_line_when_the_work_fails():
    from ddpm_deploy.progress import Progress

    out = io.StringIO()
    with pytest.raises(RuntimeError):
        with Progress("work", 10, stream=out) as p:
            p.update(5)
            raise RuntimeError("boom")
    assert "done" not in out.getvalue() and "5/10" in out.getvalue()
