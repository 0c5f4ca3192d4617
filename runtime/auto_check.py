"""Backend auto's check and timing of CPU candidates (runtime/auto.py chooses, caches and explains).

Every candidate runs the same short stochastic DDPM chain from the same noise; its steps are timed (median interval
between engine-call starts, engine and host loop together, batch 1) and its final x_0 and its eps on the
reference's states (teacher-forced, as verify does) are compared with the reference's (onnxruntime fp32, the first
candidate). A candidate clearly slower than the best so far is dropped early; the two fastest get a second turn in a
close race. See runtime/auto.py for the rules as a whole.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from .. import backend_registry as registry
from ..errors import NonFiniteError, UserError, first_line
from ..images import psnr
from ..artifact.manifest import kind_of
from ..tolerances import (AUTO_EPS_GAIN_ENVELOPE, AUTO_FP32_X0_MIN_PSNR_DB, AUTO_REDUCED_X0_MIN_PSNR_DB,
                          VERIFY_FP32_EPS_LEVEL, VERIFY_FP32_X_STEP_MAX_ABS, VERIFY_REDUCED_EPS_LEVEL,
                          VERIFY_REDUCED_X_STEP_MAX_ABS)
from .backends import open_backend
from .pipeline import Pipeline

CHECK_SAMPLER = "ddpm"
CHECK_STEPS = 8           # short chain: enough steps to carry per-step error into x_0, seconds even on 32x32
CHECK_STEPS_MIN = 3       # a slow (large) model's chain: still three states (t = T-1, mid, low) for the eps check
CHECK_BUDGET_S = 6.0      # ... fewer steps when CHECK_STEPS of the reference's warm-up step would take longer
WARMUP_STEPS = 1          # the first call allocates arenas / compiles kernels
DROP_SLOWER = 1.5         # clearly slower than the best so far (never chosen: auto.REDUCED_MIN_GAIN, noise ~1.1)
DROP_AFTER = 2            # ... judged after this many step intervals (and first on the warm-up step)
DROP_MIN_S = 0.5          # ... only when the rest of its check would take this long: below, timing noise of
                          # millisecond steps on a busy machine could drop the real winner for no saving
CONFIRM_WITHIN = 1.25     # a second turn only when the two fastest are this close (a race noise could flip)
ANNOUNCE_AFTER_S = 10.0   # an expected duration above this is also written to stderr off a terminal
MIN_TIMED_S = 0.3         # fast models: repeat the timed chain until this much was timed (at most MAX_CHAINS)
MAX_CHAINS = 5
SEED = 0


@dataclass(frozen=True)
class Candidate:
    """One CPU configuration. `path` None: the model being chosen for (tests pass another file, e.g. a model with
    perturbed weights, to prove that a candidate which disagrees with the reference is never chosen)."""

    backend: str
    precision: str = "fp32"
    threads: int = 1
    path: str | None = None

    @property
    def label(self) -> str:
        return f"{self.backend} {self.precision} {self.threads}t"

    def options(self) -> dict:
        opts = {"threads": self.threads}
        if registry.takes_precision(self.backend):
            opts["precision"] = self.precision
        return opts


def min_psnr(candidate: Candidate) -> float:
    return AUTO_FP32_X0_MIN_PSNR_DB if candidate.precision == "fp32" else AUTO_REDUCED_X0_MIN_PSNR_DB


def eps_tolerance(alpha_bar_t: float, precision: str) -> float:
    """The largest eps error at a timestep with cumulative alpha `alpha_bar_t` that passes verify's per-step check
    for every sampler. Verify bounds a step's x_{t-1} error by max(floor, eps_level x G), G the step's eps gain
    (verify.step_bounds, sampling.step.eps_gain), and every step evaluated at t has G <= AUTO_EPS_GAIN_ENVELOPE x
    sqrt((1 - a-bar_t) / a-bar_t). An eps error e moves x_{t-1} by at most G e, so it passes if e <= eps_level
    (whatever G) or if e x that envelope <= floor (near t = 0, where eps hardly reaches x)."""
    level, floor = ((VERIFY_FP32_EPS_LEVEL, VERIFY_FP32_X_STEP_MAX_ABS) if precision == "fp32"
                    else (VERIFY_REDUCED_EPS_LEVEL, VERIFY_REDUCED_X_STEP_MAX_ABS))
    envelope = AUTO_EPS_GAIN_ENVELOPE * math.sqrt((1.0 - alpha_bar_t) / alpha_bar_t)
    return max(level, floor / envelope) if envelope > 0 else math.inf


class _Slower(Exception):
    """Raised from a chain's callback to stop a candidate that is clearly slower than the best so far."""


