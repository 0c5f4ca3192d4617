"""Step-level (continuous) batching: one engine call advances images of many requests, each at its own step.

Each image of a request is one row with its own state (x_t, hist, its step index k, its noise stream
`default_rng([seed, i])` via `ChunkNoise`). The rows being served are row slots of the backend's own state memory
(`ddpm_deploy.loop.run.DeviceSteps`: a GPU's buffers on TensorRT, the bound host buffers of the fused CPU backends):
a row joins by writing its x_T into a free slot and stays there between steps, every step uploads only each slot's
t, coefficient row (of its own request's plan: the fused step takes one per image) and z, and a finished row is read
back. A worker thread loops: pick this step's rows (below), place them in slots 0..n-1, run one fused step through
the loop's rows, and retire rows whose chain ended. A request's images therefore depend only on its own seed and
settings, never on its batch-mates or on when its rows ran (up to the network's own batch-size rounding,
`tolerances.SERVE_BATCHING_X0_ATOL`), and equal `run`'s, which drives the same step.

Sharing policy (`batching="step"`): round-robin over requests at every step. The `max_batch` rows of an engine call
are dealt one per live request in turn (requests with no rows left drop out of the deal) until the batch is full,
starting each step where the previous step's first round stopped, so with more requests than rows every request
still advances every ceil(requests / max_batch) steps. Each request is thus served like processor sharing: a 5-step
request behind an n=64, 1000-step one gets a row on every step and finishes in ~5 engine calls, not after the long
one's waves; no request starves, however many short ones arrive. Within a request, rows already started advance
first (so it holds at most as many half-done rows as its largest share); a started row that gets no slot on a step
keeps its state and resumes later, which changes nothing in its result (its noise stream is indexed by step): it is
read back to the host when it loses its slot and written back when it gets one (only when the deal changes who
runs, never on a step where the same rows run on).

Budget: `max_queued_rows` bounds the rows of live requests not yet finished (started or not). A request whose
client gave up (`cancel`) or that failed leaves the deal and returns its budget at once; its rows are dropped at the
next step boundary (the engine call in flight is not interrupted).
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import threading
import time

import numpy as np

from ..loop.checks import check_plan, nonfinite_step
from ..errors import first_line
from ..fused_io import N_COEFS
from ..loop.run import Backend, advance
from ..sampling.noise import ChunkNoise
from ..sampling.plan import SamplingPlan


# "step": requests join and leave the running batch at any step (continuous batching). "request": one request at a
# time, its rows batched together (what a plain `load().sample` server does): the load test's baseline.
BATCHING = ("step", "request")


class Job:
    """One request: n images under one plan. `future` resolves to float32 x_0 (n, C, H, W) or an exception.

    Its rows: `started` (in progress, in index order; the worker thread's), `next_i` (the next row to start),
    `done` (finished rows)."""

    _ids = itertools.count()

    def __init__(self, n: int, seed: int, plan: SamplingPlan, shape: tuple):
        self.id, self.n, self.seed, self.plan = next(Job._ids), n, seed, plan
        self.x0 = np.empty((n, *shape), dtype=np.float32)
        self.done = 0
        self.next_i = 0
        self.started: list[_Row] = []
        self.cancelled = False
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.submitted = time.perf_counter()
        self.calls_at_submit = 0   # the batcher's engine-call count when the job was queued
        self.engine_calls = 0      # engine calls from queueing to the last step: what a client waited for

    @property
    def finished(self) -> bool:
        return self.cancelled or self.future.done()

    @property
    def rows_left(self) -> int:
        """Rows not finished yet (started or not): what the request holds of the queue budget."""
        return self.n - self.done


class _Row:
    """Image i of a job: its next step index k, noise stream (x_T drawn when it starts, z_k per step) and, while it
    holds no slot, its state on the host (x_t, hist; hist None: zeros)."""

    __slots__ = ("job", "i", "k", "x_t", "noise", "hist")

    def __init__(self, job: Job, i: int, shape: tuple):
        self.job, self.i, self.k = job, i, 0
        self.noise = ChunkNoise(shape, i, 1, seed=job.seed)   # stream default_rng([seed, i]), as `run` uses
        self.x_t, self.hist = self.noise.x_T, None


class StepBatcher:
    """Owns the backend's engine calls from one worker thread. `submit` queues a job; `cancel` takes it out of the
    deal at once (its rows leave at the next step boundary); `close` stops the worker and fails what is left."""

    def __init__(self, backend: Backend, max_batch: int | None = None, max_queued_rows: int = 4096,
                 batching: str = "step"):
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}, got {batching!r}")
        self.backend, self.dev = backend, backend.steps
        self.batching = batching
        self.shape = backend.manifest.image_shape
        self.max_batch = min(max_batch or backend.max_batch, backend.max_batch)
        self._slots: list[_Row] = []   # slot i of the device's state holds this row (the worker thread's)
        self.max_queued_rows = max_queued_rows
        self._jobs: list[Job] = []     # live requests; "step": in round-robin order, "request": in arrival order
        self._cond = threading.Condition()
        self._closed: str | None = None   # why the batcher stopped (None: running)
        self.counters = collections.Counter()
        # every batch size a step may take, opened once now: OpenVINO compiles a static-shape model per batch size
        # (about 0.7 s each for the shipped model, 2 cores), which would otherwise stall the first requests
        for batch in range(1, self.max_batch + 1):
            self.dev.open(batch)
        self._worker = threading.Thread(target=self._loop, name="ddpm-step-batcher", daemon=True)
        self._worker.start()

    # -- client side (any thread) ---------------------------------------------------------------------------------
    def submit(self, n: int, seed: int, plan: SamplingPlan) -> Job:
        check_plan(plan)  # a coefficient that is not finite in float32 is refused before the first step (UserError)
        job = Job(n, seed, plan, self.shape)
        with self._cond:
            if self._closed:
                raise ShuttingDownError(f"{self._closed}: retry later")
            held = sum(j.rows_left for j in self._jobs if not j.finished)
            if held + n > self.max_queued_rows:
                self.counters["refused_busy"] += 1
                raise BusyError(f"server busy: {held} images queued (limit {self.max_queued_rows}); retry later")
            job.calls_at_submit = self.counters["engine_calls"]
            self._jobs.append(job)
            self.counters["submitted"] += 1
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: the job leaves the deal and frees its budget now; rows in flight leave at the next
        step boundary."""
        with self._cond:
            if not job.future.done() and not job.cancelled:
                job.cancelled = True
                job.future.cancel()
                self.counters["cancelled"] += 1
            self._drop(job)

    def stats(self) -> dict:
        with self._cond:
            live = [j for j in self._jobs if not j.finished]
            return {"active_rows": sum(len(j.started) for j in live),
                    "queued_rows": sum(j.n - j.next_i for j in live), "live_requests": len(live),
                    "max_batch": self.max_batch, "max_queued_rows": self.max_queued_rows,
                    "engine_calls": self.counters["engine_calls"], "submitted": self.counters["submitted"],
                    "completed": self.counters["completed"], "cancelled": self.counters["cancelled"],
                    "failed": self.counters["failed"], "refused_busy": self.counters["refused_busy"]}

    def stop(self, reason: str = "server shutting down") -> None:
        """Stop without waiting (safe from an event loop): every live job fails with ShuttingDownError(reason) at
        the next step boundary, and later submits are refused."""
        with self._cond:
            self._closed = self._closed or reason
            self._cond.notify()

    def close(self) -> None:
        self.stop()
        self._worker.join(timeout=30)

    # -- worker thread ---------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                rows = self._select()
                while not rows and not self._closed:
                    self._cond.wait()
                    rows = self._select()
                if self._closed:
                    self._fail_all(ShuttingDownError(self._closed))
                    return
            self._advance(rows)

    def _select(self) -> list[_Row]:
        """This step's rows (the policy in the module docstring). Holds the lock."""
        self._jobs = [j for j in self._jobs if not j.finished]
        if not self._jobs:
            return []
        if self.batching == "request":   # the baseline: the oldest request alone, in waves of max_batch rows
            job = self._jobs[0]
            return self._rows_of(job, min(self.max_batch, job.rows_left) if not job.started else len(job.started))
        share = {j.id: 0 for j in self._jobs}
        taken, dealt = 0, True
        while taken < self.max_batch and dealt:     # deal one row per request in turn until the batch is full
            dealt = False
            for j in self._jobs:
                if taken == self.max_batch:
                    break
                if share[j.id] < j.rows_left:
                    share[j.id] += 1
                    taken += 1
                    dealt = True
        first_round = min(self.max_batch, len(self._jobs))
        rows = [r for j in self._jobs for r in self._rows_of(j, share[j.id])]
        self._jobs = self._jobs[first_round:] + self._jobs[:first_round]   # next step's deal starts after them
        return rows

    def _rows_of(self, job: Job, m: int) -> list[_Row]:
        """m rows of `job`: started ones first, then new ones (x_T drawn now)."""
        while len(job.started) < m and job.next_i < job.n:
            job.started.append(_Row(job, job.next_i, self.shape))
            job.next_i += 1
        return job.started[:m]

    def _advance(self, rows: list[_Row]) -> None:
        """One fused step over `rows` in slots 0..n-1, each with its own job's t, plan row and z."""
        try:
            rows = self._place(rows)  # in slot order now
            t = [r.job.plan.timesteps[r.k] for r in rows]
            flags = advance(self.dev, t, np.stack([_coef_row(r) for r in rows]),
                            np.concatenate([r.noise.z(r.k) for r in rows]), self.backend.engine_time)
        except Exception as e:  # the engine call itself failed: every job in this batch fails, the server goes on
            held, self._slots = rows + self._slots, []  # what the device holds is unknown now: those jobs fail
            for job in {r.job for r in held}:
                self._fail(job, RuntimeError(f"backend {self.backend.name} failed: {first_line(e)}"))
            return
        self.counters["engine_calls"] += 1
        for s, r in enumerate(rows):
            r.k += 1
            if flags[s] != 0 and not r.job.finished:
                k = r.k - 1
                self._fail(r.job, nonfinite_step(k, int(r.job.plan.timesteps[k]), self.backend.name, [r.i]))
        done = [(s, r) for s, r in enumerate(rows) if r.k == r.job.plan.steps and not r.job.finished]
        for s, r in done:
            self._finish_row(r, self.dev.read_state(s, s + 1)[0][0])

    def _place(self, rows: list[_Row]) -> list[_Row]:
        """Slots 0..len(rows)-1 hold `rows` after this (returned in slot order). A row already in one of them stays
        put; a resident row of a live job that does not run this step (or sits past the new batch) goes to the
        host; rows not resident are written into the free slots."""
        n = len(rows)
        where = {id(r): s for s, r in enumerate(self._slots)}
        stay = {id(r) for r in rows if where.get(id(r), n) < n}
        for s, r in enumerate(self._slots):  # read back before any write: their slots may be reused below
            if id(r) not in stay and not r.job.finished and r.k < r.job.plan.steps:
                r.x_t, r.hist = self.dev.read_state(s, s + 1)
        slots: list = [None] * n
        for r in rows:
            if id(r) in stay:
                slots[where[id(r)]] = r
        self.dev.open(n)
        free = (s for s in range(n) if slots[s] is None)
        for r in rows:
            if id(r) not in stay:
                s = next(free)
                self.dev.write_state(s, r.x_t, r.hist)
                r.x_t = r.hist = None
                slots[s] = r
        self._slots = slots
        return slots

    def _finish_row(self, row: _Row, x0: np.ndarray) -> None:
        job = row.job
        job.x0[row.i] = x0
        with self._cond:
            job.done += 1
            job.started.remove(row)
            if job.done == job.n and not job.finished:
                job.engine_calls = self.counters["engine_calls"] - job.calls_at_submit
                job.future.set_result(job.x0)
                self.counters["completed"] += 1
                self._drop(job)

    def _fail(self, job: Job, error: Exception) -> None:
        with self._cond:
            if not job.finished:
                job.future.set_exception(error)
                self.counters["failed"] += 1
            self._drop(job)

    def _drop(self, job: Job) -> None:
        """The job leaves the deal (its budget is free now). Holds the lock."""
        if job in self._jobs:
            self._jobs.remove(job)

    def _fail_all(self, error: Exception) -> None:
        for job in self._jobs:
            if not job.finished:
                job.future.set_exception(error)
                self.counters["failed"] += 1
        self._jobs = []


def _coef_row(row: _Row) -> np.ndarray:
    """The row's plan row at its step (N_COEFS,) float32; per-image plans give image i's."""
    coefs = row.job.plan.coefs[row.k]
    return np.asarray(coefs if coefs.ndim == 1 else coefs[row.i], np.float32).reshape(N_COEFS)


class BusyError(RuntimeError):
    """Too many images queued, or the server is stopping; the client should retry later (HTTP 503)."""


class ShuttingDownError(BusyError):
    """The server is draining (SIGTERM): refused or failed with this reason (HTTP 503)."""
