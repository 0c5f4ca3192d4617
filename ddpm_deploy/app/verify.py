"""Whole-chain verification: the deployed chain against the PyTorch reference from the same x_T and step noise.

Per step it reports the teacher-forced error in x_{t-1}: one step taken from the reference's own state (x_t and, for
multistep samplers, the history) with the deployed engine's output, against the reference's step, so it measures
the engine alone and in the units that matter to the chain; also the raw eps error (reported, not judged) and the
drift between the two free-running chains. Then the first step whose x error crosses tolerance, the final x_0
error and PSNR, and a verdict on the x errors and the PSNR.
"""
# matplotlib (the torch extra) and tqdm (50 ms to import) are imported by the functions that use them.

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np

from ..loop.run import StepInfo
from ..errors import NonFiniteError, UserError
from ..files import write_bytes_atomic
from ..images import grid, psnr, to_uint8  # psnr: core, so the runtime's auto check uses it too
from ..artifact.manifest import Manifest
from ..sampling.noise import request_noise
from ..sampling.spec import SamplerSpec, as_spec
from ..sampling.step import eps_gain, step, step_with_history
from ..tolerances import (VERIFY_FP32_EPS_LEVEL, VERIFY_FP32_X0_MIN_PSNR_DB, VERIFY_FP32_X_STEP_MAX_ABS,
                          VERIFY_INT8_X_STEP_MAX_ABS, VERIFY_REDUCED_EPS_LEVEL, VERIFY_REDUCED_X0_MIN_PSNR_DB,
                          VERIFY_REDUCED_X_STEP_MAX_ABS)


def check_same_model(deployed: Manifest, reference: Manifest) -> None:
    """Refuse an engine and a checkpoint that are not the same model (shape, schedule or source hash)."""
    problems = deployed.compatibility_problems(reference)
    if problems:
        raise UserError(f"engine and checkpoint describe different models ({'; '.join(problems)}): pass the "
                        "checkpoint the engine was exported from")
    src = deployed.source_sha256
    reference_sha256 = reference.source_sha256
    if reference_sha256 and src and src != reference_sha256:
        raise UserError(f"engine was exported from checkpoint sha256 {src[:12]}…, not this one "
                        f"({reference_sha256[:12]}…): pass the matching checkpoint or re-export")


def tolerances_for(manifest: Manifest, backend_name: str) -> dict:
    """The verdict's bounds: a step's x_{t-1} bound is max(x_step_max_abs, eps_level * that step's eps gain)
    (`step_bounds`), the final x_0 needs x0_min_psnr_db. An int8 file is judged by the eps level its own export
    gate accepted (recorded in its manifest) and the gate's chain PSNR: one criterion for the gate and verify."""
    if manifest.dtype == "int8":
        gate = manifest.precision or {}
        return {"x_step_max_abs": VERIFY_INT8_X_STEP_MAX_ABS, "eps_level": float(gate["eps_bound"]),
                "x0_min_psnr_db": float(gate["x0_min_psnr_db"]),
                "class": "int8 (eps level and x_0 PSNR from the export gate)"}
    reduced = manifest.dtype == "float16" or "bf16" in backend_name
    if reduced:
        return {"x_step_max_abs": VERIFY_REDUCED_X_STEP_MAX_ABS, "eps_level": VERIFY_REDUCED_EPS_LEVEL,
                "x0_min_psnr_db": VERIFY_REDUCED_X0_MIN_PSNR_DB, "class": "reduced precision (fp16/bf16)"}
    return {"x_step_max_abs": VERIFY_FP32_X_STEP_MAX_ABS, "eps_level": VERIFY_FP32_EPS_LEVEL,
            "x0_min_psnr_db": VERIFY_FP32_X0_MIN_PSNR_DB, "class": "fp32"}