@dataclass
class _Reference:
    """What the reference's check chain left for the others: its x_0 and, per step, (t, x_t, eps)."""

    steps: int
    x0: object = None
    states: list = field(default_factory=list)
    open_s: float = 0.0
    warmup_s: float = 0.0


def check_steps(warmup_s: float) -> int:
    """Steps of the check chain: CHECK_STEPS unless that many of the reference's warm-up step exceed
    CHECK_BUDGET_S (a large model), then fewer, never under CHECK_STEPS_MIN."""
    if warmup_s <= 0 or CHECK_STEPS * warmup_s <= CHECK_BUDGET_S:
        return CHECK_STEPS
    return max(CHECK_STEPS_MIN, int(CHECK_BUDGET_S / warmup_s))


def measure(path: str, cands: list[Candidate], echo=None) -> list[dict]:
    """Time and check every candidate; cands[0] is the reference the others' x_0 and eps are compared with.
    A candidate clearly slower than the best so far is dropped unchecked (never chosen, its row says so)."""
    echo = (lambda _: None) if echo is None else echo
    rows, ref, best = [], None, None
    for i, c in enumerate(cands):
        row = {"candidate": c.label, "backend": c.backend, "precision": c.precision, "threads": c.threads,
               "path": c.path, "min_psnr_db": None if i == 0 else min_psnr(c)}
        try:
            if i == 0:
                ref = _Reference(CHECK_STEPS)
                _measure_reference(path, c, row, ref, len(cands), echo)
            else:
                _measure_candidate(path, c, row, ref, best, _peer(rows, c))
        except (UserError, NonFiniteError, RuntimeError, ImportError, OSError) as e:
            if i == 0:  # the reference must run
                raise
            row.update(verified=False, error=first_line(e), ms_per_step=None)  # left out, the reason shown
        if row.get("verified") and (best is None or row["ms_per_step"] < best["ms_per_step"]):
            best = row
        rows.append(row)
        echo(f"auto:   {_row_text(row)}")
    return rows


def _measure_reference(path: str, c: Candidate, row: dict, ref: _Reference, n_cands: int, echo) -> None:
    t0 = time.perf_counter()
    with _open(c.path or path, c) as pipe:
        ref.open_s = time.perf_counter() - t0
        ref.warmup_s = _warmup(pipe)
        ref.steps = check_steps(ref.warmup_s)
        _announce(ref, n_cands, echo)

        def record(info):
            ref.states.append((info.t, info.x_t.copy(), info.model_output[:, :info.x_t.shape[1]].copy()))

        ref.x0, row["ms_per_step"], row["steps_timed"] = _timed_chain(pipe, ref.steps, first_callback=record)
    row.update(psnr_db=None, verified=True, note="reference", warmup_s=round(ref.warmup_s, 6),
               check_steps=ref.steps)


def _peer(rows: list[dict], c: Candidate) -> dict | None:
    """The fastest verified row of the same backend and precision (another thread count): the only one whose
    warm-up step is comparable (OpenVINO's first call compiles kernels, onnxruntime's allocates arenas)."""
    same = [r for r in rows if r.get("verified") and r.get("warmup_s") and (r["backend"], r["precision"]) ==
            (c.backend, c.precision)]
    return min(same, key=lambda r: r["ms_per_step"]) if same else None


