"""The engine-time counter every backend keeps around its network calls (a device loop's: each step's launch)."""

from __future__ import annotations

import time


class EngineTimer:
    """Time spent in engine calls, counted by the backend around each call of the network (for a device loop:
    each step's launch). Totals always; with `record()` also each call's (start, seconds), which benchmarks read."""

    def __init__(self):
        self.seconds, self.count, self.calls = 0.0, 0, None

    def record(self) -> list:
        """Start keeping (start, seconds) per call; returns the list that fills."""
        self.calls = []
        return self.calls

    def stop(self) -> None:
        self.calls = None

    def __enter__(self):
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        dt = time.perf_counter() - self._t0
        self.seconds += dt
        self.count += 1
        if self.calls is not None:
            self.calls.append((self._t0, dt))
        return False