SHORT_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def precisions_of(pipe) -> tuple[str, str]:
    """(file precision, compute precision). OpenVINO computes in its inference-precision hint (fp32 or bf16) whatever
    the file's types; onnxruntime, TensorRT and PyTorch compute in the file's (checkpoint's) own types."""
    file = SHORT_DTYPES.get(pipe.manifest.dtype, pipe.manifest.dtype)
    if pipe.backend.name.startswith("torch"):
        return file, "fp32"  # the reference's UNet runs in fp32 eager even where its weights are stored in fp16
    if file == "int8":
        return file, "int8"  # quantized layers in int8 (the rest in OpenVINO's hint), judged by the int8 criterion
    return file, getattr(pipe.backend, "precision", None) or file


def judged_config(pipe, named: str | None = None, threads: int | None = None) -> dict:
    """What a verify / eval run judges and why: backend, file and compute precision, threads, and whether backend
    auto chose it (measured now or cached, with its reason), --backend named it, or it is the file's own default.
    `precision` is the compute precision (auto's table labels a candidate by it)."""
    kind = pipe.backend.name.split("-")[0]
    file, compute = precisions_of(pipe)
    runs = {"backend": kind, "backend_name": pipe.backend.name, "file_precision": file, "precision": compute,
            "threads": threads}
    choice = getattr(pipe, "backend_choice", None)
    if choice is not None:
        how = "cached" if choice.cached else "measured now"
        return {**runs, "threads": choice.threads,
                "why": f"backend auto's choice for this file on this machine ({how}: {choice.reason})"}
    if named:
        why = f"named by --backend {named}"
    elif kind == "torch":
        why = "the PyTorch reference on the checkpoint"
    else:
        why = f"the default backend for {Path(pipe_path(pipe)).suffix or 'these'} files"
    judged = {**runs, "why": why}
    if compute == "int8":
        tol = tolerances_for(pipe.manifest, pipe.backend.name)
        judged["criterion"] = (f"int8 criterion: per step max({tol['x_step_max_abs']:g}, eps {tol['eps_level']:g} "
                               f"x the step's eps gain), x_0 >= {tol['x0_min_psnr_db']:g} dB, from the export gate")
    return judged


def pipe_path(pipe) -> str:
    return getattr(pipe.backend, "path", "") or ""


def runs_phrase(j: dict) -> str:
    """What runs, in the one vocabulary of verify's and eval's lines: backend, threads, file and compute precision
    (e.g. `onnxruntime-cpu 1 thread, fp16 file computed in fp16`)."""
    n = j.get("threads")
    threads = f" {n} thread{'s' * (n != 1)}" if n else ""
    what = "checkpoint" if j["backend"] == "torch" else "file"
    file = j.get("file_precision", j["precision"])
    return f"{j.get('backend_name', j['backend'])}{threads}, {file} {what} computed in {j['precision']}"


def judged_line(j: dict) -> str:
    """verify / eval's first line: what is judged, why, and how to judge another configuration."""
    other = ("--backend openvino [--precision bf16]" if j["backend"] == "onnxruntime" else
             "--backend onnxruntime for the exported numerics")
    if j["precision"] == "int8":
        other = "--engine MODEL.onnx for the fp32 export"
    why = j["why"].split(" (")[0] if j["why"].startswith("backend auto") else j["why"]
    how = "cached" if "(cached" in j["why"] else ("measured" if j["why"].startswith("backend auto") else "")
    criterion = f" ({j['criterion']})" if j.get("criterion") else ""
    return (f"judging {runs_phrase(j)}{criterion}: {why}{f' ({how})' if how else ''}; "
            f"pass --backend NAME to judge another (e.g. {other})")


def step_bounds(plan, tol: dict) -> np.ndarray:
    """Per step k: the larger of the fixed floor and what an eps error at the export gate's level does to x_{t-1}
    through that step's coefficients (see tolerances.VERIFY_*_EPS_LEVEL)."""
    return np.maximum(tol["x_step_max_abs"], tol["eps_level"] * eps_gain(plan.coefs))


class _Recorder:
    """Collects x_t, model output, x_prev and (multistep plans) the step's input history from a Pipeline callback."""

    def __init__(self, steps: int, n: int):
        self.x_t = [None] * steps
        self.out = [None] * steps
        self.x_prev = [None] * steps
        self.hist = [None] * steps
        self.n = n

    def __call__(self, info: StepInfo) -> None:
        k, start = info.k, info.start
        for store, value in ((self.x_t, info.x_t), (self.out, info.model_output), (self.x_prev, info.x_prev),
                             (self.hist, info.hist)):
            if value is None:
                continue
            if store[k] is None:
                store[k] = np.empty((self.n, *value.shape[1:]), dtype=np.float32)
            store[k][start:start + len(value)] = value


