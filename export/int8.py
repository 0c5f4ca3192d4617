"""int8 for CPUs: the fused step graph quantized by NNCF (post-training W8A8) into an OpenVINO model, calibrated on
the sampler's own chain and accepted only past a gate, like the fp16 export.

Why this format: on CPUs the int8 that is fast is an OpenVINO model quantized by NNCF (DESIGN 3g: 2.19x OpenVINO
fp32 per call on the CIFAR-size UNet with VNNI, where QDQ ONNX ran 0.63-1.43x); the file is what OpenVINO reads
(`model.int8.xml` + `.bin`), with our manifest in a sidecar `model.int8.xml.json` like a TensorRT engine's.

1. The eps graph is exported as for fp32 and turned into the fused step graph the runtime runs (graph.fused), its
   nodes named by the module they come from (the dynamo exporter names them node_conv2d_3; its namespace metadata
   says unet.conv_in), so the ignored scope and the manifest speak in module paths.
2. Calibration states are the (x_t, t, z, coefs, hist) the deployed sampler feeds the graph: chains of the model's
   default sampler (or the one named) from a fixed seed, every step, as many chains as `calib_samples` needs.
3. nncf.quantize with the step's update nodes (fused/*) and the sensitive layers in its ignored scope: the time
   embedding, conv_in, conv_out and the 1x1 conv_shortcut skips (TensorRT Model Optimizer's diffusion skip list).
4. The gate: eps of the int8 graph against the fp32 graph on held-out chains (another seed), every step, and the
   whole chain from the same noise (final x_0 PSNR); over either bound no file is written.
"""
# torch (via the exporter), onnx, openvino and nncf are imported by the functions that use them.

from __future__ import annotations

import math
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from ..errors import UserError, first_line
from ..extras import require_extra
from ..files import check_output_path, sha256_bytes, write_bytes_atomic
from ..fused_io import input_shapes
from ..graph.fused import fused_manifest, fused_model
from ..graph.rewrite import save_for_cpu
from ..images import psnr
from ..artifact.manifest import Manifest, int8_sidecar_path, set_onnx_manifest
from ..nn import load_checkpoint
from ..sampling.spec import SamplerSpec, default_sampler
from ..sampling.plan import model_plan
from ..tolerances import EXPORT_INT8_EPS_MAX_ABS, EXPORT_INT8_X0_MIN_PSNR_DB

# Module names kept in float by default: the timestep embedding (sin/cos of t and its MLP, whose output scales every
# block), the first and last convolutions (image in, eps out) and the 1x1 skip convolutions.
DEFAULT_FLOAT_LAYERS = ("time_proj", "time_embedding", "time_emb_proj", "conv_in", "conv_out", "conv_shortcut")
DEFAULT_CALIB_SAMPLES = 256   # states in all (Q-Diffusion calibrates on 20 steps x 256; OpenVINO's notebooks 200-300)
HELD_OUT_CHAINS = 2           # gate: images whose chains (another seed) are held out of calibration
STEP_NODES = "fused/"         # graph.fused names the update's nodes fused/<output>
QUANTIZER_SETTINGS = {"preset": "mixed", "weights": "int8 symmetric per-channel",
                      "activations": "int8 asymmetric per-tensor", "fast_bias_correction": True}


def import_nncf():
    """(nncf, openvino), or a one-line UserError saying how to install them."""
    require_extra("int8", "export --int8", ("openvino", "nncf"))
    import nncf
    import openvino

    return nncf, openvino


def default_int8_path(spec: str) -> Path:
    p = Path(spec)
    stem = p.stem if p.suffix == ".pt" else p.name.rstrip("/") or "model"
    return Path(f"{stem}.int8.xml")


def module_scope(node) -> str:
    """The module path a dynamo-exported node comes from (unet.down_blocks.0.resnets.0.conv_shortcut), or ""."""
    meta = {p.key: p.value for p in node.metadata_props}
    scopes = [part.split(":")[0].strip() for part in meta.get("namespace", "").split("/")]
    modules = [s for s in scopes if s.startswith("unet.")]
    return modules[-1] if modules else ""


