"""Distilled students next to their teacher (issue 23): FD per step budget, ms/image, and diffusers' DDPM-1000.

For each student (a `ddpm-deploy distill` model exported to ONNX) and for the teacher with DDIM / dpmpp / dpmpp_sde
at the students' step counts and at 20: n images from fixed seeds (the same x_T for every model: seeds 0..n-1),
the Fréchet distance on PCA features to the held-out digits (ddpm_deploy.app.quality, as benchmarks/quality_per_step.py)
and wall time per image on the default CPU backend (auto) unless --backend names one. Optionally one 1000-step
chain of diffusers' DDPMPipeline on the teacher's weights (same machine, same process, --threads torch threads) for
the speed-up at matched quality. Run (export first, `ddpm-deploy export M -o M.onnx --max-batch 100`):

    .venv/bin/python benchmarks/distill_quality.py --teacher /tmp/digits.onnx --student 4=/tmp/d4.onnx \
        --student 2=/tmp/d2.onnx -n 500 --grids docs --diffusers digits --json benchmarks/results/distill.json

A consistency-tuned student (`distill --method consistency`) is measured with sampler lcm at --lcm-steps:
`--lcm NAME=PATH.onnx` (repeatable); `--teacher-samplers` may name lcm too, and `--seed` draws a disjoint set of
images (per-image noise is default_rng([seed, i])).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

TEACHER_SAMPLERS = ("ddim", "dpmpp", "dpmpp_sde")


def _cell(pipe, n: int, feats, f_test, seed: int = 0, **sampling) -> dict:
    from ddpm_deploy.app.quality import frechet_distance

    t0 = time.perf_counter()
    x0 = pipe.sample(n, seed=seed, output="float", **sampling)
    sec = time.perf_counter() - t0
    fd = frechet_distance(feats(np.clip(x0, -1, 1)), f_test)
    return {"fd": fd, "ms_per_image": 1000 * sec / n, "load_avg": os.getloadavg()[0], "backend": pipe.backend.name,
            "steps": pipe.last_timing.get("steps"), "_x0": x0}


def _diffusers_ms_per_image(checkpoint: str, batch: int, threads: int) -> dict:
    """One DDPMPipeline chain, 1000 steps, batch `batch` (bench/sides.py's pipeline on the checkpoint's betas)."""
    import torch

    from ddpm_deploy.bench.sides import diffusers_pipeline

    torch.set_num_threads(threads)
    pipe = diffusers_pipeline(checkpoint, "ddpm")
    with torch.inference_mode():
        pipe(batch_size=batch, generator=torch.Generator("cpu").manual_seed(0), num_inference_steps=3,
             output_type="np")  # warm-up
        t0 = time.perf_counter()
        pipe(batch_size=batch, generator=torch.Generator("cpu").manual_seed(0), num_inference_steps=1000,
             output_type="np")
        sec = time.perf_counter() - t0
    return {"steps": 1000, "batch": batch, "threads": threads, "ms_per_image": 1000 * sec / batch,
            "load_avg": os.getloadavg()[0]}


def speed_batch1(onnx_path: str | None, checkpoint: str | None, repeats: int = 5, diffusers_steps: int = 50,
                 threads: int | None = 1) -> dict:
    """Wall time per image at batch 1, median of `repeats`: `onnx_path` on the default CPU backend (auto) with its
    default sampler (threads None; else onnxruntime on `threads`), or (checkpoint) diffusers' DDPMPipeline timed over `diffusers_steps` steps and scaled to its
    1000 (its cost is linear in steps: one UNet call each; `threads` torch threads). One side per process: in one
    process OpenVINO's waiting threads and torch's share the 2 cores and slow each other."""
    import torch

    times = []
    if onnx_path:
        from ddpm_deploy.runtime import load

        with load(onnx_path, **({} if threads is None else {"threads": threads})) as pipe:
            pipe.sample(1, seed=0)  # auto's measurement and warm-up
            for r in range(repeats):
                t0 = time.perf_counter()
                pipe.sample(1, seed=r)
                times.append(time.perf_counter() - t0)
            row = {"onnx": onnx_path, "backend": pipe.backend.name, "steps": pipe.last_timing.get("steps")}
    else:
        from ddpm_deploy.bench.sides import diffusers_pipeline

        torch.set_num_threads(threads or 1)
        ddpm = diffusers_pipeline(checkpoint, "ddpm")
        with torch.inference_mode():
            ddpm(batch_size=1, generator=torch.Generator("cpu").manual_seed(0), num_inference_steps=3,
                 output_type="np")
            for r in range(repeats):
                t0 = time.perf_counter()
                ddpm(batch_size=1, generator=torch.Generator("cpu").manual_seed(r),
                     num_inference_steps=diffusers_steps, output_type="np")
                times.append((time.perf_counter() - t0) * 1000 / diffusers_steps)
        row = {"checkpoint": checkpoint, "backend": "diffusers-DDPMPipeline", "steps": 1000,
               "threads": torch.get_num_threads(), "timed_steps": diffusers_steps}
    return {**row, "ms_per_image": 1000 * float(np.median(times)), "ms_per_image_all": [1000 * t for t in times],
            "repeats": repeats, "load_avg": os.getloadavg()[0]}


def main() -> None:
    from ddpm_deploy.files import write_bytes_atomic
    from ddpm_deploy.images import save_grid, to_uint8
    from ddpm_deploy.app.quality import PCAFeatures, real_floor
    from ddpm_deploy.runtime import load
    from ddpm_deploy.train.data import load_dataset

    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default=None, help="The teacher's ONNX.")
    ap.add_argument("--student", action="append", default=[], help="K=PATH.onnx of a K-step student; repeat.")
    ap.add_argument("-n", type=int, default=500)
    ap.add_argument("--backend", default=None, help="Default: the CPU default (auto).")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--teacher-steps", default="1,2,4,8,20", help="Teacher step counts (comma-separated).")
    ap.add_argument("--grids", default=None, help="Folder for distill_<K>step.png (64 images per student).")
    ap.add_argument("--diffusers", default=None, help="Checkpoint to time diffusers' DDPMPipeline 1000 steps on.")
    ap.add_argument("--diffusers-batch", type=int, default=8, help="0: no full 1000-step chain (--speed only).")
    ap.add_argument("--speed", action="append", default=[], help="K=PATH.onnx, or 'diffusers' (DDPM-1000 on "
                    "--diffusers): batch-1 wall time per image; one per process (see speed_batch1).")
    ap.add_argument("--speed-threads", type=int, default=None, help="--speed on onnxruntime with these threads "
                    "(default: the default CPU backend, auto).")
    ap.add_argument("--lcm", action="append", default=[], help="NAME=PATH.onnx of a consistency student, sampled "
                    "with lcm at --lcm-steps; repeat.")
    ap.add_argument("--lcm-steps", default="1,2,4", help="lcm step counts for --lcm (comma-separated).")
    ap.add_argument("--teacher-samplers", default=",".join(TEACHER_SAMPLERS), help="Teacher samplers "
                    "(comma-separated; lcm too).")
    ap.add_argument("--seed", type=int, default=0, help="Image seeds (another seed: a disjoint draw).")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    train, test = load_dataset("digits", 16, "train"), load_dataset("digits", 16, "test")
    feats = PCAFeatures.fit(train)
    f_test = feats(test)
    floor, floor_sd = real_floor(feats, train, test, args.n)
    print(f"real-vs-real floor at n={args.n}: {floor:.2f} ± {floor_sd:.2f}; load {os.getloadavg()[0]:.2f}", flush=True)
    opts = {"threads": args.threads} if args.backend in (None, "auto", "onnxruntime", "openvino") else {}
    rows = []

    def report(row):
        rows.append({k: v for k, v in row.items() if k != "_x0"})
        print(f"{row['model']:>10s} {row['sampler']:>10s} {row['steps']:3d} steps: FD {row['fd']:6.2f} "
              f"({row['fd'] / floor:.2f}x floor), {row['ms_per_image']:7.2f} ms/image on {row['backend']} "
              f"(load {row['load_avg']:.1f})", flush=True)

    for spec in args.student:
        k, path = spec.split("=", 1)
        with load(path, backend=args.backend, **opts) as pipe:
            pipe.sample(2, seed=0)  # warm-up (and auto's choice)
            row = {"model": f"{k}-step", **_cell(pipe, args.n, feats, f_test, args.seed), "sampler": "distilled"}
            assert row["steps"] == int(k), (row["steps"], k)
            report(row)
            if args.grids:
                save_grid(to_uint8(row["_x0"][:64]), os.path.join(args.grids, f"distill_{k}step.png"))
    for spec in args.lcm:
        name, path = spec.split("=", 1)
        with load(path, backend=args.backend, **opts) as pipe:
            pipe.sample(2, seed=0, sampler="lcm", steps=1)
            for steps in [int(k) for k in args.lcm_steps.split(",") if k]:
                report({"model": name, **_cell(pipe, args.n, feats, f_test, args.seed, sampler="lcm", steps=steps),
                        "sampler": "lcm"})
    teacher_steps = [int(k) for k in args.teacher_steps.split(",") if k]
    if args.teacher and teacher_steps:
        with load(args.teacher, backend=args.backend, **opts) as pipe:
            pipe.sample(2, seed=0, sampler="ddim", steps=2)
            for steps in teacher_steps:
                for sampler in [s for s in args.teacher_samplers.split(",") if s]:
                    report({"model": "teacher", **_cell(pipe, args.n, feats, f_test, args.seed, sampler=sampler,
                                                        steps=steps),
                            "sampler": sampler})
    out = {"n": args.n, "seed": args.seed, "threads": args.threads, "real_floor": floor, "real_floor_sd": floor_sd, "rows": rows}
    if args.diffusers and args.diffusers_batch > 0:
        out["diffusers_ddpm_1000"] = d = _diffusers_ms_per_image(args.diffusers, args.diffusers_batch, args.threads)
        print(f"diffusers DDPMPipeline 1000 steps, batch {d['batch']}: {d['ms_per_image']:.0f} ms/image "
              f"(load {d['load_avg']:.1f})", flush=True)
        for r in rows:
            r["speedup_vs_diffusers_ddpm_1000"] = d["ms_per_image"] / r["ms_per_image"]
    out["speed_batch1"] = []
    for spec in args.speed:  # K=PATH.onnx, or "diffusers" (DDPM-1000 on --diffusers)
        k, _, path = spec.partition("=")
        sp = {"model": k, **(speed_batch1(None, args.diffusers, threads=args.threads) if k == "diffusers" else speed_batch1(path, None, threads=args.speed_threads))}
        out["speed_batch1"].append(sp)
        print(f"batch 1: {k} {sp['ms_per_image']:.1f} ms/image on {sp['backend']} ({sp['steps']} steps, load "
              f"{sp['load_avg']:.1f})", flush=True)
    if args.json:
        write_bytes_atomic(json.dumps(out, indent=2).encode(), args.json)


if __name__ == "__main__":
    main()
