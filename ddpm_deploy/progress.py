"""Progress of a long command, for whoever watches: a tqdm bar on a terminal, else (CI logs, nohup, pipes) one
plain line on stderr at a bounded interval: what, how far, elapsed and ETA. `enabled=False` (--quiet): nothing.

    with Progress("train", total=8000, unit="step", enabled=not quiet) as p:
        for ...: p.update(1)

Off a terminal a line is written each time another tenth of the work is done and, on a slow run, at least every
LINE_EVERY_S seconds between those tenths: at most ~10 lines for a quick run, one per half minute for a long one.
"""

from __future__ import annotations

import sys
import time

LINE_EVERY_FRACTION = 0.10  # a line at every 10 % of the work...
LINE_EVERY_S = 30.0  # ...and at least every 30 s while it runs


def format_duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


class Progress:
    """A tqdm bar when `stream` (default stderr) is a terminal, periodic lines otherwise, nothing when disabled.
    `update(n)` after each unit of work; `set_postfix(**kw)` adds e.g. the loss to the bar and the lines."""

    def __init__(self, what: str, total: int, *, unit: str = "step", initial: int = 0, enabled: bool = True,
                 stream=None, leave: bool = False, clock=time.monotonic):
        self.what, self.total, self.unit, self.done = what, max(0, int(total)), unit, int(initial)
        self.stream = stream if stream is not None else sys.stderr
        self.clock, self.postfix, self.bar = clock, {}, None
        self.mode = None if not enabled else ("bar" if _isatty(self.stream) else "lines")
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=self.done, desc=what, unit=unit, leave=leave, file=self.stream)
        self.start_done, self.t0 = self.done, clock()
        self.last_line_t = self.t0
        self.next_mark = self._mark_after(self.done)

    def _mark_after(self, done: int) -> int:
        """The next count at which another tenth of the work is done."""
        step = max(1, round(self.total * LINE_EVERY_FRACTION))
        return (done // step + 1) * step

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.mode == "bar":
            self.bar.update(n)
        elif self.mode == "lines":
            now = self.clock()
            if self.done >= min(self.next_mark, self.total) or now - self.last_line_t >= LINE_EVERY_S:
                self._line(now)

    def set_postfix(self, **kw) -> None:
        self.postfix = kw
        if self.mode == "bar":
            self.bar.set_postfix(**kw)

    def _line(self, now: float) -> None:
        elapsed = now - self.t0
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        pct = 100 * self.done // self.total if self.total else 100
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        self.stream.write(f"{self.what}: {self.done}/{self.total} {self.unit}s ({pct}%), {format_duration(elapsed)} "
                          f"elapsed, ETA {format_duration(eta) if eta == eta else '?'}{extra}\n")
        self.stream.flush()
        self.last_line_t = now
        self.next_mark = self._mark_after(self.done)

    def close(self, finished: bool = True) -> None:
        """`finished` False (an exception is on its way): no 'done' line, the error says what happened."""
        if self.mode == "bar":
            self.bar.close()
        elif self.mode == "lines" and finished and self.done > self.start_done:
            self.stream.write(f"{self.what}: done, {self.done - self.start_done} {self.unit}s in "
                              f"{format_duration(self.clock() - self.t0)}\n")
            self.stream.flush()
        self.mode = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close(finished=exc_type is None)
        return False


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a file
        return False
