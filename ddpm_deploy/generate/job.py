"""A generate job's folder: its record, its shard files and their integrity checks (no Ray needed here).

OUT/ holds `shard-000000.npy` ... (float32 x_0 (count, C, H, W), images [start, start + count)), beside each its
record `shard-000000.json` (the job key, the image range, the .npy's sha256), and `generate.json`: the job's
settings (its identity: the model's content hash, external data included, the sampler plan, seed, shapes) and the
shards done, each with its range and sha256. Only the driver (`generate.ray_driver`) writes, each file atomically and
durably (temp, fsync, rename, fsync the folder), a shard and its record before the job record lists it: a killed
job leaves whole shards. Opening a job again re-checks every shard it keeps (sha256, shape, dtype, finiteness),
adopts a shard written but not yet listed only when its own record names this job, and leaves the rest to compute;
any shard that fails is named in one line. `check_folder` (`ddpm-deploy generate --check OUT`) runs the same checks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..files import (folder_lock, model_sha256, npy_header, read_regular_file, sha256_bytes, write_bytes_atomic,
                     write_text_atomic)
from ..artifact.manifest import Manifest
from ..artifact.fields import MAX_CHANNELS, MAX_IMAGE_SIDE, shown
from ..sampling.spec import SamplerSpec, default_sampler, off_grid_warning
from ..sampling.plan import model_plan
from ..serve.service import fixed_backend

JOB_FILE = "generate.json"
JOB_LOCK = ".generate.lock"  # held by the driver writing the folder (open_job)
JOB_FORMAT = "ddpm-deploy/generate"
JOB_VERSION = 2          # 1: no identity beyond the .onnx file's hash, no shard checksums (not resumable now)
SHARD_FORMAT = "ddpm-deploy/generate-shard"
# Bounds on a job, checked when one starts and again when generate.json is read back (anyone can edit it, and its
# n and shard_size decide how many shards are checked: n = 1e9 in shards of 1 took 40 s and 2.3 GB to report).
# FID needs 5e4 images and dataset-scale runs 1e6-1e7 (ImageNet: 1.3e6): 1e8 leaves room. 1e5 shards keep
# generate.json's list of shards under ~15 MB and --check's report under 1e5 lines (50 000 images in shards of 1
# still fit). A shard is read whole to check it: at most 2**28 float32 values (1 GiB, a manifest's batch cap).
MAX_IMAGES = 10 ** 8
MAX_SHARDS = 10 ** 5
MAX_SHARD_ELEMENTS = 2 ** 28
NPY_HEADER_BYTES = 4096        # np.save's header for a 4-D float32 array is 128 bytes: room for any shape
MAX_RECORD_BYTES = 64 << 20    # generate.json with MAX_SHARDS entries is ~15 MB
MAX_SHARD_RECORD_BYTES = 64 << 10


@dataclass(frozen=True)
class GenerateSpec:
    engine: str
    n: int
    seed: int = 0
    sampling: SamplerSpec = SamplerSpec()  # sampler None: the model's default (a distilled student's grid, else
    shard_size: int = 256                   # dpmpp_sde), filled in by open_job
    device: str = "cpu"
    backend: str | None = None
    threads: int | None = None

    @property
    def shards(self) -> int:
        return -(-self.n // self.shard_size)

    def check_size(self, image_shape: tuple) -> None:
        """Refuse a job over MAX_IMAGES, MAX_SHARDS or MAX_SHARD_ELEMENTS before anything is written."""
        problem = size_problem(self.n, self.shard_size, image_shape)
        if problem:
            raise UserError(f"-n {self.n} --shard-size {self.shard_size}: {problem}")

    def shard_range(self, s: int) -> tuple[int, int]:
        start = s * self.shard_size
        return start, min(self.shard_size, self.n - start)

    def identity(self, model_sha256: str, plan, image_shape: tuple, backend: str | None) -> dict:
        """What decides the images: a job folder only resumes, and only adopts shards of, a job with exactly these.
        The plan's hash covers every sampler option (order, spacing, clipping, a distilled grid) beyond the names."""
        return {"model_sha256": model_sha256, "backend": backend, "device": self.device,
                "sampler": plan.sampler, "steps": plan.steps, "eta": float(plan.eta), "plan_sha256": plan_sha256(plan),
                "seed": self.seed, "image_shape": [int(d) for d in image_shape], "n": self.n,
                "shard_size": self.shard_size}