def forced_step(plan, k: int, x_t: np.ndarray, out: np.ndarray, z: np.ndarray, hist) -> np.ndarray:
    """x_{t-1} of step k from a given state (x_t, and the history for multistep plans) and network output."""
    if plan.uses_history:
        return step_with_history(x_t, out, z, plan.coefs[k], hist)[0]
    return step(x_t, out, z, plan.coefs[k])


def verify_chain(deployed, reference, *, spec: SamplerSpec | None = None, sampler: str | None = None,
                 steps: int | None = None, eta: float = 0.0, order: int | None = None, variant: str | None = None,
                 spacing: str | None = None, n: int = 8, seed: int = 0, progress: bool = False) -> dict:
    """Run both chains from identical noise; returns the report dict (plus arrays under '_arrays').
    `spec`: the SamplerSpec (or its fields as separate keywords; sampler None: the deployed pipeline's default).
    `progress`: tqdm bars (stderr) for the two chains.

    The per-step verdict is teacher-forced in x: from the reference's state (x_t and, for multistep samplers, its
    history) one step is taken with the deployed engine's output and compared with the reference's own step.
    That is what an engine error does to the chain; raw eps errors are reported too but judge nothing (near t = 0
    eps enters x_0 scaled by sqrt(1 - a-bar_t) ~ 0.01, so a large eps error there is harmless).
    """
    if n <= 0:
        raise UserError(f"-n must be positive, got {n}")
    spec = as_spec(spec, sampler=sampler, steps=steps, eta=eta, order=order, variant=variant, spacing=spacing)
    plan = deployed.plan(spec=spec)
    spec = spec.with_default(plan.sampler)  # None: the pipeline's default (a distilled student's own grid)
    x_T, z = request_noise(seed, n, deployed.image_shape, plan.steps)
    c = deployed.image_shape[0]
    ref = _Recorder(plan.steps, n)
    x0_ref = reference.sample(n, spec=spec, x_T=x_T, step_noise=z, output="float", callback=ref, progress=progress)
    dep = _Recorder(plan.steps, n)
    failure = None
    try:
        x0_dep = deployed.sample(n, spec=spec, x_T=x_T, step_noise=z, output="float", callback=dep,
                                 progress=progress)
    except NonFiniteError as e:
        failure, x0_dep = str(e), np.full_like(x0_ref, np.nan)
    tol = tolerances_for(deployed.manifest, deployed.backend.name)
    bounds = step_bounds(plan, tol)
    rows, first = [], None
    from tqdm import tqdm

    for k, t in enumerate(tqdm(plan.timesteps, desc="teacher-forced steps", unit="step", leave=False,
                               disable=not progress)):
        forced = deployed.backend.eps_batched(ref.x_t[k], np.full(n, t, np.float32))
        err = np.abs(forced[:, :c].astype(np.float64) - ref.out[k][:, :c])
        # one step from the reference's state with the deployed output vs with the reference's own output
        x_dep = forced_step(plan, k, ref.x_t[k], forced, z[k], ref.hist[k])
        x_ref = forced_step(plan, k, ref.x_t[k], ref.out[k], z[k], ref.hist[k])
        x_err = np.abs(x_dep.astype(np.float64) - x_ref)
        finite = bool(np.isfinite(err).all() and np.isfinite(x_err).all())
        x_max = float(x_err.max()) if finite else float("inf")
        drift = (np.abs(dep.x_prev[k] - ref.x_prev[k]) if dep.x_prev[k] is not None
                 else np.full(1, np.inf))
        rows.append({"k": k, "t": int(t), "x_step_max_abs": x_max, "x_step_bound": float(bounds[k]),
                     "x_step_mean_abs": float(x_err.mean()) if finite else float("inf"),
                     "eps_max_abs": float(err.max()) if finite else float("inf"),
                     "eps_mean_abs": float(err.mean()) if finite else float("inf"),
                     "x_drift_max_abs": float(np.max(drift)), "x_drift_mean_abs": float(np.mean(drift))})
        if first is None and not x_max <= bounds[k]:
            first = {"k": k, "t": int(t), "x_step_max_abs": x_max, "x_step_bound": float(bounds[k]),
                     "eps_max_abs": rows[-1]["eps_max_abs"]}
    final_psnr = psnr(x0_dep, x0_ref) if np.isfinite(x0_dep).all() else float("-inf")
    reasons = []
    if failure:
        reasons.append(failure)
    if first is not None:
        reasons.append(f"teacher-forced x_(t-1) error {first['x_step_max_abs']:.3g} > {first['x_step_bound']:.3g} "
                       f"first at step {first['k']} (t={first['t']})")
    if final_psnr < tol["x0_min_psnr_db"]:
        reasons.append(f"final x_0 PSNR {final_psnr:.1f} dB < {tol['x0_min_psnr_db']:g} dB")
    report = {
        "verdict": "fail" if reasons else "pass", "reasons": reasons,
        "judged": judged_config(deployed),
        "deployed": {"backend": deployed.backend.name, "dtype": deployed.manifest.dtype,
                     "source": _source(deployed.manifest)},
        "reference": {"backend": reference.backend.name, "source": _source(reference.manifest)},
        "sampler": spec.sampler, "order": plan.order, "variant": plan.variant, "spacing": plan.spacing,
        "steps": plan.steps, "eta": spec.eta, "n": n, "seed": seed, "tolerances": tol,
        "first_divergent_step": first,
        "x_step_max_abs": max(r["x_step_max_abs"] for r in rows),
        "eps_max_abs": max(r["eps_max_abs"] for r in rows),
        "eps_mean_abs": float(np.mean([r["eps_mean_abs"] for r in rows])),
        "x0_max_abs": float(np.max(np.abs(x0_dep - x0_ref))) if np.isfinite(x0_dep).all() else float("inf"),
        "x0_psnr_db": final_psnr, "per_step": rows,
    }
    report["_arrays"] = {"x0_ref": x0_ref, "x0_dep": x0_dep}
    return report


