"""Timestep-aware fp16 precision audit: which nodes must stay fp32, judged on real reverse-chain trajectories.

1. Run the fp32 graph along a real reverse chain -- the sampler being deployed when one is named, else a DDPM
   chain strided over all of [0, T-1] -- and keep (x_t, t) pairs spread over it.
2. On those inputs, record every intermediate tensor of the fp32 graph. A node whose inputs or outputs exceed
   the fp16 safe range would overflow (inf, then NaN downstream): keep it in fp32.
3. Convert, record the fp16 graph's intermediates on the same inputs, and keep in fp32 every node that turns
   finite inputs into non-finite outputs, or that multiplies the relative error it receives by more than
   ERROR_AMPLIFICATION while its own error is above ERROR_FLOOR (it "dominates the error"). Repeat until no
   node is added (at most MAX_ROUNDS).
The result is a {node name: reason} map that goes into the manifest's precision section.
"""
# onnx (1.1 s to import) and onnxruntime are imported by the functions that use them.

from __future__ import annotations

import copy

import numpy as np

from ..fused_io import N_HIST
from ..sampling.plan import make_plan
from ..sampling.step import step_with_history
from .fp16 import convert

# fp16's largest finite value is 65504; leave 8x headroom for values the audit inputs did not quite reach and for
# accumulations inside a kernel that exceed the values seen at its output.
FP16_SAFE_MAX = 65504.0 / 8
# A node is an error source when its output's relative error exceeds its worst input's by this factor ...
ERROR_AMPLIFICATION = 8.0
# ... and is itself above this level (fp16 roundoff alone is ~5e-4 relative; 1e-2 is 20x that).
ERROR_FLOOR = 1e-2
MAX_ROUNDS = 3
AUDIT_CHAIN_STEPS = 100   # strided DDPM chain steps used to collect trajectories
AUDIT_POINTS = 16         # (x_t, t) pairs kept from the chain, spread over t
AUDIT_BATCH = 2           # chains run side by side


def trajectory_inputs(session, ckpt, seed: int = 0, sampler: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(x_t, t) pairs from a real fp32 reverse chain, spread over its timesteps.

    `sampler`: the plan being deployed, as `make_plan` keyword arguments ({"sampler": "dpmpp", "steps": 20,
    "order": 2, ...}); its trajectory is what the engine will see (a 20-step multistep chain visits other x_t
    than DDPM's). Default: a strided DDPM chain over all of [0, T-1].
    """
    plan = audit_plan(ckpt, sampler)
    rng = np.random.default_rng(seed)
    shape = (AUDIT_BATCH, ckpt.channels, ckpt.image_size, ckpt.image_size)
    x_t = rng.standard_normal(shape, dtype=np.float32)
    hist = np.zeros((AUDIT_BATCH, N_HIST, *shape[1:]), np.float32)
    keep = set(np.linspace(0, plan.steps - 1, AUDIT_POINTS // AUDIT_BATCH).round().astype(int).tolist())
    xs, ts = [], []
    for k, t in enumerate(plan.timesteps):
        t_vec = np.full(AUDIT_BATCH, t, dtype=np.float32)
        if k in keep:
            xs.append(x_t)
            ts.append(t_vec)
        out = session.run(None, {"x_t": x_t, "t": t_vec})[0]
        x_t, hist = step_with_history(x_t, out, rng.standard_normal(shape, dtype=np.float32), plan.coefs[k], hist)
    return np.concatenate(xs), np.concatenate(ts)


def audit_plan(ckpt, sampler: dict | None = None):
    """The plan whose trajectory the audit samples: the named sampler's, or a strided DDPM chain."""
    options = dict(sampler or {"sampler": "ddpm", "steps": min(AUDIT_CHAIN_STEPS, ckpt.schedule.T)})
    name = options.pop("sampler")
    return make_plan(ckpt.schedule, name, options.pop("steps", None), variance_type=ckpt.variance_type,
                     clip_sample=ckpt.clip_sample, clip_sample_range=ckpt.clip_sample_range,
                     prediction_type=ckpt.prediction_type, **options)


def _with_all_outputs(model):
    """A copy of `model` whose float intermediates are all graph outputs (names unchanged)."""
    import onnx
    from onnx import TensorProto

    m = copy.deepcopy(model)
    # Types come from the exporter's / fp16 converter's value_info (onnx shape inference stops at opset-21
    # GroupNormalization, and on converted models it conflicts with the converter's own annotations).
    float_types = (TensorProto.FLOAT, TensorProto.FLOAT16)
    types = {v.name: v.type.tensor_type.elem_type for v in m.graph.value_info}
    try:
        inferred = onnx.shape_inference.infer_shapes(m)
        for v in inferred.graph.value_info:
            types.setdefault(v.name, v.type.tensor_type.elem_type)
    except Exception:  # inference is only a fallback for names the value_info lacks
        pass
    existing = {o.name for o in m.graph.output}
    for node in m.graph.node:
        for out in node.output:
            if out and out not in existing and types.get(out) in float_types:
                m.graph.output.append(onnx.helper.make_tensor_value_info(out, types[out], None))
                existing.add(out)
    return m


def intermediates(model, x_t: np.ndarray, t: np.ndarray) -> dict[str, np.ndarray]:
    """Every float intermediate of `model` on one batch, as float64 (onnxruntime CPU)."""
    import onnxruntime as ort

    m = _with_all_outputs(model)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every node's output
    opts.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    values = sess.run(names, {"x_t": x_t, "t": t})
    return {n: v.astype(np.float64) for n, v in zip(names, values)}


def overflow_nodes(model, values: dict) -> dict[str, str]:
    """Nodes whose float inputs or outputs exceed FP16_SAFE_MAX on the audit inputs."""
    found = {}
    for node in model.graph.node:
        for name in list(node.input) + list(node.output):
            v = values.get(name)
            if v is not None and v.size and np.nanmax(np.abs(v)) > FP16_SAFE_MAX:
                found[node.name] = f"|{name}| reaches {np.nanmax(np.abs(v)):.3g} > fp16 safe {FP16_SAFE_MAX:g}"
                break
    return found


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    if not np.isfinite(a).all():
        return float("inf")
    return float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-12))


