"""Backend auto: the fastest verified CPU path for an .onnx file on this machine, measured once and cached.

On first use for a (model, CPU, library versions) it opens every available CPU candidate — onnxruntime fp32 at
1 and all usable threads, OpenVINO fp32 and, where the CPU has it, OpenVINO bf16 — runs the same short stochastic
DDPM chain on each from the same noise, and times its steps (median step interval, engine + host loop, batch 1);
the two fastest get a second turn and keep their better figure.
A candidate is kept only if its final x_0 is within tolerance of onnxruntime fp32's (x-space PSNR,
ddpm_deploy.tolerances.AUTO_*) and its eps on the reference's states (teacher-forced, as verify does) is within what
verify's per-step bound allows at that t for every sampler (`eps_tolerance`), so what auto chooses passes verify's
per-step check whatever sampler then runs; the fastest kept one is chosen.
First use is budgeted: the check chain has fewer steps for a slow model (CHECK_BUDGET_S), a candidate clearly
slower than the best so far (DROP_SLOWER) is dropped after its warm-up or its first step intervals, the second turn
is only for a close race, and the expected duration is said before the candidates run. The choice and the whole table go to
$XDG_CACHE_HOME/ddpm-deploy/auto (default ~/.cache), one JSON file per key, so the next `run` starts at once.
A cache file that cannot be read is ignored with one warning line and written again.

The check runs a stochastic chain because a deterministic one amplifies rounding differences chaotically on
untrained weights, while ancestral sampling stays stable (the same reason verify's tests use it).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import __version__, fused_io
from ..errors import NonFiniteError, UserError, first_line
from ..files import model_sha256, write_text_atomic
from ..images import psnr
from ..tolerances import (AUTO_EPS_GAIN_ENVELOPE, AUTO_FP32_X0_MIN_PSNR_DB, AUTO_REDUCED_X0_MIN_PSNR_DB,
                          VERIFY_FP32_EPS_LEVEL, VERIFY_FP32_X_STEP_MAX_ABS, VERIFY_REDUCED_EPS_LEVEL,
                          VERIFY_REDUCED_X_STEP_MAX_ABS)

CACHE_FORMAT = 3          # bump when measurements change meaning (2: fused CPU step, 3: its nonfinite output)
CHECK_SAMPLER = "ddpm"
CHECK_STEPS = 8           # short chain: enough steps to carry per-step error into x_0, seconds even on 32x32
CHECK_STEPS_MIN = 3       # a slow (large) model's chain: still three states (t = T-1, mid, low) for the eps check
CHECK_BUDGET_S = 6.0      # ... fewer steps when CHECK_STEPS of the reference's warm-up step would take longer
WARMUP_STEPS = 1          # the first call allocates arenas / compiles kernels
DROP_SLOWER = 1.5         # clearly slower than the best so far (never chosen: REDUCED_MIN_GAIN and noise are ~1.1)
DROP_AFTER = 2            # ... judged after this many step intervals (and first on the warm-up step)
DROP_MIN_S = 0.5          # ... only when the rest of its check would take this long: below, timing noise of
                          # millisecond steps on a busy machine could drop the real winner for no saving
CONFIRM_WITHIN = 1.25     # a second turn only when the two fastest are this close (a race noise could flip)
ANNOUNCE_AFTER_S = 10.0   # an expected duration above this is also written to stderr off a terminal
MIN_TIMED_S = 0.3         # fast models: repeat the timed chain until this much was timed (at most MAX_CHAINS)
MAX_CHAINS = 5
SEED = 0
# A reduced-precision candidate (bf16) is chosen only when it beats the fastest fp32 one by this factor: closer
# than that is within run-to-run noise on a shared machine, and fp32 keeps the exported numerics exactly.
REDUCED_MIN_GAIN = 1.10


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
        if self.backend == "openvino":
            opts["precision"] = self.precision
        return opts


@dataclass
class Choice:
    """What auto picked, why, and the table it picked from (rows: one per candidate)."""

    backend: str
    precision: str
    threads: int
    reason: str
    table: list
    cached: bool = False
    cache_file: str = ""
    key: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.backend} {self.precision} {self.threads}t"

    def options(self) -> dict:
        return Candidate(self.backend, self.precision, self.threads).options()

    @property
    def table_text(self) -> str:
        return table_text(self.table, self.label)

    def to_dict(self) -> dict:
        return {**asdict(self), "table_text": self.table_text}


# ---------------------------------------------------------------------------------------------------- facts
def cache_folder() -> Path:
    """$XDG_CACHE_HOME/ddpm-deploy/auto, default ~/.cache/ddpm-deploy/auto."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ddpm-deploy" / "auto"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def machine_facts() -> dict:
    """What identifies this CPU for speed: model name, a hash of its feature flags, the cores we may use."""
    import platform

    name, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo") as f:
            # keys are padded with tabs ("model name\t: ..."): strip them, else nothing matches and every CPU
            # looks the same to the cache
            info = {}
            for line in f:
                k, _, value = line.partition(":")
                if k.strip() in ("model name", "flags"):
                    info.setdefault(k.strip(), value)
        name, flags = info.get("model name", name).strip(), info.get("flags", "").strip()
    except OSError:
        pass
    return {"cpu": name, "flags_sha256": hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:16],
            "cores": usable_cores()}