def size_problem(n: int, shard_size: int, image_shape) -> str | None:
    """Why a job of n images in shards of shard_size (each image_shape) is too big (None: it is not)."""
    if n > MAX_IMAGES:
        return f"more than {MAX_IMAGES} images in one job: split it over several --out folders"
    if -(-n // shard_size) > MAX_SHARDS:
        return f"{-(-n // shard_size)} shards, more than {MAX_SHARDS}: use a --shard-size of at least " \
               f"{-(-n // MAX_SHARDS)}"
    elements = min(n, shard_size) * int(np.prod(image_shape))
    if elements > MAX_SHARD_ELEMENTS:
        return f"shards of {elements} values, over the cap {MAX_SHARD_ELEMENTS} (1 GiB of float32): use a " \
               f"--shard-size of at most {max(1, MAX_SHARD_ELEMENTS // int(np.prod(image_shape)))}"
    return None


def plan_sha256(plan) -> str:
    """sha256 of a SamplingPlan: its options and every per-step scalar (the numbers the chain runs on)."""
    h = hashlib.sha256(json.dumps([plan.sampler, float(plan.eta), bool(plan.learned_variance), plan.order,
                                   plan.variant, plan.spacing]).encode())
    h.update(np.ascontiguousarray(plan.timesteps, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(plan.coefs, dtype=np.float64).tobytes())
    return h.hexdigest()


def job_key(identity: dict) -> str:
    return sha256_bytes(json.dumps(identity, sort_keys=True).encode())


def shard_path(out: Path, s: int) -> Path:
    return out / f"shard-{s:06d}.npy"


def shard_record_path(out: Path, s: int) -> Path:
    return out / f"shard-{s:06d}.json"


# -- checking shards ------------------------------------------------------------------------------------------------

def header_problem(dtype, got_shape: tuple, shape: tuple) -> str | None:
    """Why an array of `dtype` and `got_shape` cannot be a shard of `shape` (None: it can)."""
    if dtype != np.float32:
        return f"dtype {dtype}, expected float32"
    if tuple(got_shape) != tuple(shape):
        return f"shape {tuple(got_shape)}, expected {tuple(shape)}"
    return None


def array_problem(x: np.ndarray, shape: tuple) -> str | None:
    """Why x is not a shard of `shape` (None: it is): float32, that shape, every value finite."""
    problem = header_problem(x.dtype, x.shape, shape)
    if problem:
        return problem
    bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
    return f"{bad} non-finite value(s)" if bad else None


def shard_problem(out: Path, s: int, entry: dict, settings: dict) -> str | None:
    """Why shard s on disk is not the shard `entry` records (None: it is): its sha256, and what is wrong inside."""
    return read_shard(out, s, entry, settings)[1]


def read_shard(out: Path, s: int, entry: dict, settings: dict) -> tuple[np.ndarray | None, str | None]:
    """(shard s's images, None) when the file is the shard `entry` records, else (None, why not). The file is read
    once: the bytes whose sha256 is checked are the bytes parsed, so nothing can change between check and use."""
    expected = _expected_entry(s, settings)
    if not isinstance(entry, dict) or any(entry.get(k) != v for k, v in expected.items()) \
            or not isinstance(entry.get("sha256"), str):
        return None, f"its record is not this job's shard {s} (images {expected['start']}.."\
                     f"{expected['start'] + expected['count'] - 1} with a sha256)"
    path, shape = shard_path(out, s), (entry["count"], *settings["image_shape"])
    try:  # a regular file of at most the shard's size: never a FIFO (blocks) or /dev/zero (endless)
        data = read_regular_file(path, int(np.prod(shape)) * 4 + NPY_HEADER_BYTES)
    except FileNotFoundError:
        return None, "missing"
    except OSError as e:  # a folder, a FIFO or a device of that name, too large, no permission
        return None, f"unreadable ({e.strerror})"
    x, problem = _parse_npy(data, shape)
    if sha256_bytes(data) != entry["sha256"]:  # say what changed inside, if it shows
        return None, ("does not match the sha256 recorded when it was written "
                      f"({problem or array_problem(x, shape) or 'changed or replaced'})")
    problem = problem or array_problem(x, shape)
    return (None, problem) if problem else (x, None)


def _parse_npy(data: bytes, shape: tuple) -> tuple[np.ndarray | None, str | None]:
    """The .npy in `data` as a read-only view of it, its header checked before anything is sized from it (a hostile
    header cannot make us allocate its claim)."""
    try:
        got_shape, fortran_order, dtype, offset = npy_header(data)
    except ValueError as e:
        return None, str(e)
    problem = header_problem(dtype, got_shape, shape) or ("Fortran-ordered, expected C order" if fortran_order
                                                         else None)
    if problem:
        return None, problem
    if len(data) - offset != int(np.prod(shape)) * 4:
        return None, f"{len(data) - offset} data bytes, expected {int(np.prod(shape)) * 4}"
    return np.frombuffer(data, np.float32, offset=offset).reshape(shape), None


def _expected_entry(s: int, settings: dict) -> dict:
    start = s * settings["shard_size"]
    return {"shard": s, "start": start, "count": min(settings["shard_size"], settings["n"] - start)}


def _shard_count(settings: dict) -> int:
    return -(-settings["n"] // settings["shard_size"])


# -- the job record ---------------------------------------------------------------------------------------------

def read_record(out: Path) -> dict | None:
    """The job record of OUT (None: there is none), its format, version and settings checked; refuses anything
    else in one line."""
    path = out / JOB_FILE
    if not path.exists() and not path.is_symlink():
        return None
    try:
        record = json.loads(read_regular_file(path, MAX_RECORD_BYTES))
        settings = record["settings"]
        ok = record["format"] == JOB_FORMAT and isinstance(settings, dict) and isinstance(record["done"], list)
    except OSError as e:  # a FIFO, a device, a link to nothing, too large
        raise UserError(f"{path} cannot be read as a generate record ({e.strerror}): remove it or choose another "
                        "--out") from None
    except (ValueError, KeyError, TypeError, RecursionError):  # not JSON, nested 100 000 deep, not an object
        ok = False
    if not ok:
        raise UserError(f"{path} is not a generate record: remove it or choose another --out")
    if record.get("version") != JOB_VERSION:
        raise UserError(f"{path} is a record of version {str(record.get('version'))[:20]!r}, written by another "
                        f"ddpm-deploy (this one reads version {JOB_VERSION}, with shard checksums): choose another "
                        "--out, or empty the folder to start again")
    problem = _settings_problem(settings)
    if problem:
        raise UserError(f"{path}: its settings are damaged ({problem}): remove it or choose another --out")
    return record


def _settings_problem(settings: dict) -> str | None:
    """Why a record's n, shard_size and image_shape cannot be a job's (None: they can): exact integers in range,
    and a job size within MAX_IMAGES, MAX_SHARDS and MAX_SHARD_ELEMENTS."""
    n, size, shape = settings.get("n"), settings.get("shard_size"), settings.get("image_shape")
    for name, v in (("n", n), ("shard_size", size)):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_IMAGES:
            return f"{name} = {str(v)[:40]} is not an integer in 1..{MAX_IMAGES}"
    caps = (MAX_CHANNELS, MAX_IMAGE_SIDE, MAX_IMAGE_SIDE)
    if not isinstance(shape, list) or len(shape) != 3 or not all(
            isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= cap for d, cap in zip(shape, caps)):
        return f"image_shape = {str(shape)[:40]} is not [C, H, W] within {list(caps)}"
    return size_problem(n, size, shape)


def recorded_shards(record: dict) -> dict[int, dict]:
    """Shard -> its entry, for every entry naming a shard of this job (others are ignored: computed again)."""
    shards = _shard_count(record["settings"])
    return {e["shard"]: e for e in record["done"]
            if isinstance(e, dict) and isinstance(e.get("shard"), int) and 0 <= e["shard"] < shards}


def _write_record(job: "JobFolder") -> None:
    record = {"format": JOB_FORMAT, "version": JOB_VERSION, "settings": job.identity, "job_key": job.key,
              "engine": job.spec.engine, "shards": job.spec.shards, "done": [job.done[s] for s in sorted(job.done)],
              "files": "shard-%06d.npy: float32 x_0 (count, C, H, W) of images [start, start + count), its sha256 "
                       "in done; shard-%06d.json: the same entry and the job_key, written before done lists it"}
    write_text_atomic(json.dumps(record, indent=1), job.out / JOB_FILE)


@dataclass
class JobFolder:
    """A generate job in its folder: who it is (identity, key) and the shards done, each checked."""
    spec: GenerateSpec
    out: Path
    identity: dict
    plan: object
    done: dict[int, dict] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return job_key(self.identity)

    @property
    def todo(self) -> list[int]:
        return [s for s in range(self.spec.shards) if s not in self.done]

    def store(self, s: int, x: np.ndarray) -> None:
        """Write shard s (checked first), then its own record, then list it as done: each durable before the next."""
        start, count = self.spec.shard_range(s)
        problem = array_problem(x, (count, *self.identity["image_shape"]))
        if problem:
            raise UserError(f"shard {s} came back wrong ({problem}); finished shards are kept, rerun to resume")
        data = _npy_bytes(x)
        entry = {"shard": s, "start": start, "count": count, "sha256": sha256_bytes(data)}
        write_bytes_atomic(data, shard_path(self.out, s))
        write_text_atomic(json.dumps({"format": SHARD_FORMAT, "job_key": self.key, **entry}),
                          shard_record_path(self.out, s))
        self.done[s] = entry
        _write_record(self)


@contextmanager
def open_job(spec: GenerateSpec, out: str, echo=print):
    """The job for `spec` in OUT, every shard it keeps checked (one line for each that is computed again), and its
    record written; yields (job, shards adopted) while holding OUT (JOB_LOCK), so two drivers never write one
    folder. Refuses a folder that holds another job, or that another driver holds."""
    engine = Path(spec.engine)
    if not engine.exists():
        raise UserError(f"engine {engine} not found: export one with `ddpm-deploy export`")
    spec = dataclasses.replace(spec, engine=str(engine.resolve()))  # workers may run elsewhere
    manifest = Manifest.read(spec.engine)
    if spec.sampling.sampler is None:
        spec = dataclasses.replace(spec, sampling=spec.sampling.with_default(default_sampler(manifest.distilled)))
    elif off_grid_warning(spec.sampling.sampler, manifest.distilled):
        echo(off_grid_warning(spec.sampling.sampler, manifest.distilled))
    spec.check_size(manifest.image_shape)
    plan = model_plan(manifest, spec.sampling)
    identity = spec.identity(model_sha256(spec.engine), plan, manifest.image_shape,
                             fixed_backend(spec.engine, spec.backend))
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    with folder_lock(outdir, JOB_LOCK, wait=False) as held:
        if not held:
            raise UserError(f"{outdir} is being written by another `ddpm-deploy generate` (it holds {JOB_LOCK}): "
                            "wait for it to finish, or use another --out")
        yield _opened(JobFolder(spec, outdir, identity, plan), echo)


def _opened(job: "JobFolder", echo) -> tuple["JobFolder", int]:
    """The folder's kept shards checked and orphans adopted, the record written: (job, shards adopted)."""
    outdir = job.out
    record = read_record(outdir)
    if record is not None:
        _refuse_other_job(outdir, record["settings"], job.identity)
        for s, entry in sorted(recorded_shards(record).items()):
            problem = shard_problem(outdir, s, entry, job.identity)
            if problem:
                echo(f"{shard_path(outdir, s).name}: {problem}; computing it again")
            else:
                job.done[s] = entry
    _remove_temp_files(outdir)
    adopted = _adopt_orphans(job, echo)
    job.done.update(adopted)
    _write_record(job)
    return job, len(adopted)


def _remove_temp_files(out: Path) -> None:
    """Temp files of a driver killed mid-write (write_atomic's NAME.XXXX.tmp): never published, never needed."""
    for pattern in ("shard-*.npy.*.tmp", "shard-*.json.*.tmp", f"{JOB_FILE}.*.tmp"):
        for p in out.glob(pattern):
            p.unlink(missing_ok=True)


def _refuse_other_job(out: Path, settings: dict, identity: dict) -> None:
    if settings != identity:
        diff = ", ".join(f"{k} {_short(settings.get(k))} != {_short(v)}" for k, v in identity.items()
                         if settings.get(k) != v)
        raise UserError(f"{out} holds a different generate job ({diff}): use the same settings and model to "
                        "resume, or another --out")


def _short(v) -> str:
    """A value for a one-line message: sha256 digests cut to 12 hex digits, anything long (a tampered record's)
    cut to 60 characters."""
    return repr(v[:12] + "...") if isinstance(v, str) and len(v) == 64 else shown(v)


def _adopt_orphans(job: JobFolder, echo) -> dict[int, dict]:
    """Shards written but not listed (the job died in between, or generate.json was lost): adopted only when
    their own record names this job (its key) and the file still matches it."""
    found = {}
    for s in job.todo:
        path = shard_path(job.out, s)
        if not path.exists():
            continue
        entry, problem = _shard_record(job, s)
        problem = problem or shard_problem(job.out, s, entry, job.identity)
        if problem:
            echo(f"{path.name}: not adopted ({problem}); computing it again")
        else:
            found[s] = entry
    return found


def _shard_record(job: JobFolder, s: int) -> tuple[dict | None, str | None]:
    """(entry, None) from shard s's own record when it names this job, else (None, why not)."""
    path = shard_record_path(job.out, s)
    try:
        rec = json.loads(read_regular_file(path, MAX_SHARD_RECORD_BYTES))
        assert isinstance(rec, dict) and rec.get("format") == SHARD_FORMAT
    except FileNotFoundError:
        return None, f"no {path.name} saying which job wrote it"
    except (ValueError, OSError, AssertionError, RecursionError):
        return None, f"{path.name} is not a shard record"
    if rec.get("job_key") != job.key:
        return None, "written by another job: other model, sampler, seed or shapes"
    return {k: rec.get(k) for k in ("shard", "start", "count", "sha256")}, None


def _npy_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


# -- reading a finished job -----------------------------------------------------------------------------------------

def check_folder(out: str, keep: list | None = None) -> tuple[dict, list[str]]:
    """(record, one line per shard that is not done or fails its checks) for the job in OUT; needs no Ray.
    `keep`: a list that gets each good shard's images, in order (load_images: each file read once)."""
    outdir = Path(out)
    if not outdir.is_dir():
        raise UserError(f"{outdir} is not a folder: give the --out folder of a generate job")
    record = read_record(outdir)
    if record is None:
        raise UserError(f"{outdir} has no {JOB_FILE}: not a generate folder (or its record was lost: run the same "
                        "generate command again to check and adopt its shards)")
    settings, entries = record["settings"], recorded_shards(record)
    problems = [] if record.get("job_key") == job_key(settings) else \
        [f"{outdir / JOB_FILE}: its job_key does not match its settings (edited by hand?)"]
    for s in range(_shard_count(settings)):
        name = shard_path(outdir, s)
        if s not in entries:
            problems.append(f"{name}: not computed yet (run the generate command again to finish)")
            continue
        x, problem = read_shard(outdir, s, entries[s], settings)
        if problem:
            problems.append(f"{name}: {problem} (run the generate command again to recompute it)")
        elif keep is not None:
            keep.append(x)
    return record, problems


def load_images(out: str) -> np.ndarray:
    """All images of a finished job in index order (float32 (N, C, H, W)), every shard checked first: refuses in
    one line naming the first shard that is missing or not what was recorded."""
    shards: list = []
    _, problems = check_folder(out, keep=shards)
    if problems:
        more = f" (and {len(problems) - 1} more: see `ddpm-deploy generate --check {out}`)" if len(problems) > 1 else ""
        raise UserError(problems[0] + more)
    return np.concatenate(shards)