def _measure_candidate(path: str, c: Candidate, row: dict, ref: _Reference, best: dict | None,
                       peer: dict | None) -> None:
    with _open(c.path or path, c) as pipe:
        row["warmup_s"] = round(_warmup(pipe), 6)
        if (peer is not None and row["warmup_s"] > DROP_SLOWER * peer["warmup_s"]
                and row["warmup_s"] * (2 * ref.steps) >= DROP_MIN_S):
            _dropped(row, row["warmup_s"] / peer["warmup_s"], peer, "warm-up step", None, 0)
            return
        try:
            x0, row["ms_per_step"], row["steps_timed"] = _timed_chain(
                pipe, ref.steps, first_callback=_slower_than(best, ref.steps) if best else None)
        except _Slower as e:
            ms, timed = e.args
            _dropped(row, ms / best["ms_per_step"], best, f"{timed} step intervals", ms, timed)
            return
        p = psnr(x0, ref.x0)
        row["psnr_db"] = None if p == float("inf") else round(p, 4)
        eps_ok, row["check"] = _eps_check(pipe, ref, c.precision)
        row["verified"] = bool(p >= row["min_psnr_db"] and eps_ok)


def _dropped(row: dict, ratio: float, best: dict, after: str, ms, timed: int) -> None:
    row.update(verified=False, ms_per_step=None if ms is None else round(ms, 4), steps_timed=timed, psnr_db=None,
               note=f"dropped: {ratio:.2f}x slower than {best['candidate']} after its {after}")


def _slower_than(best: dict, steps: int):
    """A chain callback that stops the candidate once DROP_AFTER step intervals show it clearly slower
    (`watch.calls`: the engine timer's record, set by _timed_chain)."""

    def watch(info):
        starts = [s for s, _ in watch.calls]
        if len(starts) > DROP_AFTER:
            ms = 1000 * statistics.median(b - a for a, b in zip(starts, starts[1:]))
            if ms > DROP_SLOWER * best["ms_per_step"] and ms * watch.steps / 1000 >= DROP_MIN_S:
                raise _Slower(ms, len(starts) - 1)

    watch.calls, watch.steps = [], steps
    return watch


def _eps_check(pipe, ref: _Reference, precision: str) -> tuple[bool, str]:
    """The candidate's eps on the reference's own states (teacher-forced, as verify does) against eps_tolerance at
    each state's t: (passed, what the worst state showed)."""
    alphas_cumprod = pipe.schedule.alphas_cumprod
    worst = None
    for t, x_t, eps_ref in ref.states:
        eps = pipe.backend.eps_batched(x_t, np.full(len(x_t), t, np.float32))[:, :x_t.shape[1]]
        err = float(np.max(np.abs(eps.astype(np.float64) - eps_ref))) if np.isfinite(eps).all() else math.inf
        tol = eps_tolerance(float(alphas_cumprod[t]), precision)
        if worst is None or err / tol > worst[0] / worst[1]:
            worst = (err, tol, t)
    err, tol, t = worst
    ok = err <= tol
    return ok, f"eps error {err:.3g} {'<=' if ok else '>'} {tol:.3g} at t={t} (worst of {len(ref.states)} steps)"


def _announce(ref: _Reference, n_cands: int, echo) -> None:
    """The expected duration, from the reference's open and warm-up: each other candidate opens, warms up, runs the
    check chain and the teacher-forced eps calls (an upper estimate: dropped candidates stop sooner)."""
    per = ref.open_s + (WARMUP_STEPS + 2 * ref.steps) * ref.warmup_s
    seconds = ref.steps * ref.warmup_s + (n_cands - 1) * per
    line = (f"backend auto: first use takes about {seconds:.0f} s here ({n_cands} candidates, "
            f"{ref.steps}-step check; once per model and machine, then cached; --backend NAME skips it)")
    if seconds >= ANNOUNCE_AFTER_S and not sys.stderr.isatty():  # a log or pipe: say it now, not after the run
        print(line, file=sys.stderr, flush=True)
    else:
        echo(line)