def library_versions() -> dict:
    """Versions whose kernels are being timed (a new one may be faster or slower: measure again)."""
    import numpy
    import onnxruntime

    versions = {"ddpm_deploy": __version__, "numpy": numpy.__version__, "onnxruntime": onnxruntime.__version__}
    if openvino_available():
        from importlib.metadata import PackageNotFoundError, version

        try:
            versions["openvino"] = version("openvino")
        except PackageNotFoundError:
            versions["openvino"] = "?"
    return versions


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def cache_key(model_sha256: str, threads: int | None, machine: dict | None = None,
              versions: dict | None = None) -> dict:
    return {"format": CACHE_FORMAT, "fused_interface": fused_io.FUSED_INTERFACE_VERSION,  # what the CPU loops run
            "model_sha256": model_sha256, "threads": threads,
            "machine": machine if machine is not None else machine_facts(),
            "versions": versions if versions is not None else library_versions()}


def cache_path(key: dict, folder: Path | None = None) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return Path(folder or cache_folder()) / f"{digest}.json"


# ---------------------------------------------------------------------------------------------------- candidates
def candidates(dtype: str, threads: int | None = None) -> list[Candidate]:
    """Every CPU configuration worth timing here; the first is the reference (onnxruntime fp32, all threads).
    A reduced-precision file (fp16 ONNX) runs on onnxruntime only: OpenVINO would compute it in f32 or bf16,
    which is not the precision the user exported. `threads` above the usable cores is capped at them."""
    counts = [min(threads, usable_cores())] if threads else sorted({usable_cores(), 1}, reverse=True)
    out = [Candidate("onnxruntime", "fp32", n) for n in counts]
    if dtype != "float32" or not openvino_available():
        return out
    out += [Candidate("openvino", "fp32", n) for n in counts]
    if _cpu_has_bf16():
        out += [Candidate("openvino", "bf16", n) for n in counts]
    return out


def _cpu_has_bf16() -> bool:
    from .backends.openvino_backend import device_supports_bf16, import_openvino

    try:
        return device_supports_bf16(import_openvino().Core(), "CPU")
    except Exception:  # an OpenVINO that cannot see the CPU: no bf16 candidate
        return False


def min_psnr(candidate: Candidate) -> float:
    return AUTO_FP32_X0_MIN_PSNR_DB if candidate.precision == "fp32" else AUTO_REDUCED_X0_MIN_PSNR_DB