def error_nodes(model, ref: dict, got: dict) -> dict[str, str]:
    """Nodes that create non-finite values or amplify the relative error they receive."""
    found = {}
    for node in model.graph.node:
        outs = [o for o in node.output if o in ref and o in got]
        ins = [i for i in node.input if i in ref and i in got]
        if not outs:
            continue
        in_err = max((_rel_err(got[i], ref[i]) for i in ins), default=0.0)
        out_err = max(_rel_err(got[o], ref[o]) for o in outs)
        if np.isinf(out_err) and not np.isinf(in_err):
            found[node.name] = "fp16 output goes non-finite on real trajectories"
        elif np.isfinite(out_err) and out_err > ERROR_FLOOR and out_err > ERROR_AMPLIFICATION * max(in_err, 1e-4):
            found[node.name] = f"fp16 relative error {out_err:.2g} from inputs at {in_err:.2g}"
    return found


def audit_fp16(model, ckpt, fp32_nodes: list[str], echo=print, sampler: dict | None = None) -> dict[str, str]:
    """{node: reason} for nodes to keep in fp32, beyond `fp32_nodes` (already kept); `sampler` as in
    `trajectory_inputs` (the plan being deployed, when one is named)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x_t, t = trajectory_inputs(sess, ckpt, sampler=sampler)
    ref = intermediates(model, x_t, t)
    found = overflow_nodes(model, ref)
    plan = audit_plan(ckpt, sampler)
    echo(f"  audit: {len(t)} (x_t, t) points from a {plan.steps}-step {plan.sampler} chain, "
         f"t in [{int(t.min())}, {int(t.max())}]; {len(found)} nodes outside fp16 range")
    for round_ in range(MAX_ROUNDS):
        keep = sorted(set(fp32_nodes) | set(found))
        got = intermediates(convert(model, keep), x_t, t)
        new = {k: v for k, v in error_nodes(model, ref, got).items() if k not in found and k not in fp32_nodes}
        eps_name = model.graph.output[0].name
        echo(f"  audit round {round_ + 1}: eps max|Δ| {np.nanmax(np.abs(got[eps_name] - ref[eps_name])):.3g}, "
             f"{len(new)} more nodes kept in fp32")
        if not new:
            break
        found.update(new)
    return found