def confirm(path: str, cands: list[Candidate], rows: list[dict], echo=None) -> None:
    """Time the two fastest verified candidates once more and keep each one's better figure: a burst of other work
    on the machine during one candidate's turn only ever makes it look slower, so the minimum of two turns is the
    fairer comparison where it matters (which of the top two wins). Only when they are within CONFIRM_WITHIN of
    each other: a wider gap is no race, and a second turn of a large model costs minutes."""
    ok = sorted((i for i, r in enumerate(rows) if r.get("verified") and r.get("ms_per_step") is not None),
                key=lambda i: rows[i]["ms_per_step"])[:2]
    if len(ok) < 2 or rows[ok[1]]["ms_per_step"] > CONFIRM_WITHIN * rows[ok[0]]["ms_per_step"]:
        return
    steps = rows[0].get("check_steps", CHECK_STEPS)
    for i in ok:
        c, row = cands[i], rows[i]
        with _open(c.path or path, c) as pipe:
            _warmup(pipe)
            ms = _timed_chain(pipe, steps)[1]
        row["ms_per_step_turns"] = [row["ms_per_step"], ms]
        row["ms_per_step"] = min(row["ms_per_step"], ms)
        if echo:
            echo(f"auto:   {c.label:<22s} again: {ms:8.2f} ms/step (kept {row['ms_per_step']:.2f})")


def _open(path: str, c: Candidate):
    """A Pipeline on one candidate (not through runtime.load, which chooses through this module)."""
    return Pipeline(open_backend(path, kind_of(path), "cpu", c.backend, **c.options()))


def _warmup(pipe) -> float:
    """Seconds of a WARMUP_STEPS chain: the first call allocates arenas and compiles kernels."""
    t0 = time.perf_counter()
    pipe.sample(1, seed=SEED, sampler=CHECK_SAMPLER, steps=WARMUP_STEPS, output="float")
    return (time.perf_counter() - t0) / WARMUP_STEPS


def _timed_chain(pipe, steps: int = CHECK_STEPS, first_callback=None):
    """(x_0 of the check chain, median ms per step, steps timed). Steps are the intervals between engine-call
    starts: engine and host loop together, what a user waits for. `first_callback` sees the first chain's steps
    (the reference records its states; a candidate may be stopped as clearly slower)."""
    intervals, timed, x0 = [], 0.0, None
    calls = pipe.backend.engine_time.record()
    if first_callback is not None and hasattr(first_callback, "calls"):
        first_callback.calls = calls
    try:
        for chain in range(MAX_CHAINS):
            calls.clear()
            t0 = time.perf_counter()
            out = pipe.sample(1, seed=SEED, sampler=CHECK_SAMPLER, steps=steps, output="float",
                              callback=first_callback if chain == 0 else None)
            timed += time.perf_counter() - t0
            x0 = out if x0 is None else x0
            starts = [s for s, _ in calls]
            intervals += [b - a for a, b in zip(starts, starts[1:])]
            if timed >= MIN_TIMED_S:
                break
    finally:
        pipe.backend.engine_time.stop()
    return x0, round(1000 * statistics.median(intervals), 4), len(intervals)


# ---------------------------------------------------------------------------------------------------- text
def _shown(value: float, bound: float, below: bool, digits: int = 1) -> str:
    """`value` with as many digits as it takes (from `digits`, at most 6) to read on the same side of `bound` as it
    is: 2.25 / 2.05 = 1.0976 is "1.098" next to a 1.10 bound, not "1.10"."""
    for d in range(digits, 7):
        text = f"{value:.{d}f}"
        if (float(text) < bound) == below:
            return text
    return f"{value:.6g}"


def _row_text(r: dict) -> str:
    ms = "failed" if r.get("ms_per_step") is None else f"{r['ms_per_step']:8.2f} ms/step"
    if r.get("note") == "reference":
        check = "reference"
    elif r.get("error"):
        check = f"error: {r['error']}"
    elif str(r.get("note", "")).startswith("dropped"):
        check = r["note"]
    else:
        ok = r.get("psnr_db") is None or r["psnr_db"] >= r["min_psnr_db"]
        shown = "identical" if r.get("psnr_db") is None else f"{_shown(r['psnr_db'], r['min_psnr_db'], not ok)} dB"
        check = f"x_0 PSNR {shown} (>= {r['min_psnr_db']:.0f}: {'pass' if ok else 'FAIL'})"
        if r.get("check"):
            check += f", {r['check']}"
        check += f": {'pass' if r['verified'] else 'FAIL'}"
    return f"{r['candidate']:<22s} {ms:>16s}  {check}"
