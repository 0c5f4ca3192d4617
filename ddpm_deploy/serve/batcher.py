"""Step-level (continuous) batching: one engine call advances images of many requests, each at its own step.

Each image of a request is one row with its own state (x_t, its step index k, its noise stream
`default_rng([seed, i])` via `ChunkNoise`). A worker thread loops: admit queued rows into free slots (a request
joins at any step boundary), call the network once on every active row with t per row, then step each request's
rows with that request's plan row (the numpy step is elementwise, so grouping rows by request changes nothing), and
retire rows whose chain ended. A request's images therefore depend only on its own seed and settings, never on its
batch-mates (up to the network's own batch-size rounding, `tolerances.SERVE_BATCHING_X0_ATOL`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import threading
import time

import numpy as np

from ..chain import Backend
from ..errors import NonFiniteError, first_line
from ..noise import ChunkNoise
from ..samplers import N_HIST, SamplingPlan, step, step_with_history


# "step": requests join and leave the running batch at any step (continuous batching). "request": one request at a
# time, its rows batched together (what a plain `load().sample` server does): the load test's baseline.
BATCHING = ("step", "request")


class Job:
    """One request: n images under one plan. `future` resolves to float32 x_0 (n, C, H, W) or an exception."""

    _ids = itertools.count()

    def __init__(self, n: int, seed: int, plan: SamplingPlan, shape: tuple):
        self.id, self.n, self.seed, self.plan = next(Job._ids), n, seed, plan
        self.x0 = np.empty((n, *shape), dtype=np.float32)
        self.done = 0
        self.cancelled = False
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.submitted = time.perf_counter()

    @property
    def finished(self) -> bool:
        return self.cancelled or self.future.done()


class _Row:
    """Image i of a job: its x_t, next step index k and noise stream (x_T drawn on admission, z_k per step)."""

    __slots__ = ("job", "i", "k", "x_t", "noise", "hist")

    def __init__(self, job: Job, i: int, shape: tuple):
        self.job, self.i, self.k = job, i, 0
        self.noise = ChunkNoise(shape, i, 1, seed=job.seed)   # stream default_rng([seed, i]), as `run` uses
        self.x_t = self.noise.x_T[0]
        self.hist = None                                       # multistep plans: [last_sample, m_1, m_2, m_3]
        if job.plan.uses_history:
            self.hist = np.zeros((N_HIST, *shape), dtype=np.float32)


class StepBatcher:
    """Owns the backend's engine calls from one worker thread. `submit` queues a job; `cancel` drops its rows at
    the next step boundary; `close` stops the worker and fails what is still queued."""

    def __init__(self, backend: Backend, max_batch: int | None = None, max_queued_rows: int = 4096,
                 batching: str = "step"):
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}, got {batching!r}")
        self.backend = backend
        self.batching = batching
        self.shape = backend.manifest.image_shape
        self.max_batch = max_batch or backend.max_batch
        self.max_queued_rows = max_queued_rows
        self._queue: collections.deque = collections.deque()   # (job, i) not yet admitted
        self._active: list[_Row] = []
        self._cond = threading.Condition()
        self._closed = False
        self.counters = collections.Counter()
        self._worker = threading.Thread(target=self._loop, name="ddpm-step-batcher", daemon=True)
        self._worker.start()

    # -- client side (any thread) ---------------------------------------------------------------------------------
    def submit(self, n: int, seed: int, plan: SamplingPlan) -> Job:
        job = Job(n, seed, plan, self.shape)
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if len(self._queue) + n > self.max_queued_rows:
                raise BusyError(f"server busy: {len(self._queue)} images queued (limit {self.max_queued_rows}); "
                                "retry later")
            self._queue.extend((job, i) for i in range(n))
            self.counters["submitted"] += 1
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: its rows leave at the next step boundary (queued rows are skipped)."""
        with self._cond:
            if not job.future.done() and not job.cancelled:
                job.cancelled = True
                job.future.cancel()
                self.counters["cancelled"] += 1

    def stats(self) -> dict:
        with self._cond:
            queued = sum(1 for job, _ in self._queue if not job.cancelled)
            return {"active_rows": len(self._active), "queued_rows": queued, "max_batch": self.max_batch,
                    "engine_calls": self.counters["engine_calls"], "submitted": self.counters["submitted"],
                    "completed": self.counters["completed"], "cancelled": self.counters["cancelled"],
                    "failed": self.counters["failed"]}

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._worker.join(timeout=30)

    # -- worker thread ---------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                self._admit()
                while not self._active and not self._closed:
                    self._cond.wait()
                    self._admit()
                if self._closed:
                    self._fail_all(RuntimeError("server shutting down"))
                    return
                rows = list(self._active)
            self._advance(rows)

    def _admit(self) -> None:
        """Drop rows of cancelled jobs, then fill free slots from the queue (FIFO). Holds the lock."""
        self._active = [r for r in self._active if not r.job.finished]
        if self.batching == "request" and self._active:
            return   # the baseline: the running request's chain finishes before anything joins
        while self._queue and len(self._active) < self.max_batch:
            job, i = self._queue[0]
            if self.batching == "request" and self._active and job is not self._active[0].job:
                break
            self._queue.popleft()
            if not job.finished:
                self._active.append(_Row(job, i, self.shape))

    def _advance(self, rows: list[_Row]) -> None:
        """One engine call over all rows (t per row), then each job's rows step with that job's plan row."""
        x_t = np.stack([r.x_t for r in rows])
        t = np.array([r.job.plan.timesteps[r.k] for r in rows], dtype=np.float32)
        try:
            out = self.backend.eps_batched(x_t, t)
        except Exception as e:  # the engine call itself failed: every job in this batch fails, the server goes on
            for job in {r.job for r in rows}:
                self._fail(job, RuntimeError(f"backend {self.backend.name} failed: {first_line(e)}"))
            return
        self.counters["engine_calls"] += 1
        finite = np.isfinite(out.reshape(len(rows), -1)).all(axis=1)
        groups: dict = collections.defaultdict(list)
        for j, r in enumerate(rows):
            groups[(r.job.id, r.k)].append(j)
        for idx in groups.values():
            job, k = rows[idx[0]].job, rows[idx[0]].k
            if job.finished:
                continue
            if not finite[idx].all():
                t_k = int(job.plan.timesteps[k])
                self._fail(job, NonFiniteError(f"non-finite eps at step {k} (t={t_k}) on backend "
                                               f"{self.backend.name}: the engine overflowed for this request"))
                continue
            z = np.concatenate([rows[j].noise.z(k) for j in idx])
            if rows[idx[0]].hist is None:
                x_prev, h_out = step(x_t[idx], out[idx], z, job.plan.coefs[k]), [None] * len(idx)
            else:   # multistep samplers carry each row's history, exactly as Backend.run_chain does
                hist = np.stack([rows[j].hist for j in idx])
                x_prev, h_out = step_with_history(x_t[idx], out[idx], z, job.plan.coefs[k], hist)
            for x, h, j in zip(x_prev, h_out, idx):
                self._finish_step(rows[j], x, h)

    def _finish_step(self, row: _Row, x_prev: np.ndarray, hist) -> None:
        row.x_t, row.hist, row.k = x_prev, hist, row.k + 1
        job = row.job
        if row.k < job.plan.steps:
            return
        job.x0[row.i] = x_prev
        job.done += 1
        if job.done == job.n:
            with self._cond:
                if not job.finished:
                    job.future.set_result(job.x0)
                    self.counters["completed"] += 1
        with self._cond:
            self._active = [r for r in self._active if r is not row]

    def _fail(self, job: Job, error: Exception) -> None:
        with self._cond:
            if not job.finished:
                job.future.set_exception(error)
                self.counters["failed"] += 1

    def _fail_all(self, error: Exception) -> None:
        for job in {job for job, _ in self._queue} | {r.job for r in self._active}:
            if not job.finished:
                job.future.set_exception(error)
        self._queue.clear()
        self._active = []


class BusyError(RuntimeError):
    """Too many images queued; the client should retry later (HTTP 503)."""
