"""Bulk generation on Ray: N images in shards over Ray actors (one runtime each), resumable after a kill.

Image i of the job is always the image of seed stream `default_rng([seed, i])` (`ddpm_deploy.noise`), so any
shard can be recomputed alone and equals the same indices of `ddpm-deploy run -n N --seed S` (bit for bit when
--shard-size is a multiple of the engine's max batch, so the engine sees the same batches).

OUT/ holds `shard-000000.npy` ... (float32 x_0 (count, C, H, W), images [s * shard_size, ...)) and `generate.json`,
which records the settings and the shards done. Only the driver writes, each file atomically (temp + rename), a
shard before the record that lists it: a killed job leaves whole shards, so running the same command again skips
what is done (a shard written but not yet recorded is checked and adopted) and computes only the rest.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError, first_line
from ..files import file_sha256, write_bytes_atomic, write_text_atomic
from ..samplers import DEFAULT_SAMPLER

JOB_FILE = "generate.json"
JOB_FORMAT = "ddpm-deploy/generate"


@dataclass(frozen=True)
class GenerateSpec:
    engine: str
    n: int
    seed: int = 0
    sampler: str = DEFAULT_SAMPLER
    steps: int | None = None
    eta: float = 0.0
    shard_size: int = 256
    device: str = "cpu"
    backend: str | None = None
    threads: int | None = None

    @property
    def shards(self) -> int:
        return -(-self.n // self.shard_size)

    def shard_range(self, s: int) -> tuple[int, int]:
        start = s * self.shard_size
        return start, min(self.shard_size, self.n - start)

    def identity(self, model_sha256: str, steps: int) -> dict:
        """What decides the images: a job folder only resumes a job with exactly these."""
        return {"model_sha256": model_sha256, "n": self.n, "seed": self.seed, "sampler": self.sampler,
                "steps": steps, "eta": self.eta, "shard_size": self.shard_size}


def shard_path(out: Path, s: int) -> Path:
    return out / f"shard-{s:06d}.npy"


def render_shard(pipe, plan, spec: GenerateSpec, s: int) -> np.ndarray:
    """Images of shard s: chunks of the engine's max batch, each image from its own seed stream."""
    from ..noise import ChunkNoise

    start, count = spec.shard_range(s)
    batch = pipe.backend.max_batch
    chunks = [pipe.backend.run_chain(ChunkNoise(pipe.image_shape, a, min(batch, start + count - a), seed=spec.seed),
                                     plan) for a in range(start, start + count, batch)]
    return np.concatenate(chunks)


class ShardWorker:
    """A Ray actor's state: one opened runtime and the plan, reused for every shard it renders."""

    def __init__(self, spec: GenerateSpec, threads: int):
        from ..pipelines import open_pipeline
        from .service import fixed_backend

        self.spec = spec
        self.pipe = open_pipeline(spec.engine, spec.device, fixed_backend(spec.engine, spec.backend), None, threads)
        self.plan = self.pipe.plan(spec.sampler, spec.steps, spec.eta)

    def render(self, s: int) -> tuple[int, np.ndarray]:
        return s, render_shard(self.pipe, self.plan, self.spec, s)


# -- the job record ---------------------------------------------------------------------------------------------

def _read_job(out: Path, identity: dict) -> set[int]:
    """Shards already done in OUT (empty for a new job); refuses a folder holding a different job."""
    path = out / JOB_FILE
    if not path.exists():
        return set()
    try:
        job = json.loads(path.read_text())
        assert job["format"] == JOB_FORMAT
        settings, done = job["settings"], {int(s) for s in job["done"]}
    except (ValueError, KeyError, TypeError, AssertionError):
        raise UserError(f"{path} is not a generate record: remove it or choose another --out") from None
    if settings != identity:
        diff = ", ".join(f"{k} {settings.get(k)!r} != {v!r}" for k, v in identity.items() if settings.get(k) != v)
        raise UserError(f"{out} holds a different generate job ({diff}): use the same settings to resume, "
                        "or another --out")
    return done


def _write_job(out: Path, identity: dict, spec: GenerateSpec, done: set[int]) -> None:
    record = {"format": JOB_FORMAT, "version": 1, "settings": identity, "engine": spec.engine,
              "shards": spec.shards, "done": sorted(done),
              "files": "shard-%06d.npy: float32 x_0 (count, C, H, W) of images [s * shard_size, ...)"}
    write_text_atomic(json.dumps(record, indent=1), out / JOB_FILE)


