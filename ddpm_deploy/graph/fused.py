"""The fused reverse step as one ONNX graph: eps_theta plus the sampler update of `ddpm_deploy.samplers`.

Inputs  x_t (B,C,H,W) f32, t (B,) f32, z (B,C,H,W) f32, coefs (8,) f32 (one plan row, samplers.COEF_NAMES)
Outputs eps (B,C_out,H,W) f32 (the network output, kept for step-by-step verification), x_prev (B,C,H,W) f32

Built from the exported eps graph with onnx.helper only (no torch), so an fp16 eps graph gives an fp16
fused step; the update itself runs in fp32. The host passes one row of scalars per step, nothing else.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..manifest import Manifest
from ..samplers import COEF_NAMES
from .toposort import toposort

FUSED_INPUTS = ("x_t", "t", "z", "coefs")
FUSED_OUTPUTS = ("eps", "x_prev")
# The IO description engines carry in their manifest.
FUSED_IO = {
    "inputs": {"x_t": "float32 (B, C, H, W)", "t": "float32 (B,) timestep index 0..T-1",
               "z": "float32 (B, C, H, W) step noise", "coefs": f"float32 ({len(COEF_NAMES)},) plan row"},
    "outputs": {"eps": "float32 (B, out_channels, H, W)", "x_prev": "float32 (B, C, H, W)"},
}


def fused_from_eps(eps_model, channels: int, learned_variance: bool):
    """A new ModelProto computing x_prev = step(x_t, eps_theta(x_t, t), z, coefs)."""
    import copy

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = copy.deepcopy(eps_model)
    g = m.graph
    eps_out = g.output[0].name
    nodes, inits = [], []

    def const(name, value, dtype=np.int64):
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(op, inputs, output, **attrs):
        nodes.append(helper.make_node(op, inputs, [output], name=f"fused/{output}", **attrs))
        return output

    # (0) scalars from the coefficient row
    k = {n: node("Gather", ["coefs", const(f"fused/idx_{n}", i)], f"fused/{n}", axis=0) for i, n in enumerate(COEF_NAMES)}
    # (1) eps = network output channels [0, C)
    eps = node("Slice", [eps_out, const("fused/c0", [0]), const("fused/c1", [channels]), const("fused/ax", [1])],
               "fused/eps_c")
    # (2) x0_hat = clip(a_x * x_t - a_e * eps, -clip, clip)
    x0 = node("Sub", [node("Mul", [k["a_x"], "x_t"], "fused/ax_xt"), node("Mul", [k["a_e"], eps], "fused/ae_eps")],
              "fused/x0_raw")
    x0 = node("Clip", [x0, node("Neg", [k["clip"]], "fused/neg_clip"), k["clip"]], "fused/x0_hat")
    # (3) mean = c_x * x_t + c_0 * x0_hat + c_e * eps
    mean = node("Add", [node("Add", [node("Mul", [k["c_x"], "x_t"], "fused/cx_xt"),
                                     node("Mul", [k["c_0"], x0], "fused/c0_x0")], "fused/mean_a"),
                        node("Mul", [k["c_e"], eps], "fused/ce_eps")], "fused/mean")
    # (4) sigma = s_min * exp(s_log * (v + 1) / 2) for learned variance, else s_min
    if learned_variance:
        v = node("Slice", [eps_out, const("fused/v0", [channels]), const("fused/v1", [2 * channels]),
                           const("fused/vax", [1])], "fused/v")
        frac = node("Mul", [node("Add", [v, const("fused/one", 1.0, np.float32)], "fused/v1p"),
                            const("fused/half", 0.5, np.float32)], "fused/frac")
        sigma = node("Mul", [k["s_min"], node("Exp", [node("Mul", [k["s_log"], frac], "fused/slog_frac")],
                                              "fused/exp")], "fused/sigma")
    else:
        sigma = k["s_min"]
    node("Add", [mean, node("Mul", [sigma, "z"], "fused/sigma_z")], "x_prev")
    # the eps output keeps its name; rename the graph output so both are visible
    if eps_out != "eps":
        nodes.append(helper.make_node("Identity", [eps_out], ["eps"], name="fused/eps_out"))
    g.node.extend(nodes)
    g.initializer.extend(inits)
    shape_x = [d.dim_param or d.dim_value for d in g.input[0].type.tensor_type.shape.dim]
    g.input.extend([helper.make_tensor_value_info("z", TensorProto.FLOAT, shape_x),
                    helper.make_tensor_value_info("coefs", TensorProto.FLOAT, [len(COEF_NAMES)])])
    out_eps = copy.deepcopy(g.output[0])
    out_eps.name = "eps"
    del g.output[:]
    g.output.extend([out_eps, helper.make_tensor_value_info("x_prev", TensorProto.FLOAT, shape_x)])
    onnx.checker.check_model(m)
    return m


def fused_model(onnx_path: str | Path, manifest: Manifest):
    """ModelProto of x_prev = step(x_t, eps_theta(x_t, t), z, coefs) for the eps ONNX at `onnx_path`."""
    import onnx

    model = onnx.load(str(onnx_path))
    toposort(model)
    return fused_from_eps(model, manifest.channels, learned_variance=manifest.learned_variance)
