"""Timing: medians of wall time, per-call engine times, and the derived per-step figures.

Reported per configuration (medians; `*_s` lists keep every repeat). ms_per_step, images_per_s, chain_ms and the
spread all come from the same samples, the whole timed chains, so a printed figure always lies inside its printed
range (a median of engine-call intervals pooled over the chains need not: it leaves out each chain's fixed costs):
  ms_per_step   median whole chain / steps (one step: engine + host work, the chain's noise and output included)
  engine_ms     median raw engine call
  images_per_s  batch / median whole-chain seconds, at `steps` steps (a chain of T steps takes T/steps longer)
  overhead      (whole chain - sum of engine calls) / whole chain: what the runtime adds around the engine
  chain_ms_min / chain_ms / chain_ms_max   fastest, median and slowest timed chain
  spread        (max - min) / median of the chain times; `noisy` when above tolerances.BENCH_NOISY_SPREAD (other
                work on the cores): None with a single repeat, which has no spread to judge
  step_interval_ms   median interval between consecutive engine-call starts, pooled over the chains (the steady
                step without the chain's fixed costs; JSON only, it has no range of its own)
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from ..errors import UserError
from ..tolerances import BENCH_NOISY_SPREAD


def median_ms(fn, warmup: int, reps: int) -> float:
    """Median wall time of `fn()` in ms over `reps` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


class ModuleTimer:
    """Times every forward of a torch module with hooks (diffusers calls `unet(...)`, which fires them); `calls`
    fills with (start, seconds) like a runtime backend's `engine_time.record()`."""

    def __init__(self, module):
        self.module, self.calls, self._start, self._hooks = module, [], 0.0, []

    def __enter__(self):
        def pre(*_):
            self._start = time.perf_counter()

        def post(*_):
            self.calls.append((self._start, time.perf_counter() - self._start))

        self._hooks = [self.module.register_forward_pre_hook(pre), self.module.register_forward_hook(post)]
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        return False


def measure(run, calls: list, repeats: int) -> dict:
    """Call `run(i)` for i < `repeats` (one timed chain each); `calls` is the timer's (start, seconds) list."""
    totals, engine_sums, durations, intervals = [], [], [], []
    for r in range(repeats):
        calls.clear()
        t0 = time.perf_counter()
        run(r)
        totals.append(time.perf_counter() - t0)
        starts = [s for s, _ in calls]
        durations += [d for _, d in calls]
        engine_sums.append(sum(d for _, d in calls))
        intervals += np.diff(starts).tolist()
    return {"chain_s": totals, "engine_s": engine_sums, "engine_calls": len(durations), "durations": durations,
            "intervals": intervals}


def summarize(raw: dict, batch: int, steps: int) -> dict:
    """Medians and ratios from `measure`'s raw times."""
    if not raw["durations"]:
        raise UserError("no engine call was timed: the backend did not count its engine time")
    chain = statistics.median(raw["chain_s"])
    spread = (max(raw["chain_s"]) - min(raw["chain_s"])) / chain if len(raw["chain_s"]) > 1 else None
    overheads = [(t - e) / t for t, e in zip(raw["chain_s"], raw["engine_s"])]
    interval = statistics.median(raw["intervals"]) if raw["intervals"] else None
    return {"batch": batch, "steps": steps, "repeats": len(raw["chain_s"]),
            "ms_per_step": 1000 * chain / steps, "engine_ms": 1000 * statistics.median(raw["durations"]),
            "engine_ms_min": 1000 * min(raw["durations"]), "chain_ms": 1000 * chain,
            "chain_ms_min": 1000 * min(raw["chain_s"]), "chain_ms_max": 1000 * max(raw["chain_s"]),
            "spread": spread, "noisy": None if spread is None else spread > BENCH_NOISY_SPREAD,
            "images_per_s": batch / chain, "overhead": statistics.median(overheads),
            "step_interval_ms": None if interval is None else 1000 * interval,
            "chain_s": raw["chain_s"], "engine_s": raw["engine_s"], "engine_calls": raw["engine_calls"]}