def name_by_module(model) -> None:
    """Prefix each node's name with its module path (names stay unique: the old name is kept after it)."""
    for node in model.graph.node:
        scope = module_scope(node)
        if scope:
            node.name = f"{scope}/{node.name}"


def layer_pattern(layer: str) -> str:
    """An NNCF ignored-scope regex for a module name: it as a whole component of the node's module path."""
    return rf"(^|.*[./]){re.escape(layer)}([./].*|$)"


def _check_layers(names) -> tuple[str, ...]:
    out = tuple(dict.fromkeys(str(n).strip() for n in names if str(n).strip()))
    bad = [n for n in out if not re.fullmatch(r"[A-Za-z0-9_.]+", n)]
    if bad:
        raise UserError(f"--float-layer {bad[0]!r} is not a module name (letters, digits, _ and .; e.g. "
                        "mid_block.attentions.0 or to_q)")
    return out


def calibration_plan(manifest: Manifest, sampler: str | None, steps: int | None):
    """The chain calibration follows: the named sampler, else the model's default (a student's own grid)."""
    spec = SamplerSpec(sampler=sampler, steps=steps).with_default(default_sampler(manifest.distilled))
    return model_plan(manifest, spec), spec


def chain_states(run, manifest: Manifest, plan, chains: int, seed: int) -> list[dict]:
    """Feeds of every step of `chains` chains of `plan` run by `run` (feeds -> outputs of a fused step graph) from
    `seed`: per step one dict of batch `chains`; each step's x_prev and hist_out are the next step's x_t and hist."""
    rng = np.random.default_rng(seed)
    shapes = input_shapes(manifest, chains)
    x_t = rng.standard_normal(shapes["x_t"], dtype=np.float32)
    hist = np.zeros(shapes["hist"], np.float32)
    states = []
    for k, t in enumerate(plan.timesteps):
        feeds = {"x_t": x_t, "t": np.full(chains, t, np.float32),
                 "z": rng.standard_normal(shapes["x_t"], dtype=np.float32),
                 "coefs": np.repeat(plan.coefs[k][None].astype(np.float32), chains, axis=0), "hist": hist}
        states.append(feeds)
        out = run(feeds)
        x_t, hist = out["x_prev"], out["hist_out"]
    states.append({"x_t": x_t})  # the chain's result
    return states


def ov_runner(compiled):
    """feeds -> {output name: array} of an OpenVINO compiled model."""
    def run(feeds: dict) -> dict:
        result = compiled(feeds)
        return {name: np.array(result[port]) for port in compiled.outputs for name in port.get_names()}
    return run


