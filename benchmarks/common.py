"""What the benchmark scripts share: the models they time (written and exported once, reused while the weights are
the same), the machine facts, the targets and Markdown of bench_cpu.py's modes, and the one report writer
(ddpm_deploy.bench.write_report: JSON and Markdown, written atomically). Scripts run as `python benchmarks/NAME.py`
import it from this folder (sys.path[0])."""

from __future__ import annotations

import json
import sys
import time
from importlib import resources
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results"
MAX_BATCH = 8
MODELS = ("shipped", "cifar10")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def shipped_checkpoint(artifacts: Path) -> tuple[str, str]:
    """(checkpoint, note): the shipped digits model, or preset "small" with random weights when it is absent."""
    shipped = Path(str(resources.files("ddpm_deploy") / "models" / "digits.pt"))
    if shipped.is_file():
        return str(shipped), "shipped digits model (ddpm_deploy/models/digits.pt)"
    folder = random_pipeline(artifacts / "small-random", "small", image_size=16, channels=1)
    return str(folder), ("ddpm_deploy/models/digits.pt not present: preset 'small' (the shipped architecture, "
                         "1x16x16) with random weights")


def random_pipeline(folder: Path, preset: str, image_size: int, channels: int) -> Path:
    """A diffusers DDPM pipeline folder with seeded random UNet weights and DDPMScheduler's defaults
    (linear betas 1e-4..0.02, T=1000, fixed_small, clip_sample), written once."""
    if (folder / "model_index.json").is_file():
        return folder
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from ddpm_deploy.config import unet_config

    torch.manual_seed(0)
    unet = UNet2DModel.from_config(unet_config(preset, sample_size=image_size, channels=channels))
    log(f"writing {folder} ({sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M parameters, random weights)")
    DDPMPipeline(unet, DDPMScheduler()).save_pretrained(str(folder))
    return folder


def checkpoint_for(name: str, artifacts: Path) -> tuple[str, str]:
    """(checkpoint, note) of a model by name: "shipped", "cifar10" (the google/ddpm-cifar10-32 architecture with
    random weights: speed does not depend on them) or "small"."""
    if name == "shipped":
        return shipped_checkpoint(artifacts)
    size, channels = {"cifar10": (32, 3), "small": (16, 1)}[name]
    folder = random_pipeline(artifacts / f"{name}-random", name, image_size=size, channels=channels)
    arch = "google/ddpm-cifar10-32 architecture (35.7 M parameters)" if name == "cifar10" else "1x16x16"
    return str(folder), f"preset '{name}' ({arch}) with random weights"


def exported(checkpoint: str, out: Path, fp16: bool = False, max_batch: int = MAX_BATCH) -> str:
    """`out`, exported from `checkpoint` (parity-checked; fp16 with the precision audit) unless it already holds an
    export of the same weights, precision and at least this batch range."""
    from ddpm_deploy.errors import UserError
    from ddpm_deploy.export import onnx_from_checkpoint
    from ddpm_deploy.artifact.manifest import Manifest
    from ddpm_deploy.nn import load_checkpoint

    sha = load_checkpoint(checkpoint).sha256
    if out.is_file():
        try:
            m = Manifest.read(out)
            if m.source_sha256 == sha and m.max_batch >= max_batch and (m.dtype == "float16") == fp16:
                return str(out)
        except UserError:
            pass
    log(f"exporting {checkpoint} -> {out} (once; {'fp16' if fp16 else 'fp32'}, batch 1..{max_batch})")
    t0 = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx_from_checkpoint(checkpoint, out, fp16=fp16, max_batch=max_batch, echo=lambda *_: None)
    log(f"  done in {time.time() - t0:.0f}s")
    return str(out)


def prepare(name: str, artifacts: Path, dtypes=("fp32",), max_batch: int = MAX_BATCH) -> tuple[str, list[str], str]:
    """(checkpoint, [ONNX per dtype], note) for one model, under `artifacts`."""
    ckpt, note = checkpoint_for(name, artifacts)
    onnx = [exported(ckpt, artifacts / name / f"eps.{d}.onnx", d == "fp16", max_batch) for d in dtypes]
    return ckpt, onnx, note


def machine() -> dict:
    """What the figures depend on: CPU, the flags that pick kernels, usable cores, load average now."""
    from ddpm_deploy.bench import default_threads
    from ddpm_deploy.bench.report import cpu_flags, cpu_name, loadavg

    return {"cpu": cpu_name(), "cpu_flags": cpu_flags(), "cores": default_threads(), "loadavg_1m": loadavg()}


