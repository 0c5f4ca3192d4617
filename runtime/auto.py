"""Backend auto: the fastest verified CPU path for an .onnx file on this machine, measured once and cached.

On first use for a (model, CPU, library versions) it opens every available CPU candidate — onnxruntime fp32 at
1 and all usable threads, OpenVINO fp32 (not bf16: see backend_registry) — runs the same short stochastic
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

This module chooses, caches and explains; the check and timing of each candidate live in runtime/auto_check.py.
The candidates are the backend registry's `auto` entries (ddpm_deploy.backend_registry). Its local imports are the
candidates' libraries (onnxruntime, and OpenVINO through its backend module, which imports onnx): only when asked.
"""


from __future__ import annotations

import hashlib
import importlib
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from .. import __version__, fused_io
from .. import backend_registry as registry
from ..artifact.manifest import Manifest
from ..backend_registry import usable_cores
from ..errors import UserError, first_line
from ..files import model_sha256, write_text_atomic
from .auto_check import CHECK_SAMPLER, Candidate, _row_text, _shown, confirm, measure

CACHE_FORMAT = 4  # bump when measurements change meaning (2: fused CPU step, 3: its nonfinite output, 4: no bf16)
# A reduced-precision candidate (bf16) is chosen only when it beats the fastest fp32 one by this factor: closer
# than that is within run-to-run noise on a shared machine, and fp32 keeps the exported numerics exactly.
REDUCED_MIN_GAIN = 1.10


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


# ---------------------------------------------------------------------------------------------------- facts
def cache_folder() -> Path:
    """$XDG_CACHE_HOME/ddpm-deploy/auto, default ~/.cache/ddpm-deploy/auto."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ddpm-deploy" / "auto"


def machine_facts() -> dict:
    """What identifies this CPU for speed: model name, a hash of its feature flags, the cores we may use."""
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
    """Versions whose kernels are being timed (a new one may be faster or slower: measure again): the reference's
    library as imported (onnxruntime or onnxruntime-gpu own the module), the other candidates' as installed."""
    reference, *others = registry.entries(auto=True)
    versions = {"ddpm_deploy": __version__, "numpy": np.__version__,
                reference.library: importlib.import_module(reference.library).__version__}
    for entry in others:
        if entry.available():
            try:
                versions[entry.library] = version(entry.library)
            except PackageNotFoundError:
                versions[entry.library] = "?"
    return versions


def openvino_available() -> bool:
    return registry.get("openvino").available()


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
    """Every CPU configuration worth timing here, from the registry's auto entries; the first is the reference
    (onnxruntime fp32, all threads). A backend that picks its own compute precision (OpenVINO: fp32 / bf16) is
    timed on fp32 files only: it would compute an fp16 export in f32 or bf16, which is not the precision the user
    exported; only the precisions its registry entry lets auto time (`auto_precisions`: OpenVINO fp32, not bf16)
    are timed, one it offers only where the CPU has it only there. `threads` above the
    usable cores is capped at them."""
    counts = [min(threads, usable_cores())] if threads else sorted({usable_cores(), 1}, reverse=True)
    reference, *others = registry.entries(auto=True)
    out = [Candidate(reference.name, "fp32", n) for n in counts]
    for entry in others:
        if (entry.precisions and dtype != "float32") or not entry.available():
            continue
        for precision in entry.auto_precisions or entry.precisions or ("fp32",):
            if precision not in entry.cpu_checked or _cpu_supports(precision):
                out += [Candidate(entry.name, precision, n) for n in counts]
    return out


def _cpu_supports(precision: str) -> bool:
    """Whether this CPU computes `precision` natively (bf16: asked through OpenVINO, the library that uses it)."""
    return precision == "bf16" and _cpu_has_bf16()


