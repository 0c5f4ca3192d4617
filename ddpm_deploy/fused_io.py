"""The fused reverse step's interface, in one place and versioned: IO names, shapes, dtypes, the coefficient
layout and the history slots.

`graph.fused` builds the step graph to it, `sampling.plan` fills its coefficient rows, `ddpm_deploy.loop` and the
backends bind and ping-pong its tensors. A TensorRT engine is this graph compiled, so it keeps the interface of the
ddpm-deploy that built it; its sidecar records FUSED_INTERFACE_VERSION and an engine of another version is refused
with the command that rebuilds it. Names alone cannot tell: reordering COEF_NAMES keeps every IO name and shape,
and an old engine would run with permuted coefficients, silently wrong.
"""

from __future__ import annotations

# Bump on ANY change here an engine built before it would not notice by its IO names: the order or meaning of a
# coefficient column or history slot, an input's or output's meaning, shape or dtype.
#   1: inputs x_t, t, z, coefs (16 columns), hist (4 slots); outputs eps, x_prev, hist_out, nonfinite
#      (a sidecar that records no version is refused).
FUSED_INTERFACE_VERSION = 1

# Columns of a plan's coefficient table (see ddpm_deploy.sampling.plan for the step they define); the graph's `coefs`
# input takes one row of them per image.
COEF_NAMES = ("a_x", "a_e", "clip", "s_min", "s_log", "u_x", "u_l", "u_0", "u_1", "u_2", "u_3",
              "p_c", "p_0", "p_1", "p_2", "c_e")
N_COEFS = len(COEF_NAMES)
COL = {name: i for i, name in enumerate(COEF_NAMES)}
# Columns that read the history slots: all zero in a history-free plan (DDPM, DDIM), which loops may then run without
# carrying the history; and the UniPC corrector's columns, which make x_c differ from x_t.
HISTORY_COLUMNS = ("u_l", "u_1", "u_2", "u_3", "p_1", "p_2")
HIST_COLS = [COL[name] for name in HISTORY_COLUMNS]
CORRECTOR_COLS = [COL[name] for name in ("u_l", "u_0", "u_1", "u_2", "u_3")]
# History slots carried between steps (axis 1 of hist / hist_out): the last corrected sample and the x_0-predictions
# of the last three steps.
HIST_SLOTS = ("last_sample", "m_1", "m_2", "m_3")
N_HIST = len(HIST_SLOTS)

# Every IO tensor is float32, whatever the network's precision (an fp16 network casts inside the graph).
IO_DTYPE = "float32"
# Shapes by symbol: B batch, C image channels, H x W image size, C_out network output channels (C, or 2C with a
# learned variance). Order is the graph's input / output order.
INPUTS = {"x_t": ("B", "C", "H", "W"), "t": ("B",), "z": ("B", "C", "H", "W"), "coefs": ("B", N_COEFS),
          "hist": ("B", N_HIST, "C", "H", "W")}
OUTPUTS = {"eps": ("B", "C_out", "H", "W"), "x_prev": ("B", "C", "H", "W"), "hist_out": ("B", N_HIST, "C", "H", "W"),
           "nonfinite": ("B",)}
MEANING = {"x_t": "current sample", "t": "timestep index 0..T-1", "z": "step noise",
           "coefs": "plan row per image (COEF_NAMES)", "hist": f"sampler history {HIST_SLOTS}, zeros at the first step",
           "eps": "network output", "x_prev": "next sample", "hist_out": "history for the next step",
           "nonfinite": "1 where the step's eps, x_0-prediction (before its clip) or x_prev is not finite, else 0"}
FUSED_INPUTS = tuple(INPUTS)
FUSED_OUTPUTS = tuple(OUTPUTS)
# (input, output) pairs the device loops ping-pong between steps, and the inputs taken from per-step tables.
FUSED_STATE = (("x_t", "x_prev"), ("hist", "hist_out"))
FUSED_PER_STEP = ("t", "z", "coefs")


def _describe(shape: tuple, name: str) -> str:
    return f"{IO_DTYPE} ({', '.join(map(str, shape))}) {MEANING[name]}"


# The IO description engines carry in their manifest (text for people; the version is what is checked).
FUSED_IO = {"inputs": {n: _describe(s, n) for n, s in INPUTS.items()},
            "outputs": {n: _describe(s, n) for n, s in OUTPUTS.items()}}


def _resolve(table: dict, manifest, batch: int) -> dict:
    c, h, w = manifest.image_shape
    size = {"B": int(batch), "C": c, "H": h, "W": w, "C_out": manifest.out_channels}
    return {name: tuple(size.get(d, d) for d in shape) for name, shape in table.items()}


def input_shapes(manifest, batch: int) -> dict:
    """The fused graph's input shapes at `batch` for a model's `manifest` (image_shape, out_channels)."""
    return _resolve(INPUTS, manifest, batch)


def output_shapes(manifest, batch: int) -> dict:
    return _resolve(OUTPUTS, manifest, batch)


def interface_problem(recorded) -> str | None:
    """Why a fused graph built for interface `recorded` (None: it records none) cannot run here, or None."""
    if recorded == FUSED_INTERFACE_VERSION:
        return None
    built = "records no fused-step interface version (built before it was recorded)" if recorded is None else \
        f"was built for fused-step interface {recorded}"
    return f"{built}, but this ddpm-deploy runs interface {FUSED_INTERFACE_VERSION} (its inputs would be misread)"