def versions(*names: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def write_outputs(report: dict, out: Path, stem: str, markdown: str) -> None:
    """OUT/STEM.json and OUT/STEM.md (the one report writer), and the Markdown on stdout."""
    from ddpm_deploy.bench import write_report

    out.mkdir(parents=True, exist_ok=True)
    write_report(report, str(out / f"{stem}.json"), str(out / f"{stem}.md"), markdown)
    print(markdown)
    log(f"wrote {out / stem}.json and .md")


# ---------------------------------------------------------------------------------------------------- reports
# The speed targets: auto vs diffusers (x), the loop's overhead (fraction), OpenVINO rows (x).
TARGETS = {"shipped": 3.0, "cifar10": 1.6, "max_overhead": 0.02,
           "ov_fp32_vs_ort": 1.0, "ov_bf16_vs_ort": 1.8, "ov_bf16_vs_diffusers": 2.5}


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, each with the measured value, whether it is met, and the machine's load around it."""
    out = []
    for r in rows:
        if r["runtime_backend"] != "auto" or r["batch"] != 1:
            continue
        d_threads = [x["threads"] for x in rows if x["runtime_backend"] == "diffusers" and x["model"] == r["model"]]
        d_note = "faster of 1 thread / all" if len(d_threads) > 1 else f"on {d_threads[0]} thread(s)"
        out.append({"target": f"{r['model']}: auto ({r['backend']} {r['threads']}t) vs diffusers ({d_note}), "
                              f"{r['sampler'].upper()} {r['steps']}, batch 1",
                    "want": f">= {TARGETS[r['model']]:.1f}x", "got": f"{r['speedup_vs_diffusers']:.2f}x",
                    "met": r["speedup_vs_diffusers"] >= TARGETS[r["model"]], "load": r["load"]})
        if r["model"] == "shipped":
            out.append({"target": f"shipped: loop overhead of auto ({r['backend']}), batch 1",
                        "want": f"<= {100 * TARGETS['max_overhead']:.0f}%", "got": f"{100 * r['overhead']:.2f}%",
                        "met": r["overhead"] <= TARGETS["max_overhead"], "load": r["load"]})
        host = next((x for x in rows if x["runtime_backend"] == "host-loop" and x["model"] == r["model"]), None)
        if host is not None:  # not a target of the issue: shows the overhead fell because time was saved
            gain = host["chain_ms"] / r["chain_ms"]
            out.append({"target": f"{r['model']}: whole chain, update in the engine vs the numpy host loop (same "
                                  f"backend)", "want": "(information)", "got": f"{gain:.3f}x", "met": None,
                        "load": r["load"]})
    return out


def targets_markdown(items: list[dict]) -> str:
    lines = ["| target | want | measured | met | load average (1 min) before / after |", "|---|---|---|---|---|"]
    met = {True: "yes", False: "NO", None: "–"}
    lines += [f"| {t['target']} | {t['want']} | {t['got']} | {met[t['met']]} | {t['load']} |" for t in items]
    return "\n".join(lines) + "\n"


def render(report: dict) -> str:
    meta, facts = report["meta"], report["meta"]["machine"]
    head = [f"# CPU benchmark ({'quick run, not for figures' if meta['quick'] else 'full run'})", "",
            f"{facts['processor']} ({', '.join(facts['cpu_flags'])}), {facts['cpus_usable']} usable cores, "
            f"{meta['threads']} threads for diffusers and the onnxruntime row, auto's own choice for its row; "
            f"{meta['time']}; {json.dumps(meta['versions'])}.", ""]
    for m, v in report["models"].items():
        head += [f"- **{m}**: {v['note']}; {v['sampler'].upper()} {v['steps']} steps per chain, batch 1 (diffusers: "
                 f"num_inference_steps={v['steps']}); load average {v['load']}.", "",
                 "```", v["auto"]["table_text"], "```", ""]
    from ddpm_deploy.bench import markdown_table

    body = markdown_table(report).split("\n", 2)[2]  # drop the one-steps-count header line: steps differ by model
    notes = ["", "ms/step: median step (engine call + host work); engine ms: median raw network call; images/s at "
             "the timed number of steps; loop overhead = (whole chain - sum of engine calls) / whole chain; "
             "vs diffusers: the faster diffusers run's whole-chain time (1 thread or all) / ours, same weights, "
             "sampler, steps and batch. "
             f"{meta['memory']}"]
    return "\n".join(head + [targets_markdown(report["targets"]), body] + notes) + "\n"


def ab_markdown(report: dict) -> str:
    s, m = report["settings"], report["machine"]
    lines = [f"DDPM {s['steps'] or 'T'} steps, batch 1, {s['threads']} thread(s), {s['rounds']} rounds x {s['reps']} "
             f"chains per loop; {m['cpu']}; load average {m['loadavg_1m']} at start, {m['loadavg_1m_at_end']} at end.",
             "", "| model | backend | fused step: chain ms | overhead | numpy host loop: chain ms | overhead "
             "| host / fused (range) |", "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lo, hi = r["ratio_range"]
        lines.append(f"| {r['model']} | {r['config']} | {r['fused_ms']:.1f} | {100 * r['fused_overhead']:.2f}% | "
                     f"{r['host_ms']:.1f} | {100 * r['host_overhead']:.2f}% | {r['ratio']:.3f}x ({lo:.3f}-{hi:.3f}) |")
    lines += [f"\n{name} skipped: {why}" for name, why in report["skipped"].items()]
    return "\n".join(lines) + "\n"




def ov_ratios(rows: dict) -> dict:
    """Speed-ups of each OpenVINO row (> 1: faster) per eps call and per chain step, keyed
    "<what>: <row> vs <baseline>" with baselines onnxruntime-fp32 and diffusers."""
    def ratio(base, row, what):
        num, den = rows[base].get(what), rows[row].get(what)
        return None if num is None or den is None else num / den

    return {f"{w}: {row} vs {base}": ratio(base, row, w) for row in rows if row.startswith("openvino")
            for w in ("eps", "ddpm", "ddim") for base in ("onnxruntime-fp32", "diffusers")}


def ov_targets(r: dict) -> dict:
    """The issue's targets (None where a row could not run): per eps call and per DDPM/DDIM chain step."""
    def at_least(row, base, bound, whats=("eps", "ddpm", "ddim")):
        vals = [r[f"{w}: {row} vs {base}"] for w in whats]
        return None if any(v is None for v in vals) else all(v >= bound for v in vals)

    return {"fp32 >= onnxruntime": at_least("openvino-fp32", "onnxruntime-fp32", TARGETS["ov_fp32_vs_ort"]),
            "bf16 >= 1.8x onnxruntime": at_least("openvino-bf16", "onnxruntime-fp32", TARGETS["ov_bf16_vs_ort"]),
            "bf16 >= 2.5x diffusers": at_least("openvino-bf16", "diffusers", TARGETS["ov_bf16_vs_diffusers"],
                                               ("ddpm", "ddim"))}


def ov_markdown(report: dict) -> str:
    m, v = report["machine"], report["versions"]
    fmt = lambda x, unit="": "n/a" if x is None else f"{x:.2f}{unit}"  # noqa: E731
    lines = [f"OpenVINO CPU benchmark: {m['cpu']} ({', '.join(m['cpu_flags'])}), {m['cores']} cores, load average "
             f"{m['loadavg_1m']} at start, {m['loadavg_1m_at_end']} at end; {json.dumps(v)}. ms: eps = one call "
             f"(median), ddpm/ddim = whole chain / steps. Run took {report['seconds']:.0f}s.", "",
             "| model | batch | row | eps ms | ddpm ms/step | ddim ms/step | vs onnxruntime (eps/ddpm/ddim) "
             "| vs diffusers (eps/ddpm/ddim) |", "|---|---|---|---|---|---|---|---|"]
    for run in report["runs"]:
        for kind, row in run["rows"].items():
            rel = lambda base: "" if not kind.startswith("openvino") else " / ".join(  # noqa: E731
                fmt(run["ratios"][f"{w}: {kind} vs {base}"], "x") for w in ("eps", "ddpm", "ddim"))
            lines.append(f"| {run['model']} | {run['batch']} | {kind} | {fmt(row.get('eps'))} | "
                         f"{fmt(row.get('ddpm'))} | {fmt(row.get('ddim'))} | {rel('onnxruntime-fp32')} | "
                         f"{rel('diffusers')} |")
    lines += ["", "| model | bf16 vs fp32: max abs d-eps | x0 PSNR dB (DDIM) | passes verify |", "|---|---|---|---|"]
    for name, r in report["bf16_verify"].items():
        psnr = f"{r['x0_psnr_db']:.1f} ({r['images']} images, {r['ddim_steps']} steps)" if "x0_psnr_db" in r else "-"
        lines.append(f"| {name} | {fmt(r.get('eps_max_abs'))} | {psnr} | {r.get('passes_verify', 'n/a')} |")
    errors = sorted({row["error"] for run in report["runs"] for row in run["rows"].values() if "error" in row}
                    | {r["error"] for r in report["bf16_verify"].values() if "error" in r})
    return "\n".join(lines + [""] + [f"n/a: {e}" for e in errors]) + "\n"
