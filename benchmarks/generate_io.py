"""Reading a finished `generate` folder: `check_folder` (generate --check) and `load_images`, seconds per pass.

    python benchmarks/generate_io.py [--images 4096] [--shard-size 256] [--size 64] [--rounds 3]

Writes a synthetic job (random float32 images, 3 x SIZE x SIZE) with the real writer (JobFolder.store: shard, its
record, generate.json, fsyncs) into a temp folder, then times each reader --rounds times (medians; the files are in
the page cache after the first write, so this is CPU and copy time, not the disk). Prints the load average."""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from ddpm_deploy.sampling.plan import make_plan
from ddpm_deploy.sampling.schedule import Schedule
from ddpm_deploy.generate.job import GenerateSpec, JobFolder, check_folder, load_images


def write_job(out: Path, images: int, shard_size: int, size: int) -> float:
    spec = GenerateSpec(engine="synthetic.onnx", n=images, shard_size=shard_size)
    plan = make_plan(Schedule.build("linear", 1000), "ddim", 10)
    job = JobFolder(spec, out, spec.identity("0" * 64, plan, (3, size, size), None), plan)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for s in range(spec.shards):
        job.store(s, rng.standard_normal((spec.shard_range(s)[1], 3, size, size), dtype=np.float32))
    return time.perf_counter() - t0


def timed(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        write_s = write_job(out, args.images, args.shard_size, args.size)
        mb = sum(p.stat().st_size for p in out.glob("shard-*.npy")) / 2**20
        assert not check_folder(str(out))[1]
        check_s = timed(lambda: check_folder(str(out)), args.rounds)
        load_s = timed(lambda: load_images(str(out)), args.rounds)
    print(f"{args.images} images of 3x{args.size}x{args.size} ({mb:.0f} MiB) in {-(-args.images // args.shard_size)} "
          f"shards: write {write_s:.2f} s, check_folder {check_s:.2f} s, load_images {load_s:.2f} s "
          f"(median of {args.rounds}; load average {load:.2f} -> {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
