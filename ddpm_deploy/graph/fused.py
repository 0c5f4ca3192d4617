"""The fused reverse step as one ONNX graph: eps_theta plus the sampler update of `ddpm_deploy.sampling.plan`.

Its interface (IO names, shapes, dtypes, coefficient columns, history slots, version) is `ddpm_deploy.fused_io`:
inputs x_t, t, z, coefs (one plan row per image), hist; outputs eps (the network output, kept for step-by-step
verification), x_prev, hist_out, nonfinite (1 where this step went non-finite, else 0; see below).

Built from the exported eps graph with onnx.helper only (no torch), so an fp16 eps graph gives an fp16
fused step; the update itself runs in fp32. Every sampler (DDPM, DDIM, DPM-Solver++, UniPC) is the same graph
with other rows, so one engine serves them all; device loops ping-pong (x_t, x_prev) and (hist, hist_out) and
pass only per-step rows of t, z and coefs. Per-image rows let images of one batch be at different steps.

Finiteness is a property of the step itself: `nonfinite` flags a row whose network output, x_0-prediction BEFORE
its clip, or x_prev holds a NaN or inf. The clip cannot be trusted to pass them on: OpenVINO's Min/Max turn NaN
into the bound, and IEEE min/max turn +-inf into it on every engine, so x_prev alone can look fine. The
flag is per step (not a counter kept in the graph): a 0/1 value is exact in bf16 and fp16, and the loops keep one
row of it per step (ddpm_deploy.loop) to name the first failing step.
"""
# onnx (1.1 s to import) is imported by the functions that use it.

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from .. import fused_io
from ..fused_io import COEF_NAMES, N_COEFS, N_HIST
from ..artifact.manifest import Manifest, set_onnx_manifest
from .toposort import toposort


def fused_manifest(manifest: Manifest) -> Manifest:
    """The manifest of the fused step graph made from the eps graph of `manifest`: its IO and interface version."""
    return manifest.replace(graph="fused", io={k: dict(v) for k, v in fused_io.FUSED_IO.items()},
                            fused_interface=fused_io.FUSED_INTERFACE_VERSION)


