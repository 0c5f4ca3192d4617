"""OpenVINO on CPU against onnxruntime and diffusers, in one run so the ratios share the machine's state.

    python benchmarks/openvino_cpu.py            # cifar10-32 architecture (random weights) + digits, batch 1 and 8
    python benchmarks/openvino_cpu.py --quick    # fewer reps and steps: checks that it works, not for figures

Per model and batch size it times (warm-up, then the median of `reps`):
  * one eps call: onnxruntime fp32, OpenVINO fp32, OpenVINO bf16 (where the CPU has bf16), the diffusers UNet
    in torch eager;
  * whole sampling, per step: our runtime (DDPM and DDIM plans, fused step, seeded noise) on each backend, and
    diffusers' DDPMPipeline / DDIMPipeline on the same weights and number of steps.
Then the "verify" figure: PSNR of bf16 against fp32 final samples from the same noise (DDIM, default 50 steps),
and max|Δeps| over a few timesteps. Images are in [-1, 1], so PSNR = 10 log10(2^2 / MSE).

Models: the google/ddpm-cifar10-32 architecture (preset "cifar10", 35.7 M parameters) with random weights, and
the shipped digits model when ddpm_deploy/models/digits.pt exists (else preset "small" with random weights).
Each is saved as a diffusers pipeline folder and exported with `onnx_from_checkpoint` (max batch 8).
Prints JSON and a Markdown table; writes the JSON to benchmarks/results/openvino_cpu.json unless --json says.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import numpy as np

from ddpm_deploy.bench import median_ms

TARGETS = {"ov_fp32_vs_ort": 1.0, "ov_bf16_vs_ort": 1.8, "ov_bf16_vs_diffusers": 2.5}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 warm-up, 3 reps, 4 chain steps, PSNR over 10 DDIM steps")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes (<= 8)")
    p.add_argument("--models", default="cifar10,digits", help="comma-separated: cifar10, digits")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 2; quick 1)")
    p.add_argument("--reps", type=int, default=None, help="timed calls per figure (default 5; quick 3)")
    p.add_argument("--chain-steps", type=int, default=None, help="steps of the whole-chain timings (default 8)")
    p.add_argument("--psnr-steps", type=int, default=None, help="DDIM steps of the bf16 PSNR run (default 50)")
    p.add_argument("--psnr-n", type=int, default=16, help="images in the bf16 PSNR run")
    p.add_argument("--psnr-models", default="digits",
                   help="models that get the bf16 PSNR run (cifar10 at 50 steps adds about a minute per 4 images)")
    p.add_argument("--bf16-proxy", action="store_true",
                   help="on a CPU without bf16: torch autocast bf16 PSNR instead (an indication, not OpenVINO's)")
    p.add_argument("--threads", type=int, default=None, help="threads for every library (default: each one's own)")
    p.add_argument("--work", default=None, help="keep the model folders and ONNX files here and reuse them")
    p.add_argument("--json", default="benchmarks/results/openvino_cpu.json", help="where to write the JSON")
    args = p.parse_args(argv)
    quick = args.quick
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    args.reps = args.reps if args.reps is not None else (3 if quick else 5)
    args.chain_steps = args.chain_steps if args.chain_steps is not None else (4 if quick else 8)
    args.psnr_steps = args.psnr_steps if args.psnr_steps is not None else (10 if quick else 50)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.models = [m.strip() for m in args.models.split(",")]
    args.psnr_models = [m.strip() for m in args.psnr_models.split(",")]
    if any(m not in ("cifar10", "digits") for m in args.models):
        p.error("--models takes cifar10 and/or digits")
    if any(not 1 <= b <= 8 for b in args.batches):
        p.error("--batches must lie in 1..8 (the exports have max batch 8)")
    return args


# ---------------------------------------------------------------------------------------------- models

def save_random_pipeline(folder: Path, preset: str, size: int, channels: int, seed: int = 0) -> None:
    """A diffusers DDPMPipeline folder (UNet2DModel with random weights + DDPMScheduler defaults)."""
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from ddpm_deploy.config import unet_config

    torch.manual_seed(seed)
    unet = UNet2DModel(**unet_config(preset, sample_size=size, channels=channels)).eval()
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(str(folder))


def save_checkpoint_pipeline(spec: str, folder: Path) -> None:
    """A diffusers pipeline folder for our checkpoint: same weights, and its exact betas as `trained_betas`."""
    from diffusers import DDPMPipeline, DDPMScheduler

    from ddpm_deploy.nn import load_checkpoint

    ckpt = load_checkpoint(spec)
    sched = DDPMScheduler(num_train_timesteps=ckpt.schedule.T, trained_betas=ckpt.schedule.betas.tolist(),
                          variance_type=ckpt.variance_type, clip_sample=ckpt.clip_sample,
                          clip_sample_range=ckpt.clip_sample_range)
    DDPMPipeline(unet=ckpt.build_unet(), scheduler=sched).save_pretrained(str(folder))


def shipped_digits() -> Path | None:
    path = Path(str(resources.files("ddpm_deploy") / "models" / "digits.pt"))
    return path if path.is_file() else None


def prepare_model(name: str, work: Path) -> dict:
    """{"name", "label", "folder", "onnx", "weights", "checkpoint", "manifest"} for "cifar10" or "digits",
    exporting only what is not in `work` yet."""
    from ddpm_deploy.files import file_sha256
    from ddpm_deploy.export import onnx_from_checkpoint
    from ddpm_deploy.manifest import Manifest

    digits = shipped_digits() if name == "digits" else None
    weights = "shipped digits.pt" if digits else "random"
    # Folder names say which weights they hold, so a --work folder is never reused for a retrained digits.pt.
    tag = f"{name}-{file_sha256(digits)[:12]}" if digits else f"{name}-random"
    folder, onnx_path = work / tag, work / f"{tag}.onnx"
    if not (folder / "model_index.json").exists():
        if name == "cifar10":
            save_random_pipeline(folder, "cifar10", 32, 3)
        elif digits:
            save_checkpoint_pipeline(str(digits), folder)
        else:
            save_random_pipeline(folder, "small", 16, 1)
    if not onnx_path.exists():
        t0 = time.time()
        # The digits checkpoint itself is exported (not the folder) so the manifest keeps its schedule exactly.
        onnx_from_checkpoint(str(digits) if digits else str(folder), onnx_path, max_batch=8, echo=lambda *_: None)
        log(f"exported {name} ({weights} weights) in {time.time() - t0:.0f}s")
    label = {"cifar10": "ddpm-cifar10-32 arch (35.7M)", "digits": "digits" if digits else "small (random)"}[name]
    return {"name": name, "label": label, "folder": str(folder), "onnx": str(onnx_path), "weights": weights,
            "checkpoint": str(digits) if digits else str(folder),
            "manifest": Manifest.read(onnx_path)}


# ---------------------------------------------------------------------------------------------- timing

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def open_backend(kind: str, onnx_path: str, threads):
    """Our backends by row name; returns (backend, None) or (None, reason it cannot run here)."""
    from ddpm_deploy.errors import UserError
    from ddpm_deploy.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from ddpm_deploy.runtime.backends.openvino_backend import OpenVinoBackend

    try:
        if kind == "onnxruntime-fp32":
            return OnnxRuntimeBackend(onnx_path, threads=threads), None
        precision = kind.split("-")[1]
        return OpenVinoBackend(onnx_path, precision=precision, threads=threads, cache_dir="",
                               static_shapes=not kind.endswith("-dynamic"),
                               rewrites=not kind.endswith("-as-exported")), None
    except UserError as e:
        return None, str(e)


OUR_ROWS = ("onnxruntime-fp32", "openvino-fp32", "openvino-bf16")
# Timed per eps call only, to check the backend's defaults: static shapes per batch size against the ONNX's
# dynamic batch axis, and the GroupNormalization rewrite against the graph as exported.
EPS_ONLY_ROWS = ("openvino-fp32-dynamic", "openvino-fp32-as-exported")


def eps_inputs(manifest, batch: int, seed: int = 0):
    c, h, w = manifest.image_shape
    rng = np.random.default_rng(seed)
    T = manifest.schedule.T
    return rng.standard_normal((batch, c, h, w), dtype=np.float32), np.full((batch,), T // 2, np.float32)


def chain_ms_per_step(sample, steps: int) -> dict:
    """Whole sampling runs (DDPM, then DDIM) of `steps` steps, each once: total time / steps."""
    out = {}
    for sampler in ("ddpm", "ddim"):
        t0 = time.perf_counter()
        sample(sampler)
        out[sampler] = 1000 * (time.perf_counter() - t0) / steps
    return out


def time_ours(kind: str, model: dict, batch: int, args) -> dict:
    """One backend: median ms of an eps call, then per-step ms of whole chains (the eps calls were the warm-up)."""
    from ddpm_deploy.runtime.pipeline import Pipeline

    backend, why = open_backend(kind, model["onnx"], args.threads)
    if backend is None:
        return {"error": why}
    with Pipeline(backend) as pipe:
        x, t = eps_inputs(backend.manifest, batch)
        row = {"eps": median_ms(lambda: backend.eps(x, t), args.warmup, args.reps)}
        if kind in EPS_ONLY_ROWS:
            return row
        row.update(chain_ms_per_step(lambda s: pipe.sample(batch, seed=0, sampler=s, steps=args.chain_steps,
                                                           output="float"), args.chain_steps))
        if kind.startswith("openvino"):
            row["config"] = backend.config
            row["compiled_batches"] = backend.compiled_batches
    return row


def time_diffusers(model: dict, batch: int, args) -> dict:
    """The baseline: the same UNet in torch eager (one call), and DDPMPipeline / DDIMPipeline over the same steps."""
    import torch
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline

    ddpm = DDPMPipeline.from_pretrained(model["folder"])
    ddim = DDIMPipeline(unet=ddpm.unet, scheduler=DDIMScheduler.from_config(ddpm.scheduler.config))
    for pipe in (ddpm, ddim):
        pipe.set_progress_bar_config(disable=True)
    xt, tt = (torch.from_numpy(a) for a in eps_inputs(model["manifest"], batch))
    with torch.inference_mode():
        row = {"eps": median_ms(lambda: ddpm.unet(xt, tt), args.warmup, args.reps)}

    def sample(sampler):
        pipe = ddpm if sampler == "ddpm" else ddim
        pipe(batch_size=batch, generator=torch.Generator().manual_seed(0), num_inference_steps=args.chain_steps,
             output_type="np")

    row.update(chain_ms_per_step(sample, args.chain_steps))
    return row


def time_all(model: dict, batch: int, args) -> dict:
    rows = {kind: time_ours(kind, model, batch, args) for kind in OUR_ROWS + EPS_ONLY_ROWS}
    rows["diffusers"] = time_diffusers(model, batch, args)
    return rows


# ---------------------------------------------------------------------------------------------- bf16 verify

def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """Images in [-1, 1]: peak-to-peak 2."""
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(4.0 / mse)


def bf16_verify(model: dict, args) -> dict:
    """bf16 against fp32 on OpenVINO: max|Δeps| over t (every model), and for models in --psnr-models the PSNR
    of DDIM final samples from the same noise, judged by the verify tolerances."""
    from ddpm_deploy.runtime.pipeline import Pipeline
    from ddpm_deploy.tolerances import VERIFY_REDUCED_EPS_MAX_ABS, VERIFY_REDUCED_X0_MIN_PSNR_DB

    bf16, why = open_backend("openvino-bf16", model["onnx"], args.threads)
    if bf16 is None:
        out = {"error": why}
        if args.bf16_proxy and model["name"] in args.psnr_models:
            out["proxy_torch_autocast_bf16"] = bf16_proxy(model, args)
        return out
    fp32, _ = open_backend("openvino-fp32", model["onnx"], args.threads)
    with Pipeline(fp32) as p32, Pipeline(bf16) as p16:
        T = fp32.manifest.schedule.T
        x, _ = eps_inputs(fp32.manifest, 4, seed=1)
        ts = [np.full((4,), s, np.float32) for s in (0, T // 4, T // 2, T - 1)]
        out = {"eps_max_abs": max(float(np.abs(fp32.eps(x, t) - bf16.eps(x, t)).max()) for t in ts),
               "thresholds": {"eps_max_abs": VERIFY_REDUCED_EPS_MAX_ABS,
                              "x0_min_psnr_db": VERIFY_REDUCED_X0_MIN_PSNR_DB}}
        if model["name"] not in args.psnr_models:
            return out
        kw = dict(seed=0, sampler="ddim", steps=min(args.psnr_steps, T), output="float")
        a, b = p32.sample(args.psnr_n, **kw), p16.sample(args.psnr_n, **kw)
    psnr = psnr_db(b, a)
    out.update(x0_psnr_db=psnr, x0_max_abs=float(np.abs(a - b).max()), images=args.psnr_n, ddim_steps=kw["steps"],
               finite=bool(np.isfinite(b).all()),
               passes_verify=bool(out["eps_max_abs"] <= VERIFY_REDUCED_EPS_MAX_ABS
                                  and psnr >= VERIFY_REDUCED_X0_MIN_PSNR_DB))
    return out


def bf16_proxy(model: dict, args) -> dict:
    """Where OpenVINO has no bf16 here: PSNR of torch CPU autocast bf16 against torch fp32 through our sampler.
    Only an indication: autocast rounds conv/linear inputs and outputs to bf16, OpenVINO's bf16 mode keeps more
    of the graph in bf16, so OpenVINO's figure can be lower."""
    import torch

    from ddpm_deploy.nn.torch_backend import TorchBackend
    from ddpm_deploy.runtime.pipeline import Pipeline

    class AutocastBF16(TorchBackend):
        def eps(self, x_t, t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return super().eps(x_t, t)

    kw = dict(seed=0, sampler="ddim", output="float", batch_size=args.psnr_n)
    with Pipeline(TorchBackend(model["checkpoint"])) as p32, Pipeline(AutocastBF16(model["checkpoint"])) as p16:
        kw["steps"] = min(args.psnr_steps, p32.schedule.T)
        a, b = p32.sample(args.psnr_n, **kw), p16.sample(args.psnr_n, **kw)
    return {"x0_psnr_db": psnr_db(b, a), "x0_max_abs": float(np.abs(a - b).max()), "images": args.psnr_n,
            "ddim_steps": kw["steps"]}


# ---------------------------------------------------------------------------------------------- report

def ratio(num, den):
    return None if num is None or den is None else num / den


def ratios(rows: dict) -> dict:
    """Speed-ups of each OpenVINO row (> 1: faster) per eps call and per whole-chain step, keyed
    "<what>: <row> vs <baseline>" with baselines onnxruntime-fp32 and diffusers."""
    out = {}
    for row in (k for k in rows if k.startswith("openvino")):
        for what in ("eps", "ddpm", "ddim"):
            for base in ("onnxruntime-fp32", "diffusers"):
                out[f"{what}: {row} vs {base}"] = ratio(rows[base].get(what), rows[row].get(what))
    return out


def target_checks(r: dict) -> dict:
    """The issue's targets (None where a row could not run): per eps call and per DDPM/DDIM chain step."""
    def at_least(row, base, bound, whats=("eps", "ddpm", "ddim")):
        vals = [r[f"{w}: {row} vs {base}"] for w in whats]
        return None if any(v is None for v in vals) else all(v >= bound for v in vals)

    return {"fp32 >= onnxruntime": at_least("openvino-fp32", "onnxruntime-fp32", TARGETS["ov_fp32_vs_ort"]),
            "bf16 >= 1.8x onnxruntime": at_least("openvino-bf16", "onnxruntime-fp32", TARGETS["ov_bf16_vs_ort"]),
            "bf16 >= 2.5x diffusers": at_least("openvino-bf16", "diffusers", TARGETS["ov_bf16_vs_diffusers"],
                                               ("ddpm", "ddim"))}


def fmt(v, unit=""):
    if v is None:
        return "n/a"
    return f"{v:.2f}{unit}"


def markdown(report: dict) -> str:
    m, v = report["machine"], report["versions"]
    lines = [f"OpenVINO CPU benchmark: {m['cpu']}, {m['cores']} cores, load {m['loadavg_1min']:.1f}; openvino "
             f"{v['openvino']}, onnxruntime {v['onnxruntime']}, torch {v['torch']}, diffusers {v['diffusers']}. "
             f"ms: eps = one call (median), ddpm/ddim = whole chain / steps. Run took {report['seconds']:.0f}s.", ""]
    names = {"onnxruntime-fp32": "onnxruntime fp32", "openvino-fp32": "OpenVINO fp32",
             "openvino-bf16": "OpenVINO bf16", "openvino-fp32-dynamic": "OpenVINO fp32, dynamic batch",
             "openvino-fp32-as-exported": "OpenVINO fp32, no GroupNorm rewrite",
             "diffusers": "diffusers (torch)"}
    lines += ["| model | batch | row | eps ms | ddpm ms/step | ddim ms/step | vs onnxruntime (eps/ddpm/ddim) "
              "| vs diffusers (eps/ddpm/ddim) |", "|---|---|---|---|---|---|---|---|"]
    for run in report["runs"]:
        for kind, row in run["rows"].items():
            if "error" in row:
                lines.append(f"| {run['model']} | {run['batch']} | {names[kind]} | n/a | n/a | n/a | | |")
                continue
            rel = lambda base: "" if not kind.startswith("openvino") else " / ".join(  # noqa: E731
                fmt(run["ratios"][f"{w}: {kind} vs {base}"], "x") for w in ("eps", "ddpm", "ddim"))
            lines.append(f"| {run['model']} | {run['batch']} | {names[kind]} | {fmt(row['eps'])} | "
                         f"{fmt(row.get('ddpm'))} | {fmt(row.get('ddim'))} | {rel('onnxruntime-fp32')} | {rel('diffusers')} |")
    lines += ["", "| model | bf16 vs fp32: max abs d-eps | x0 PSNR dB (DDIM) | passes verify |", "|---|---|---|---|"]
    for name, r in report["bf16_verify"].items():
        if "error" in r:
            px = r.get("proxy_torch_autocast_bf16")
            proxy = f"proxy (torch autocast bf16): {px['x0_psnr_db']:.1f} ({px['images']} images, " \
                    f"{px['ddim_steps']} steps)" if px else "n/a"
            lines.append(f"| {name} | n/a | {proxy} | n/a |")
            continue
        psnr = f"{r['x0_psnr_db']:.1f} ({r['images']} images, {r['ddim_steps']} steps)" if "x0_psnr_db" in r else "-"
        lines.append(f"| {name} | {r['eps_max_abs']:.4f} | {psnr} | {r.get('passes_verify', '-')} |")
    errors = sorted({row["error"] for run in report["runs"] for row in run["rows"].values() if "error" in row}
                    | {r["error"] for r in report["bf16_verify"].values() if "error" in r})
    if errors:
        lines += [""] + [f"n/a: {e}" for e in errors]
    return "\n".join(lines)


def environment(threads) -> dict:
    import diffusers
    import onnxruntime
    import openvino
    import torch

    diffusers.utils.logging.set_verbosity_error()  # no accelerate hints or loading bars between the figures
    diffusers.utils.logging.disable_progress_bar()
    if threads:
        torch.set_num_threads(threads)
    core = openvino.Core()
    return {"machine": {"cpu": core.get_property("CPU", "FULL_DEVICE_NAME"), "cores": os.cpu_count(),
                        "platform": platform.platform(),
                        "openvino_capabilities": list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
                        "torch_threads": torch.get_num_threads(), "threads_option": threads,
                        "loadavg_1min": os.getloadavg()[0]},
            "versions": {"openvino": openvino.__version__.split("-")[0], "onnxruntime": onnxruntime.__version__,
                         "torch": torch.__version__, "diffusers": diffusers.__version__}}


def run(args) -> dict:
    report = {**environment(args.threads), "settings": {k: v for k, v in vars(args).items() if k != "json"},
              "runs": [], "bf16_verify": {}}
    t0 = time.time()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="ov_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        for name in args.models:
            model = prepare_model(name, work)
            for batch in args.batches:
                log(f"{model['label']}: batch {batch}")
                rows = time_all(model, batch, args)
                r = ratios(rows)
                report["runs"].append({"model": model["label"], "weights": model["weights"], "batch": batch,
                                       "rows": rows, "ratios": r, "targets": target_checks(r)})
            log(f"{model['label']}: bf16 verify")
            report["bf16_verify"][model["label"]] = bf16_verify(model, args)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    report["machine"]["loadavg_1min_end"] = os.getloadavg()[0]
    report["seconds"] = time.time() - t0
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    report = run(args)
    text = json.dumps(report, indent=2, default=float)
    print(text)
    print()
    print(markdown(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