def _cpu_has_bf16() -> bool:
    from .backends.openvino_backend import (  # imports onnx: only when asked
        device_supports_bf16,
        import_openvino,
    )

    try:
        return device_supports_bf16(import_openvino().Core(), "CPU")
    except Exception:  # an OpenVINO that cannot see the CPU: no bf16 candidate
        return False


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
        choice = Choice(c["backend"], c["precision"], c["threads"], c["reason"], _checked_table(data["table"]),
                        cached=True, cache_file=str(file), key=key)
        choice.table_text   # what `run` and `bench` print from it: any row it cannot show is a bad file now
        return choice
    # RecursionError: JSON nested thousands deep (json.loads recurses)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        echo(f"warning: ignoring the backend auto cache file {file} ({first_line(e, 120)}); measuring again")
        return None


def _check_cached(c: dict) -> None:
    """Refuse (ValueError) a cached choice auto could not have made here: a file edited by hand or by another tool
    would otherwise break every run (backend "torch") or start thousands of threads."""
    if c.get("backend") not in registry.names(auto=True):
        raise ValueError(f"backend {c.get('backend')!r} is not a CPU candidate")
    if c.get("precision") not in (registry.get(c["backend"]).precisions or ("fp32",)):
        raise ValueError(f"precision {c.get('precision')!r} is not a candidate's on {c['backend']}")
    n = c.get("threads")
    if type(n) is not int or not 1 <= n <= usable_cores():
        raise ValueError(f"threads {n!r} is not between 1 and the {usable_cores()} usable cores")
    if not isinstance(c.get("reason"), str):
        raise ValueError("reason is not a string")


_NUMBER = (int, float)
# a table row's fields as `measure` and `confirm` write them: (types, required); None allowed where listed
_ROW_FIELDS = {"candidate": ((str,), True), "backend": ((str,), True), "precision": ((str,), True),
               "threads": ((int,), True), "verified": ((bool,), True), "ms_per_step": ((*_NUMBER, type(None)), True),
               "psnr_db": ((*_NUMBER, type(None)), False), "min_psnr_db": ((*_NUMBER, type(None)), False),
               "path": ((str, type(None)), False), "note": ((str,), False), "error": ((str,), False),
               "check": ((str,), False), "warmup_s": (_NUMBER, False), "steps_timed": ((int,), False),
               "check_steps": ((int,), False), "ms_per_step_turns": ((list,), False)}
_MAX_ROWS = 64   # candidates: a few backends x precisions x 2 thread counts


def _checked_table(table) -> list:
    """The cached table of candidates, refused (ValueError) unless every row has the fields `measure` writes, of
    their types (numbers finite): `run` and `bench` print it, and a tampered row would be a TypeError there."""
    if not isinstance(table, list) or not 1 <= len(table) <= _MAX_ROWS:
        raise ValueError(f"table is not a list of 1 to {_MAX_ROWS} candidate rows")
    for i, row in enumerate(table):
        if not isinstance(row, dict):
            raise ValueError(f"table row {i} is not an object")
        for name, (types, required) in _ROW_FIELDS.items():
            if name not in row:
                if required:
                    raise ValueError(f"table row {i} has no {name!r}")
                continue
            v = row[name]
            bad_number = isinstance(v, float) and not np.isfinite(v)
            if isinstance(v, bool) is not (bool in types) or not isinstance(v, types) or bad_number:
                raise ValueError(f"table row {i}: {name} is {first_line(repr(v), 40)}")
    return table


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
# ---------------------------------------------------------------------------------------------------- text
def table_text(rows: list[dict], chosen: str) -> str:
    lines = ["backend auto: the CPU candidates it chose from (batch 1):"]
    lines += [("* " if r["candidate"] == chosen and not r.get("path") else "  ") + _row_text(r) for r in rows]
    return "\n".join(lines)


def _default_echo(msg: str) -> None:
    """Lines for a person watching (stderr is a terminal); scripts read `pipe.backend_choice` instead, and their
    own error messages stay the only thing on stderr."""
    if sys.stderr.isatty():
        print(msg, file=sys.stderr, flush=True)