def ort_runner(model_bytes: bytes):
    """feeds -> {output name: array} of an onnxruntime CPU session of a fused step graph."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return lambda feeds: dict(zip(names, sess.run(names, feeds)))


def per_image(states: list[dict], t_range=None) -> list[dict]:
    """Batch-1 feeds of each image of each step (the chain's result left out), optionally only t in t_range."""
    out = []
    for s in states[:-1]:
        for i in range(len(s["t"])):
            if t_range is None or t_range[0] <= s["t"][i] <= t_range[1]:
                out.append({k: v[i:i + 1] for k, v in s.items()})
    return out


def spread(items: list, n: int) -> list:
    """n items spread evenly over `items` (all of them when there are fewer)."""
    if len(items) <= n:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


def fp32_fused_model(spec: str, max_batch: int, opset: int, schedule_overrides, echo):
    """(ov.Model of the fp32 fused step graph, its eps-graph Manifest, the eps graph's ModelProto) exported from
    `spec`, nodes named by module."""
    import copy

    from .onnx_export import _torch_to_onnx, eps_module

    ckpt = load_checkpoint(spec, schedule_overrides)
    unet = ckpt.build_unet()
    echo(f"exporting {spec} ({sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters, "
         f"{ckpt.channels}x{ckpt.image_size}x{ckpt.image_size}) for int8")
    proto = _torch_to_onnx(ckpt, eps_module(unet), max_batch, opset)
    manifest = Manifest.from_checkpoint(ckpt, max_batch=max_batch, source=str(spec), opset=opset)
    name_by_module(proto)
    eps = copy.deepcopy(proto)
    fused = fused_model(proto, manifest)
    with tempfile.TemporaryDirectory(prefix="ddpm_deploy_int8_") as tmp:
        path, _ = save_for_cpu(fused, tmp, True)
        _, ov = import_nncf()
        return ov.Core().read_model(path), manifest, eps


def quantize(model, calib: list[dict], float_layers: tuple[str, ...]):
    """(int8 ov.Model, the float layers that matched: module paths of weighted ops in the ignored scope)."""
    import logging

    nncf, _ = import_nncf()
    nncf.set_log_level(logging.WARNING)  # its INFO lines list every node it skips
    patterns = [re.escape(STEP_NODES) + ".*"] + [layer_pattern(n) for n in float_layers]
    scope = nncf.IgnoredScope(patterns=patterns, validate=False)
    q = nncf.quantize(model, nncf.Dataset(calib), preset=nncf.QuantizationPreset.MIXED, subset_size=len(calib),
                      fast_bias_correction=QUANTIZER_SETTINGS["fast_bias_correction"], ignored_scope=scope)
    weighted = ("Convolution", "MatMul", "GroupConvolution")
    kept = sorted({op.get_friendly_name().split("/node_")[0] for op in model.get_ordered_ops()
                   if op.get_type_name() in weighted and any(re.fullmatch(p, op.get_friendly_name())
                                                              for p in patterns[1:])})
    return q, kept


def gate(fp32, int8, held: list[dict], chain_fp32: dict, chain_int8: dict) -> dict:
    """The gate's measures: eps max/mean |Δ| of the int8 graph against fp32 on the held-out states (fp32's own
    chain, every step), and the PSNR of the final x_0 of the two chains run from the same noise."""
    worst, total, count, worst_t = 0.0, 0.0, 0, None
    for feeds in held:
        a, b = fp32(feeds)["eps"], int8(feeds)["eps"]
        err = np.abs(a.astype(np.float64) - b) if np.isfinite(b).all() else np.full(a.shape, np.inf)
        if err.max() >= worst:
            worst, worst_t = float(err.max()), int(feeds["t"][0])
        total, count = total + float(err.sum()), count + err.size
    return {"eps_max_abs": worst, "eps_mean_abs": total / count, "eps_worst_t": worst_t,
            "x0_psnr_db": round(psnr(chain_int8["x_t"], chain_fp32["x_t"]), 2), "held_out_states": len(held)}


def int8_from_checkpoint(spec: str, out: str | Path | None = None, *, calib_samples: int = DEFAULT_CALIB_SAMPLES,
                         calib_sampler: str | None = None, calib_steps: int | None = None, float_layers=(),
                         max_batch: int = 16, opset: int = 21, seed: int = 0,
                         eps_bound: float = EXPORT_INT8_EPS_MAX_ABS,
                         x0_min_psnr_db: float = EXPORT_INT8_X0_MIN_PSNR_DB, calib_t_range=None,
                         schedule_overrides: dict | None = None, echo=print) -> dict:
    """Export checkpoint `spec` as an int8 OpenVINO model at `out` (.xml; its .bin and .xml.json beside it), or with
    `out` an .onnx as a QDQ ONNX eps graph (onnxruntime's quantize_static; for TensorRT's explicit quantization);
    returns {"path", "manifest", "gate", "seconds"}. `float_layers`: module names kept in float on top of
    DEFAULT_FLOAT_LAYERS. `calib_t_range` (lo, hi): calibrate only on states with t in it (for studies: the gate
    judges every step regardless). `eps_bound` / `x0_min_psnr_db`: the gate's bounds (default: tolerances.py)."""
    out = Path(out) if out else default_int8_path(spec)
    _check_args(out, calib_samples, max_batch, eps_bound)
    layers = DEFAULT_FLOAT_LAYERS + tuple(n for n in _check_layers(float_layers) if n not in DEFAULT_FLOAT_LAYERS)
    qdq = out.suffix == ".onnx"
    nncf, ov = import_nncf()
    t0 = time.time()
    model, manifest, eps_proto = fp32_fused_model(spec, max_batch, opset, schedule_overrides, echo)
    plan, sampler = calibration_plan(manifest, calib_sampler, calib_steps)
    fmanifest = fused_manifest(manifest)
    core = ov.Core()
    fp32 = ov_runner(core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}))
    chains = max(1, math.ceil(calib_samples / plan.steps))
    calib = spread(per_image(chain_states(fp32, fmanifest, plan, chains, seed), calib_t_range), calib_samples)
    if not calib:
        raise UserError(f"no calibration states with t in {tuple(calib_t_range)}: widen the range")
    echo(f"  calibration: {len(calib)} states of {chains} {sampler.sampler} chain(s) of {plan.steps} steps "
         f"(seed {seed}), t in [{min(int(c['t'][0]) for c in calib)}, {max(int(c['t'][0]) for c in calib)}]")
    if qdq:
        q, kept, int8, quantizer, settings = quantize_qdq(eps_proto, manifest, calib, layers)
    else:
        q, kept = quantize(model, calib, layers)
        int8 = ov_runner(core.compile_model(q, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}))
        quantizer = f"nncf {nncf.__version__} (openvino {ov.get_version().split('-')[0]})"
        settings = {**QUANTIZER_SETTINGS, "ignored_scope": [STEP_NODES + "*", *layers]}
    held_chain = chain_states(fp32, fmanifest, plan, HELD_OUT_CHAINS, seed + 1)
    int8_chain = chain_states(int8, fmanifest, plan, HELD_OUT_CHAINS, seed + 1)
    g = gate(fp32, int8, per_image(held_chain), held_chain[-1], int8_chain[-1])
    echo(f"  gate: eps max|Δ| {g['eps_max_abs']:.3g} (bound {eps_bound:g}, worst at t={g['eps_worst_t']}), mean "
         f"{g['eps_mean_abs']:.3g} on {g['held_out_states']} held-out states; chain x_0 PSNR {g['x0_psnr_db']:.1f} dB "
         f"(needs >= {x0_min_psnr_db:g}); {len(kept)} layers in float")
    _refuse_failing(g, eps_bound, x0_min_psnr_db, calib_samples)
    precision = {"default": "int8", "format": "QDQ ONNX" if qdq else "OpenVINO IR", "quantizer": quantizer,
                 "settings": settings,
                 "calibration": {"sampler": sampler.sampler, "steps": plan.steps, "samples": len(calib),
                                 "chains": chains, "seed": seed,
                                 **({"t_range": list(map(float, calib_t_range))} if calib_t_range else {})},
                 "float_layers": kept, "eps_bound": float(eps_bound), "x0_min_psnr_db": float(x0_min_psnr_db),
                 "gate": g}
    if qdq:
        manifest = manifest.replace(dtype="int8", precision=precision)
        set_onnx_manifest(q, manifest)
        write_bytes_atomic(q.SerializeToString(), out)
    else:
        manifest = fmanifest.replace(dtype="int8", precision=precision)
        publish_int8(ov, q, out, manifest)
    return {"path": str(out), "manifest": manifest, "gate": g, "seconds": time.time() - t0}