def _source(m: Manifest) -> dict:
    return {"name": m.source, "sha256": m.source_sha256}


def summary_lines(report: dict) -> list[str]:
    r = report
    lines = [f"deployed {runs_phrase(r['judged'])} vs reference {r['reference']['backend']} (PyTorch fp32): "
             f"{_sampler_name(r)} {r['steps']} steps, n={r['n']}, seed={r['seed']}",
             f"  x_(t-1) per step (one deployed step from the reference's state): max {r['x_step_max_abs']:.3g} "
             f"(tolerance per step: max({r['tolerances']['x_step_max_abs']:g}, {r['tolerances']['eps_level']:g} x "
             f"the step's eps gain), {r['tolerances']['class']})",
             f"  raw eps per step (engine on reference x_t, not judged): max {r['eps_max_abs']:.3g}, "
             f"mean {r['eps_mean_abs']:.3g}",
             f"  x_t drift at the last step: max {r['per_step'][-1]['x_drift_max_abs']:.3g}",
             f"  final x_0: max |Δ| {r['x0_max_abs']:.3g}, PSNR {r['x0_psnr_db']:.1f} dB "
             f"(needs >= {r['tolerances']['x0_min_psnr_db']:g})"]
    fd = r["first_divergent_step"]
    lines.append("  first divergent step: " + ("none" if fd is None else f"k={fd['k']} (t={fd['t']})"))
    lines.append(f"verdict: {r['verdict'].upper()}" + (f" ({'; '.join(r['reasons'])})" if r["reasons"] else ""))
    return lines


def _sampler_name(r: dict) -> str:
    extra = [f"order {r['order']}"] if r.get("order") else []
    extra += [r["variant"]] if r.get("variant") else []
    return r["sampler"] + (f" ({', '.join(extra)})" if extra else "")


def report_json(report: dict) -> str:
    clean = {k: v for k, v in report.items() if not k.startswith("_")}
    return json.dumps(clean, indent=2, allow_nan=True)  # inf (e.g. a non-finite step) is written as Infinity