def _adopt_orphans(out: Path, spec: GenerateSpec, shape: tuple, done: set[int]) -> set[int]:
    """Shards written (atomically, so whole) but not recorded because the job died in between."""
    found = set()
    for s in range(spec.shards):
        path = shard_path(out, s)
        if s in done or not path.exists():
            continue
        try:
            x = np.load(path, allow_pickle=False)
        except (ValueError, OSError):
            continue
        if x.dtype == np.float32 and x.shape == (spec.shard_range(s)[1], *shape):
            found.add(s)
    return found


def _missing_recorded(out: Path, done: set[int]) -> set[int]:
    return {s for s in done if not shard_path(out, s).exists()}


def _npy_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


# -- the driver -------------------------------------------------------------------------------------------------

def generate_on_ray(spec: GenerateSpec, out: str, address: str | None = None, workers: int | None = None,
                    echo=print) -> dict:
    """Render every shard not yet done in OUT on Ray; returns {"computed": [...], "skipped": n, "seconds": s}."""
    from ..manifest import Manifest
    from ..samplers import make_plan

    engine = Path(spec.engine)
    if not engine.exists():
        raise UserError(f"engine {engine} not found: export one with `ddpm-deploy export`")
    spec = GenerateSpec(**{**asdict(spec), "engine": str(engine.resolve())})  # workers may run elsewhere
    manifest = Manifest.read(spec.engine)
    plan = make_plan(manifest.schedule, spec.sampler, spec.steps, spec.eta, **manifest.sampling_options)
    identity = spec.identity(file_sha256(spec.engine), plan.steps)
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    done = _read_job(outdir, identity)
    lost = _missing_recorded(outdir, done)
    if lost:
        echo(f"{len(lost)} recorded shard(s) are missing from {outdir}; computing them again")
        done -= lost
    adopted = _adopt_orphans(outdir, spec, manifest.image_shape, done)
    done |= adopted
    _write_job(outdir, identity, spec, done)
    todo = [s for s in range(spec.shards) if s not in done]
    echo(f"{spec.n} images in {spec.shards} shards of {spec.shard_size}: {len(done)} done"
         f"{f' ({len(adopted)} adopted)' if adopted else ''}, {len(todo)} to go")
    t0 = time.perf_counter()
    computed = _run_shards(spec, todo, outdir, identity, done, address, workers, echo) if todo else []
    seconds = time.perf_counter() - t0
    echo(f"done: {spec.n} images in {outdir} ({len(computed)} shards computed in {seconds:.1f}s)")
    return {"computed": computed, "skipped": spec.shards - len(computed), "seconds": seconds}


def _run_shards(spec, todo, outdir, identity, done, address, workers, echo) -> list[int]:
    try:
        import ray
        from ray.util import ActorPool
    except ImportError:
        raise UserError("generate needs Ray: pip install 'ddpm-deploy[serve]'") from None
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
        pool = ActorPool([actor.remote(spec, spec.threads or 1) for _ in range(n_workers)])
        echo(f"ray: {n_workers} worker(s) on {cpus} CPU(s)")
        computed = []
        results = pool.map_unordered(lambda a, s: a.render.remote(s), todo)
        while True:
            try:
                s, x = next(results)
            except StopIteration:
                break
            except Exception as e:  # noqa: BLE001 - a shard failed (e.g. non-finite eps): done shards are kept
                raise UserError(f"a shard failed (finished shards are kept; rerun to resume): {_cause(e)}") \
                    from None
            write_bytes_atomic(_npy_bytes(x), shard_path(outdir, s))   # the shard first, then the record
            done.add(s)
            _write_job(outdir, identity, spec, done)
            computed.append(s)
            echo(f"shard {s} done ({len(done)}/{spec.shards})")
        return computed
    finally:
        if started:
            ray.shutdown()


def _cause(e: Exception) -> str:
    cause = getattr(e, "cause", None)
    return first_line(cause if cause is not None else e)


def load_images(out: str) -> np.ndarray:
    """All images of a finished job in index order (float32 (N, C, H, W))."""
    outdir = Path(out)
    job = json.loads((outdir / JOB_FILE).read_text())
    if len(job["done"]) != job["shards"]:
        raise UserError(f"{outdir}: {len(job['done'])}/{job['shards']} shards done; run generate again to finish")
    return np.concatenate([np.load(shard_path(outdir, s), allow_pickle=False) for s in range(job["shards"])])


__all__ = ["GenerateSpec", "generate_on_ray", "render_shard", "load_images", "JOB_FILE"]