def quantize_qdq(eps_proto, manifest: Manifest, calib: list[dict], float_layers: tuple[str, ...]):
    """(QDQ eps ModelProto, float layers, its fused step graph's runner on onnxruntime, quantizer, settings):
    onnxruntime's quantize_static (U8 activations, S8 per-channel weights: its CPU and TensorRT's recipe) with the
    float layers' nodes excluded (the time embedding's /time_proj/Mul broadcast is a known failure of it)."""
    import copy
    import logging

    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"x_t": c["x_t"], "t": c["t"]} for c in calib])

        def get_next(self):
            return next(self.items, None)

    excluded = [n.name for n in eps_proto.graph.node
                if any(re.fullmatch(layer_pattern(layer), n.name) for layer in float_layers)]
    kept = sorted({n.split("/node_")[0] for n in excluded if "/node_" in n and
                   any(op in n for op in ("conv2d", "linear", "Conv", "Gemm", "MatMul"))})
    logging.getLogger().setLevel(logging.ERROR)  # it warns that pre-processing is recommended, on every call
    with tempfile.TemporaryDirectory(prefix="ddpm_deploy_qdq_") as tmp:
        src, dst = os.path.join(tmp, "eps.onnx"), os.path.join(tmp, "eps.qdq.onnx")
        onnx.save(eps_proto, src)
        try:
            quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, per_channel=True, nodes_to_exclude=excluded)
        except Exception as e:
            raise UserError(f"onnxruntime's quantize_static failed: {first_line(e)}; use the OpenVINO int8 export "
                            "(-o NAME.int8.xml)") from None
        q = onnx.load(dst)
    fused = fused_model(copy.deepcopy(q), manifest)
    settings = {"format": "QDQ", "activations": "uint8 per-tensor (MinMax)", "weights": "int8 symmetric per-channel",
                "nodes_excluded": len(excluded), "excluded_layers": list(float_layers)}
    return q, kept, ort_runner(fused.SerializeToString()), f"onnxruntime {onnxruntime.__version__} quantize_static", \
        settings