def difference_image(x0_dep: np.ndarray, x0_ref: np.ndarray) -> tuple[np.ndarray, float]:
    """|x0_dep - x0_ref| scaled to its own max (white = max) in [-1, 1] like the images, and that max: a 1e-6
    difference is as visible as a 1.0 one, and the printed max says which it is."""
    diff = np.abs(x0_dep.astype(np.float64) - x0_ref)
    diff_max = float(diff.max())
    return (diff / diff_max * 2 - 1 if diff_max > 0 else np.full_like(diff, -1.0)), diff_max


def save_plot(report: dict, path) -> None:
    """The judged error against t (log scale) and its bound, below it the errors reported but not judged, beside
    them the reference / deployed / |difference| grids; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["per_step"]
    t = [r["t"] for r in rows]
    # Two error panels: the verdict's own quantity against its bound, and apart from it what is reported but judges
    # nothing (raw eps, drift), which may lie above that bound on a PASS (eps near t = 0, reduced precision).
    fig = plt.figure(figsize=(12, 7.2))
    spec = fig.add_gridspec(2, 2, width_ratios=[1.3, 1])
    ax, info_ax, img_ax = fig.add_subplot(spec[0, 0]), fig.add_subplot(spec[1, 0]), fig.add_subplot(spec[:, 1])
    finite = lambda v: [x if math.isfinite(x) and x > 0 else np.nan for x in v]  # noqa: E731
    ax.semilogy(t, finite([r["x_step_max_abs"] for r in rows]), color="C3",
                label="max |Δx_{t-1}| teacher-forced (verdict)")
    ax.semilogy(t, [r["x_step_bound"] for r in rows], color="k", ls="--", lw=0.8, label="x_{t-1} tolerance")
    dep_info = report["deployed"]
    ax.set_title(f"{dep_info['backend']} ({dep_info['dtype']}) vs {report['reference']['backend']}, "
                 f"{report['sampler']} {report['steps']} steps: {report['verdict'].upper()}\n"
                 "judged: one deployed step from the reference's state, against its bound", fontsize=9)
    info_ax.semilogy(t, finite([r["eps_max_abs"] for r in rows]), label="max |Δeps| (engine on reference x_t)")
    info_ax.semilogy(t, finite([r["eps_mean_abs"] for r in rows]), label="mean |Δeps|")
    info_ax.semilogy(t, finite([r["x_drift_max_abs"] for r in rows]), label="max |Δx_{t-1}| (free-running drift)")
    info_ax.set_title("reported, not judged (no bound applies: eps enters x_{t-1} scaled by the step's gain)",
                      fontsize=9)
    for a_ in (ax, info_ax):
        a_.invert_xaxis()  # sampling goes from t = T-1 down to 0: left to right on the inverted axis
        a_.set_xlabel("timestep t (sampling runs left to right, t = T-1 → 0)")
        a_.set_ylabel("absolute error (log scale)")
        a_.legend(fontsize=7)
    axes = [ax, img_ax]
    a = report["_arrays"]
    dep = np.nan_to_num(a["x0_dep"], nan=0.0)
    diff_img, diff_max = difference_image(dep, a["x0_ref"])
    tiles = [grid(to_uint8(x), nrow=int(math.ceil(math.sqrt(len(x))))) for x in (a["x0_ref"], dep, diff_img)]
    sep = np.full((tiles[0].shape[0], 2, tiles[0].shape[2]), 255, np.uint8)
    row = np.concatenate([tiles[0], sep, tiles[1], sep, tiles[2]], axis=1)
    axes[1].imshow(row[..., 0] if row.shape[2] == 1 else row, cmap="gray", interpolation="nearest")
    axes[1].set_title(f"final x_0: reference | deployed | |difference| (white = max {diff_max:.2g})\n"
                      f"PSNR {report['x0_psnr_db']:.1f} dB (judged: needs >= "
                      f"{report['tolerances']['x0_min_psnr_db']:g})", fontsize=9)
    axes[1].axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(buf.getvalue(), path)
