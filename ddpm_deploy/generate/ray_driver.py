"""Bulk generation on Ray: N images in shards over Ray actors (one runtime each), resumable after a kill.

Image i of the job is always the image of seed stream `default_rng([seed, i])` (`ddpm_deploy.sampling.noise`), so any
shard can be recomputed alone and equals the same indices of `ddpm-deploy run -n N --seed S` (bit for bit when
--shard-size is a multiple of the engine's max batch, so the engine sees the same batches). The job's folder, its
records and their checks are `generate.job`'s; this module renders the shards and is the only writer.
Ray is imported only where a job runs (`require_ray`): checking or loading a finished job needs no Ray.
"""

from __future__ import annotations

import time

import numpy as np

from ..errors import UserError, first_line, remote_cause
from ..sampling.noise import run_chunked
from ..app.opener import open_pipeline
from .job import JOB_FILE, GenerateSpec, JobFolder, check_folder, load_images, open_job
from ..serve.service import fixed_backend

RAY_MISSING = "generate needs Ray: pip install 'ddpm-deploy[serve]'"


def render_shard(pipe, plan, spec: GenerateSpec, s: int) -> np.ndarray:
    """Images of shard s: chunks of the engine's max batch, each image from its own seed stream."""
    start, count = spec.shard_range(s)
    return run_chunked(lambda noise: pipe.backend.run_chain(noise, plan), pipe.image_shape, count,
                       pipe.backend.max_batch, start=start, seed=spec.seed)


class ShardWorker:
    """A Ray actor's state: one opened runtime, reused for every shard it renders, and the driver's plan (the one
    the job's identity hashed)."""

    def __init__(self, spec: GenerateSpec, threads: int, plan):
        self.spec, self.plan = spec, plan
        self.pipe = open_pipeline(spec.engine, spec.device, fixed_backend(spec.engine, spec.backend), None, threads)

    def render(self, s: int) -> tuple[int, np.ndarray]:
        return s, render_shard(self.pipe, self.plan, self.spec, s)


# -- running a job -------------------------------------------------------------------------------------------------

def require_ray():
    """The ray module, or one line saying how to install it: checked before anything is written."""
    try:
        import ray
    except ImportError:
        raise UserError(RAY_MISSING) from None
    return ray


def generate_on_ray(spec: GenerateSpec, out: str, address: str | None = None, workers: int | None = None,
                    echo=print) -> dict:
    """Render every shard not yet done in OUT on Ray; returns {"computed": [...], "skipped": n, "seconds": s}."""
    ray = require_ray()
    with open_job(spec, out, echo) as (job, adopted):
        todo = job.todo
        echo(f"{job.spec.n} images in {job.spec.shards} shards of {job.spec.shard_size}: {len(job.done)} done"
             f"{f' ({adopted} adopted)' if adopted else ''}, {len(todo)} to go")
        t0 = time.perf_counter()
        computed = _run_shards(ray, job, todo, address, workers, echo) if todo else []
        seconds = time.perf_counter() - t0
    echo(f"done: {job.spec.n} images in {job.out} ({len(computed)} shards computed in {seconds:.1f}s)")
    return {"computed": computed, "skipped": job.spec.shards - len(computed), "seconds": seconds}


def _run_shards(ray, job: JobFolder, todo, address, workers, echo) -> list[int]:
    from ray.util import ActorPool

    spec = job.spec
    started = not ray.is_initialized()
    if started:
        try:
            if address:
                ray.init(address=address, logging_level="ERROR")
            else:
                ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
        except Exception as e:  # noqa: BLE001 - a bad address or a cluster that is down: one line
            raise UserError(f"cannot start/join Ray{f' at {address}' if address else ''}: {first_line(e)}") \
                from None
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        n_workers = max(1, min(workers or cpus, len(todo)))
        # one CPU per actor, and one runtime thread per CPU unless told otherwise (no oversubscription)
        actor = ray.remote(num_cpus=1)(ShardWorker)
        pool = ActorPool([actor.remote(spec, spec.threads or 1, job.plan) for _ in range(n_workers)])
        echo(f"ray: {n_workers} worker(s) on {cpus} CPU(s)")
        computed = []
        results = pool.map_unordered(lambda a, s: a.render.remote(s), todo)
        while True:
            try:
                s, x = next(results)
            except StopIteration:
                break
            except Exception as e:  # noqa: BLE001 - a shard failed (e.g. non-finite eps): done shards are kept
                raise UserError(f"a shard failed (finished shards are kept; rerun to resume): {remote_cause(e)}") \
                    from None
            job.store(s, x)
            computed.append(s)
            echo(f"shard {s} done ({len(job.done)}/{spec.shards})")
        return computed
    finally:
        if started:
            ray.shutdown()


__all__ = ["GenerateSpec", "generate_on_ray", "render_shard", "load_images", "check_folder", "open_job", "JOB_FILE"]