def _check_args(out: Path, calib_samples: int, max_batch: int, eps_bound: float) -> None:
    if out.suffix not in (".xml", ".onnx"):
        raise UserError(f"--int8 -o {out}: give NAME.int8.xml (OpenVINO, for CPUs) or NAME.int8.onnx (QDQ ONNX, for "
                        "TensorRT's explicit quantization)")
    for p in ((out, out.with_suffix(".bin"), int8_sidecar_path(out)) if out.suffix == ".xml" else (out,)):
        check_output_path(p)
    if not 1 <= calib_samples <= 100_000:
        raise UserError(f"--calib-samples must be between 1 and 100000, got {calib_samples}")
    if not 1 <= max_batch <= 4096:
        raise UserError(f"--max-batch must be between 1 and 4096, got {max_batch}")
    if not (isinstance(eps_bound, (int, float)) and 0 < eps_bound < math.inf):
        raise UserError(f"the int8 eps bound must be a positive number, got {eps_bound!r}")


def _refuse_failing(g: dict, eps_bound: float, x0_min_psnr_db: float, calib_samples: int) -> None:
    problems = []
    if not g["eps_max_abs"] <= eps_bound:
        problems.append(f"eps max|Δ| {g['eps_max_abs']:.3g} vs fp32 on held-out chain states exceeds {eps_bound:g} "
                        f"(worst at t={g['eps_worst_t']})")
    if not g["x0_psnr_db"] >= x0_min_psnr_db:
        problems.append(f"the chain's final x_0 PSNR {g['x0_psnr_db']:.1f} dB is below {x0_min_psnr_db:g} dB")
    if problems:
        raise UserError(f"int8 gate failed: {'; '.join(problems)}; no file written: try --calib-samples "
                        f"{2 * calib_samples}, or keep more layers in float (--float-layer NAME, e.g. "
                        "mid_block or up_blocks.0), or use the fp32/fp16 export")


def publish_int8(ov, model, out: Path, manifest: Manifest) -> None:
    """Write .xml, .bin and the sidecar, each temp-then-rename, the sidecar last and tied to both by sha256: the old
    sidecar goes first, so a crash in between leaves a model without one (refused on load), never a mismatch."""
    side = int8_sidecar_path(out)
    with tempfile.TemporaryDirectory(prefix="ddpm_deploy_int8_") as tmp:
        xml = os.path.join(tmp, "model.xml")
        try:
            ov.save_model(model, xml, compress_to_fp16=False)
        except Exception as e:
            raise UserError(f"OpenVINO cannot save the int8 model: {first_line(e)}") from None
        xml_bytes = Path(xml).read_bytes()
        bin_bytes = Path(xml).with_suffix(".bin").read_bytes()
    # the .xml names its weights file by its own name (model.bin next to model.xml): ours is <out stem>.bin
    manifest = manifest.replace(engine_sha256=sha256_bytes(xml_bytes + bin_bytes))
    side.unlink(missing_ok=True)
    write_bytes_atomic(bin_bytes, out.with_suffix(".bin"))
    write_bytes_atomic(xml_bytes, out)
    write_bytes_atomic(manifest.to_json().encode(), side)
