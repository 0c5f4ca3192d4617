"""Schedule study (issue 16): bits/dim and sample quality of trained runs that differ only in their beta schedule.

For each run folder (a `ddpm-deploy train` output: OUT/model.pt): export fp32 ONNX (parity-checked, max batch
200), the variational bound in bits/dim on the first 64 held-out digits through the engine (onnxruntime, the same
code as `ddpm-deploy eval`; 64 of the 359 test images keep it to ~1-2 CPU minutes per model), and the Fréchet
distance on PCA features (ddpm_deploy.app.quality) of n=200 samples from the same seeds (same x_T) to the held-out
digits, for DDPM-1000 and the fast samplers (dpmpp 10 steps, dpmpp_sde 50, DDIM 100), next to the real-vs-real
floor at the same n. Each run's numbers are cached in OUT_DIR/<name>.json (bounded, one thread, resumable: a run
already measured is skipped unless --force), then every cached run goes into one JSON, a markdown table and a plot.

    nice -n 5 .venv/bin/python benchmarks/schedule_study.py /work/study/linear /work/study/cosine \
        /work/study/geometric --plot docs/schedule_study.png
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np

# (label, sampler, steps, order): DDPM-1000 is the reference; the others are the fast samplers under study.
SAMPLERS = [("DDPM 1000", "ddpm", 1000, None), ("dpmpp 10", "dpmpp", 10, 2),
            ("dpmpp_sde 50", "dpmpp_sde", 50, 2), ("DDIM 100", "ddim", 100, None)]
BPD_IMAGES = 64
MAX_BATCH = 200


def _train_info(model_pt: Path) -> dict:
    from ddpm_deploy.nn.checkpoint import load_raw

    state = load_raw(model_pt)
    train = state.get("train", {})
    return {"schedule": state["schedule"], "step": train.get("step"), "preset": train.get("preset"),
            "ema_decay": train.get("ema_decay"), "lr": train.get("lr"), "batch_size": train.get("batch_size"),
            "seed": train.get("seed"), "size_bytes": model_pt.stat().st_size}


def _final_loss(run: Path) -> float | None:
    """The trainer's last printed loss from OUT.log next to the run, if kept: `(loss EMA X ...` (an EMA over ~100
    batches), or `(final loss X)` in older logs (the mean of the last 200 steps)."""
    log = run.parent / f"{run.name}.log"
    if not log.exists():
        return None
    for line in reversed(log.read_text(errors="replace").splitlines()):
        m = re.search(r"\((?:final loss|loss EMA) ([0-9.eE+-]+)", line)
        if m:
            return float(m.group(1))
    return None


def measure_run(run: Path, name: str, work: Path, n: int, threads: int) -> dict:
    import torch

    from ddpm_deploy.app.evaluate import evaluate_pipeline
    from ddpm_deploy.export import onnx_from_checkpoint
    from ddpm_deploy.app.quality import PCAFeatures, frechet_distance
    from ddpm_deploy.runtime import load
    from ddpm_deploy.train.data import load_dataset

    torch.set_num_threads(threads)
    model_pt = run / "model.pt"
    info = _train_info(model_pt)
    onnx = work / f"{name}.onnx"
    t0 = time.perf_counter()
    exp = onnx_from_checkpoint(str(model_pt), onnx, max_batch=MAX_BATCH, echo=lambda *_: None)
    parity = {"max_abs": max(r.max_abs for r in exp["parity"]), "mean_abs": max(r.mean_abs for r in exp["parity"])}
    print(f"[{name}] exported in {time.perf_counter() - t0:.0f}s; parity max/mean |d eps| {parity['max_abs']:.1e} / "
          f"{parity['mean_abs']:.1e}", flush=True)
    train, test = load_dataset("digits", 16, "train"), load_dataset("digits", 16, "test")
    feats = PCAFeatures.fit(train)
    f_test = feats(test)
    out = {"name": name, "run": str(run), **info, "final_loss": _final_loss(run), "parity": parity}
    with load(str(onnx), backend="onnxruntime", threads=threads) as pipe:
        r = evaluate_pipeline(pipe, test[:BPD_IMAGES], seed=0)
        out["bits_per_dim"] = r["bits_per_dim"]
        out["bpd_terms"] = {k: r[k] for k in ("prior_bpd", "kl_terms_bpd", "decoder_bpd")}
        out["bpd_images"] = BPD_IMAGES
        print(f"[{name}] {r['bits_per_dim']:.4f} bits/dim on {BPD_IMAGES} test images ({r['seconds']:.0f}s)",
              flush=True)
        out["fd"] = {}
        for label, sampler, steps, order in SAMPLERS:
            t0 = time.perf_counter()
            x0 = pipe.sample(n, seed=0, sampler=sampler, steps=steps, order=order, output="float")
            sec = time.perf_counter() - t0
            fd = frechet_distance(feats(np.clip(x0, -1, 1)), f_test)
            out["fd"][label] = {"fd": fd, "sampler": sampler, "steps": steps, "order": order,
                                "ms_per_image": 1000 * sec / n}
            print(f"[{name}] {label}: FD {fd:.2f} ({1000 * sec / n:.1f} ms/image)", flush=True)
    return out


def markdown(runs: list[dict], floor: float, floor_sd: float, n: int) -> str:
    labels = [s[0] for s in SAMPLERS]
    head = ("| schedule | steps | final loss | bits/dim (64 test) | "
            + " | ".join(f"FD {lab}" for lab in labels) + " |")
    lines = [head, "|" + "---|" * (4 + len(labels))]
    for r in runs:
        loss = "–" if r.get("final_loss") is None else f"{r['final_loss']:.4f}"
        cells = [f"{r['fd'][lab]['fd']:.2f} ({r['fd'][lab]['fd'] / floor:.2f}×)" for lab in labels]
        lines.append(f"| {r['name']} | {r['step']} | {loss} | {r['bits_per_dim']:.3f} | " + " | ".join(cells) + " |")
    lines.append(f"\nReal-vs-real floor at n={n}: {floor:.2f} ± {floor_sd:.2f} (× = FD / floor).")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], floor: float, floor_sd: float, path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ddpm_deploy.files import write_bytes_atomic
    from ddpm_deploy.sampling.schedule import Schedule

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for r in runs:
        s = Schedule.from_dict(r["schedule"])
        ac = s.alphas_cumprod
        ax.plot(np.arange(1, s.T + 1), np.log(ac / (1 - ac)), label=r["name"])
    ax.set(xlabel="t", ylabel="log SNR = log(ᾱ_t / (1 − ᾱ_t))", title="schedules")
    ax.legend()
    ax = axes[1]
    ax.bar([r["name"] for r in runs], [r["bits_per_dim"] for r in runs], color=[f"C{i}" for i in range(len(runs))])
    lo = min(r["bits_per_dim"] for r in runs)
    ax.set_ylim(lo * 0.9, max(r["bits_per_dim"] for r in runs) * 1.03)
    ax.set(ylabel="bits/dim (lower is better)", title=f"bound on {runs[0]['bpd_images']} held-out digits")
    ax = axes[2]
    labels = [s[0] for s in SAMPLERS]
    width = 0.8 / len(runs)
    xs = np.arange(len(labels))
    for i, r in enumerate(runs):
        ax.bar(xs + (i - (len(runs) - 1) / 2) * width, [r["fd"][lab]["fd"] for lab in labels], width, label=r["name"])
    ax.axhspan(floor - floor_sd, floor + floor_sd, color="0.85", zorder=0, label="real vs real (±1 sd)")
    ax.axhline(1.5 * floor, color="k", ls="--", lw=1, label="1.5 × floor (target)")
    ax.set_xticks(xs, labels)
    ax.set_yscale("log")  # a sampler that fails (cosine with the multistep solvers) would flatten the rest
    ax.set(ylabel="Fréchet distance, PCA-20 (log; lower is better)", title=f"sample quality, n={runs[0]['n']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_bytes_atomic(buf.getvalue(), path)


def cosine_solver_check(run: Path, n: int, threads: int) -> None:
    """Why the multistep solvers fail on a cosine run: diffusers' DPMSolverMultistep (2M, 10 steps) on its UNet
    with and without the log-SNR clip near t = T (lambda_min_clipped) and x_0 thresholding (clip at 1)."""
    import torch
    from diffusers import DPMSolverMultistepScheduler

    from ddpm_deploy.nn import load_checkpoint
    from ddpm_deploy.app.quality import PCAFeatures, frechet_distance
    from ddpm_deploy.train.data import load_dataset

    torch.set_num_threads(threads)
    ckpt = load_checkpoint(str(run / "model.pt"))
    unet = ckpt.build_unet().eval()
    train, test = load_dataset("digits", 16, "train"), load_dataset("digits", 16, "test")
    feats = PCAFeatures.fit(train)
    f_test = feats(test)
    x_T = torch.from_numpy(np.random.default_rng(0).standard_normal((n, 1, 16, 16)).astype(np.float32))
    for lam, thr in ((-float("inf"), False), (-5.1, False), (-float("inf"), True), (-5.1, True)):
        sched = DPMSolverMultistepScheduler(num_train_timesteps=ckpt.schedule.T, solver_order=2,
                                            trained_betas=np.asarray(ckpt.schedule.betas), lambda_min_clipped=lam,
                                            thresholding=thr, sample_max_value=1.0)
        sched.set_timesteps(10)
        x = x_T.clone()
        for t in sched.timesteps:
            with torch.no_grad():
                x = sched.step(unet(x, t).sample, t, x).prev_sample
        fd = frechet_distance(feats(np.clip(x.numpy(), -1, 1)), f_test)
        print(f"[{run.name}] diffusers dpmsolver++ 2M 10 steps, lambda_min_clipped={lam}, thresholding={thr}: "
              f"first t {int(sched.timesteps[0])}, FD {fd:.2f}", flush=True)


def main() -> None:
    from ddpm_deploy.files import write_bytes_atomic
    from ddpm_deploy.app.quality import PCAFeatures, real_floor
    from ddpm_deploy.train.data import load_dataset

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", help="train output folders (each with model.pt); the folder name labels it")
    ap.add_argument("--out", default="benchmarks/results/schedule_study", help="cache folder (per-run JSON, ONNX)")
    ap.add_argument("-n", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--force", action="store_true", help="re-measure runs already cached")
    ap.add_argument("--order", default="linear,cosine,geometric", help="table/plot order of the cached runs")
    ap.add_argument("--report-only", nargs="*", default=None, help="names of cached runs for the table/plot")
    ap.add_argument("--plot", default=None, help="PNG path for the plot (e.g. docs/schedule_study.png)")
    ap.add_argument("--cosine-check", default=None, metavar="RUN",
                    help="only: diffusers' DPM-Solver++ on RUN with/without the log-SNR clip and x_0 thresholding")
    args = ap.parse_args()
    if args.cosine_check:
        cosine_solver_check(Path(args.cosine_check), args.n, args.threads)
        return
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    for run in map(Path, args.runs):
        cache = work / f"{run.name}.json"
        if cache.exists() and not args.force:
            print(f"[{run.name}] cached in {cache}; --force to re-measure")
            continue
        if not (run / "model.pt").exists():
            raise SystemExit(f"error: {run}/model.pt does not exist (training not finished?)")
        r = measure_run(run, run.name, work, args.n, args.threads)
        r["n"] = args.n
        write_bytes_atomic(json.dumps(r, indent=2).encode(), cache)

    names = args.report_only if args.report_only is not None else [p.stem for p in work.glob("*.json")
                                                                      if p.stem != "study"]
    rank = {k: i for i, k in enumerate(args.order.split(","))}
    names = sorted(set(names), key=lambda k: (rank.get(k, len(rank)), k))
    runs = [json.loads((work / f"{k}.json").read_text()) for k in names]
    if not runs:
        return
    train, test = load_dataset("digits", 16, "train"), load_dataset("digits", 16, "test")
    floor, floor_sd = real_floor(PCAFeatures.fit(train), train, test, args.n)
    table = markdown(runs, floor, floor_sd, args.n)
    print(table)
    write_bytes_atomic(json.dumps({"n": args.n, "real_floor": floor, "real_floor_sd": floor_sd, "runs": runs},
                                  indent=2).encode(), work / "study.json")
    write_bytes_atomic(table.encode(), work / "study.md")
    if args.plot:
        plot(runs, floor, floor_sd, Path(args.plot))
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