def eps_tolerance(alpha_bar_t: float, precision: str) -> float:
    """The largest eps error at a timestep with cumulative alpha `alpha_bar_t` that passes verify's per-step check
    for every sampler. Verify bounds a step's x_{t-1} error by max(floor, eps_level x G), G the step's eps gain
    (verify.step_bounds, samplers.eps_gain), and every step evaluated at t has G <= AUTO_EPS_GAIN_ENVELOPE x
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
    import numpy as np

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
    """A Pipeline on one candidate (not through runtime.load, which imports this module: no cycle)."""
    from ..manifest import kind_of
    from .backends import open_backend
    from .pipeline import Pipeline

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


def pick(rows: list[dict]) -> dict:
    """The fastest verified row (never one that failed its check or did not run)."""
    ok = [r for r in rows if r.get("verified") and r.get("ms_per_step") is not None]
    if not ok:
        raise UserError("backend auto: no CPU candidate passed its check against onnxruntime fp32; name one with "
                        "--backend onnxruntime")
    best = min(ok, key=lambda r: r["ms_per_step"])
    full = [r for r in ok if r["precision"] == "fp32"]
    if best["precision"] != "fp32" and full:
        best_full = min(full, key=lambda r: r["ms_per_step"])
        if best_full["ms_per_step"] < REDUCED_MIN_GAIN * best["ms_per_step"]:
            return best_full
    return best


def _shown(value: float, bound: float, below: bool, digits: int = 1) -> str:
    """`value` with as many digits as it takes (from `digits`, at most 6) to read on the same side of `bound` as it
    is: 2.25 / 2.05 = 1.0976 is "1.098" next to a 1.10 bound, not "1.10"."""
    for d in range(digits, 7):
        text = f"{value:.{d}f}"
        if (float(text) < bound) == below:
            return text
    return f"{value:.6g}"


def reason(best: dict, rows: list[dict]) -> str:
    ref = rows[0]
    speed = ref["ms_per_step"] / best["ms_per_step"]
    verified = sum(1 for r in rows if r.get("verified"))
    why = (f"fastest of {verified} verified CPU candidates ({len(rows)} timed): {best['ms_per_step']:.2f} ms/step, "
           f"{speed:.2f}x {ref['candidate']}")
    if best is not ref:
        shown = ("identical" if best["psnr_db"] is None
                 else f"{_shown(best['psnr_db'], best['min_psnr_db'], below=False)} dB")
        why += f"; x_0 PSNR vs onnxruntime fp32 {shown} (needs >= {best['min_psnr_db']:.0f})"
    fastest = min((r for r in rows if r.get("verified") and r.get("ms_per_step")), key=lambda r: r["ms_per_step"])
    if fastest is not best:
        gain = best["ms_per_step"] / fastest["ms_per_step"]
        why = why.replace("fastest of", "fp32, the fastest full-precision of") + (
            f"; {fastest['candidate']} was only {_shown(gain, REDUCED_MIN_GAIN, below=True, digits=2)}x faster "
            f"(reduced precision needs >= {REDUCED_MIN_GAIN:.2f}x)")
    return why


# ---------------------------------------------------------------------------------------------------- choose
def choose(path: str, *, threads: int | None = None, echo=None, cache_dir: str | os.PathLike | None = None,
           machine: dict | None = None, versions: dict | None = None,
           cands: list[Candidate] | None = None) -> Choice:
    """The CPU backend to run `path` on: from the cache when this model, CPU and library versions were measured
    before, else measured now (and cached). `machine` / `versions` default to this machine's; `cands` to
    `candidates(...)` (tests give their own list)."""
    echo = _default_echo if echo is None else echo
    threads = min(threads, usable_cores()) if threads else threads  # load() refuses < 1 and says it capped
    if not Path(path).is_file():
        raise UserError(f"engine file {path} not found: export one with `ddpm-deploy export CHECKPOINT -o {path}`")
    key = cache_key(model_sha256(path), threads, machine, versions)  # external data included
    if cands is not None:
        key["candidates"] = [c.label + (f" @{c.path}" if c.path else "") for c in cands]
    file = cache_path(key, cache_dir)
    choice = _read_cache(file, key, echo)
    if choice is not None:
        echo(f"backend auto: {choice.label} (cached: {choice.reason})")
        return choice
    if cands is None:
        from ..manifest import Manifest

        cands = candidates(Manifest.read(path).dtype, threads)
    echo(f"backend auto: first use for {Path(path).name} on this machine: timing {len(cands)} CPU candidates "
         f"({CHECK_SAMPLER} check chain vs {cands[0].label})")
    rows = measure(path, cands, echo)
    confirm(path, cands, rows, echo)
    best = pick(rows)
    choice = Choice(best["backend"], best["precision"], best["threads"], reason(best, rows), rows,
                    cache_file=str(file), key=key)
    _write_cache(file, choice, echo)
    echo(f"backend auto: chose {choice.label}: {choice.reason}")
    return choice


def _read_cache(file: Path, key: dict, echo) -> Choice | None:
    if not file.exists():
        return None
    try:
        data = json.loads(file.read_text())
        if data.get("key") != key:
            raise ValueError("written for another model, CPU or library versions")
        c = data["choice"]
        _check_cached(c)
        return Choice(c["backend"], c["precision"], c["threads"], str(c["reason"]),
                      list(data["table"]), cached=True, cache_file=str(file), key=key)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        echo(f"warning: ignoring the backend auto cache file {file} ({first_line(e, 120)}); measuring again")
        return None


def _check_cached(c: dict) -> None:
    """Refuse (ValueError) a cached choice auto could not have made here: a file edited by hand or by another tool
    would otherwise break every run (backend "torch") or start thousands of threads."""
    if c.get("backend") not in ("onnxruntime", "openvino"):
        raise ValueError(f"backend {c.get('backend')!r} is not a CPU candidate")
    if c.get("precision") not in ("fp32", "bf16") or (c["precision"] == "bf16" and c["backend"] != "openvino"):
        raise ValueError(f"precision {c.get('precision')!r} is not a candidate's on {c['backend']}")
    n = c.get("threads")
    if type(n) is not int or not 1 <= n <= usable_cores():
        raise ValueError(f"threads {n!r} is not between 1 and the {usable_cores()} usable cores")


def _write_cache(file: Path, choice: Choice, echo) -> None:
    data = {"key": choice.key, "choice": {"backend": choice.backend, "precision": choice.precision,
                                          "threads": choice.threads, "reason": choice.reason},
            "table": choice.table, "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json.dumps(data, indent=1), file)
    except OSError as e:  # a read-only home still runs; it just measures again next time
        echo(f"warning: cannot write the backend auto cache {file} ({e.strerror}); the choice is not kept")


# ---------------------------------------------------------------------------------------------------- text
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


def table_text(rows: list[dict], chosen: str) -> str:
    lines = ["backend auto: the CPU candidates it chose from (batch 1):"]
    lines += [("* " if r["candidate"] == chosen and not r.get("path") else "  ") + _row_text(r) for r in rows]
    return "\n".join(lines)


def _default_echo(msg: str) -> None:
    """Lines for a person watching (stderr is a terminal); scripts read `pipe.backend_choice` instead, and their
    own error messages stay the only thing on stderr."""
    if sys.stderr.isatty():
        print(msg, file=sys.stderr, flush=True)