def fused_from_eps(eps_model, channels: int, learned_variance: bool, inplace: bool = False):
    """A ModelProto computing (x_prev, hist_out) = step(x_t, eps_theta(x_t, t), z, coefs, hist): a new one, or with
    `inplace` `eps_model` itself turned into it (no copy of the weights: a CIFAR-size UNet's are 143 MB)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = eps_model if inplace else copy.deepcopy(eps_model)
    g = m.graph
    _free_names(g, ("z", "coefs", "hist", "x_prev", "hist_out", "eps", "nonfinite"))
    eps_out = g.output[0].name
    nodes, inits = [], []

    def const(name, value, dtype=np.int64):
        if name not in {i.name for i in inits}:
            inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(op, inputs, output, **attrs):
        nodes.append(helper.make_node(op, inputs, [output], name=f"fused/{output}", **attrs))
        return output

    def add(*terms):
        out = terms[0]
        for i, term in enumerate(terms[1:]):
            out = node("Add", [out, term], f"{term}_sum{i}")
        return out

    # (0) coefficient columns as (B, 1, 1, 1), broadcasting against (B, C, H, W) per image
    c4 = node("Reshape", ["coefs", const("fused/coefs_shape", [0, N_COEFS, 1, 1])], "fused/coefs4")
    k = {n: node("Slice", [c4, const(f"fused/s_{n}", [i]), const(f"fused/e_{n}", [i + 1]), const("fused/ax1", [1])],
                 f"fused/{n}") for i, n in enumerate(COEF_NAMES)}
    # history slots h0..h3, each (B, C, H, W)
    h = [node("Gather", ["hist", const(f"fused/slot{j}", j)], f"fused/h{j}", axis=1) for j in range(N_HIST)]
    # (1) eps = network output channels [0, C)
    eps = node("Slice", [eps_out, const("fused/c0", [0]), const("fused/c1", [channels]), const("fused/ax", [1])],
               "fused/eps_c")
    # (2) m = clip(a_x * x_t - a_e * eps, -clip, clip): x_0-prediction (Clip needs scalar bounds: Min/Max)
    x0 = node("Sub", [node("Mul", [k["a_x"], "x_t"], "fused/ax_xt"), node("Mul", [k["a_e"], eps], "fused/ae_eps")],
              "fused/x0_raw")
    x0_raw = x0
    x0 = node("Max", [x0, node("Neg", [k["clip"]], "fused/neg_clip")], "fused/x0_lo")
    x0 = node("Min", [x0, k["clip"]], "fused/m")

    def mul(coef, x):
        return node("Mul", [k[coef], x], f"fused/{coef}_term")

    # (3) UniPC corrector (x_c = x_t for the other samplers: u_x = 1, the rest 0)
    x_c = add(mul("u_x", "x_t"), mul("u_l", h[0]), mul("u_0", x0), mul("u_1", h[1]), mul("u_2", h[2]),
              mul("u_3", h[3]))
    # (4) predictor mean
    mean = add(mul("p_c", x_c), mul("p_0", x0), mul("p_1", h[1]), mul("p_2", h[2]), mul("c_e", eps))
    # (5) sigma = s_min * exp(s_log * (v + 1) / 2) for learned variance, else s_min
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
    # (6) h_out = [x_c, m, h1, h2]
    node("Concat", [node("Unsqueeze", [x_c, const("fused/ax1u", [1])], "fused/x_c1"),
                    node("Unsqueeze", [x0, const("fused/ax1m", [1])], "fused/m1"),
                    node("Slice", ["hist", const("fused/h1s", [1]), const("fused/h1e", [N_HIST - 1]),
                                   const("fused/hax", [1])], "fused/h12")], "hist_out", axis=1)
    # (7) nonfinite: v - v is 0 for finite v and NaN for NaN or +-inf, so a row's sum of them is NaN exactly when
    # one of its values is not finite (only zeros are added: no overflow, unlike summing the values themselves)
    def row_nan(x, name):
        return node("ReduceSum", [node("Sub", [x, x], f"fused/{name}_diff"), const("fused/axes123", [1, 2, 3])],
                    f"fused/{name}_nan", keepdims=0)

    bad = add(row_nan(eps_out, "eps"), row_nan(x0_raw, "x0_raw"), row_nan("x_prev", "x_prev"))
    node("Cast", [node("IsNaN", [bad], "fused/bad")], "nonfinite", to=TensorProto.FLOAT)
    # the eps output keeps its name; rename the graph output so both are visible
    if eps_out != "eps":
        nodes.append(helper.make_node("Identity", [eps_out], ["eps"], name="fused/eps_out"))
    g.node.extend(nodes)
    g.initializer.extend(inits)
    _declare_io(g)
    onnx.checker.check_model(m)
    return m


def _declare_io(g) -> None:
    """Declare the fused step's inputs and outputs as `fused_io` lists them, each symbol (B, C, H, W, C_out) taken
    from the eps graph's own x_t input and network output, so a symbolic batch stays symbolic."""
    from onnx import TensorProto, helper

    def dims(value_info):
        return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]

    size = dict(zip(("B", "C", "H", "W"), dims(next(i for i in g.input if i.name == "x_t"))))
    out = dims(g.output[0])
    size["C_out"] = out[1] if len(out) == 4 else "C_out"   # an eps graph without a declared output shape

    def value_info(name, shape):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [size.get(d, d) for d in shape])

    present = {i.name for i in g.input}
    g.input.extend(value_info(n, s) for n, s in fused_io.INPUTS.items() if n not in present)
    del g.output[:]
    g.output.extend(value_info(n, s) for n, s in fused_io.OUTPUTS.items())


def _free_names(g, names) -> None:
    """Rename tensors of `g` that carry a name the fused graph adds (an edited eps graph may use "eps" inside, say):
    graph outputs and inputs x_t, t keep theirs."""
    keep = {"x_t", "t", *(o.name for o in g.output)}
    taken = {n for node in g.node for n in (*node.input, *node.output)} | {i.name for i in g.initializer}
    for name in names:
        if name in taken and name not in keep:
            new = next(f"{name}__{i}" for i in range(len(taken) + 1) if f"{name}__{i}" not in taken)
            taken.add(new)
            for node in g.node:
                node.input[:] = [new if n == name else n for n in node.input]
                node.output[:] = [new if n == name else n for n in node.output]
            for init in g.initializer:
                if init.name == name:
                    init.name = new
            for vi in g.value_info:
                if vi.name == name:
                    vi.name = new


def fused_model(onnx_path, manifest: Manifest, base_dir: str | None = None):
    """ModelProto of one fused reverse step for the eps ONNX at `onnx_path`, or made from an already loaded eps
    ModelProto, which is changed in place into the fused graph (callers pass one they no longer need); weights it
    keeps in external files (loaded with load_external_data=False) are read from `base_dir`, the file's folder.
    Its metadata manifest is `fused_manifest(manifest)`."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    model = onnx.load(str(onnx_path)) if isinstance(onnx_path, (str, Path)) else onnx_path
    if any(uses_external_data(t) for t in model.graph.initializer):
        if base_dir is None:
            raise ValueError("the eps graph's weights are in external files: pass base_dir, the folder they are in")
        load_external_data_for_model(model, base_dir)
    toposort(model)
    fused = fused_from_eps(model, manifest.channels, learned_variance=manifest.learned_variance, inplace=True)
    set_onnx_manifest(fused, fused_manifest(manifest))  # it describes the fused graph now, version included
    return fused
