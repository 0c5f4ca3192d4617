"""The reverse step in numpy: what one row of a plan's table (COEF_NAMES, `ddpm_deploy.sampling.plan`) does to x_t.

One step, for a row r of COEF_NAMES and a history h = [last_sample, m_1, m_2, m_3] (m_j: the x_0-prediction
j steps ago; all zeros before the first step), with `out` the network's output (its first C channels):

    m      = clip(a_x * x_t - a_e * out, -clip, clip)                          x_0-prediction (Ho et al. eq. 15)
    x_c    = u_x * x_t + u_l * h0 + u_0 * m + u_1 * h1 + u_2 * h2 + u_3 * h3    UniPC's corrector (else x_c = x_t)
    sigma  = s_min * exp(s_log * (v + 1) / 2)                                  (v: learned-variance channels, else 0)
    x_prev = p_c * x_c + p_0 * m + p_1 * h1 + p_2 * h2 + c_e * out + sigma * z
    h_out  = [x_c, m, h1, h2]

Every update is affine in (x_t, out, z, h) given the row, with one clip in between, so the same table drives the
numpy step here and the fused ONNX/TensorRT step graph (`ddpm_deploy.graph.fused`).
"""

from __future__ import annotations

import numpy as np

from ..fused_io import COEF_NAMES, COL, N_HIST

# "No clip" is a clip at float32's largest value: finite, so fp16/TensorRT graphs never see inf.
NO_CLIP = float(np.finfo(np.float32).max)


def row(**values: float) -> tuple:
    """One COEF_NAMES row from named values; the rest are the identity (u_x = 1, clip off, 0)."""
    unknown = set(values) - set(COEF_NAMES)
    assert not unknown, unknown
    base = {"clip": NO_CLIP, "u_x": 1.0}
    base.update(values)
    return tuple(float(base.get(n, 0.0)) for n in COEF_NAMES)


def eps_gain(coefs) -> np.ndarray:
    """|d x_{t-1} / d out| of a step, from its row (N_COEFS,) or rows (..., N_COEFS): how much an error in the
    network's output (eps, v or x_0, whichever the plan's rows are for) moves x_{t-1}, through m = a_x x_t - a_e out,
    the corrector's u_0 m, the predictor's p_c x_c + p_0 m and its c_e out term. On a pixel whose m is clipped, m no
    longer moves and only c_e out does: the gain there is |c_e| (DDIM: sqrt(1 - a-bar_{t-1}), far above the
    unclipped gain, where the two terms almost cancel), so with clipping on it is the larger of the two (x_{t-1} is
    piecewise linear in out, so that is its Lipschitz constant). Verify scales its per-step bound by it."""
    c = np.asarray(coefs, dtype=np.float64)
    col = lambda name: c[..., COL[name]]  # noqa: E731
    unclipped = np.abs(col("c_e") - col("a_e") * (col("p_0") + col("p_c") * col("u_0")))
    return np.where(col("clip") < NO_CLIP, np.maximum(unclipped, np.abs(col("c_e"))), unclipped)


def _columns(coefs, ndim: int):
    """A row's scalars: python floats of float32 values for one (N_COEFS,) row (numpy keeps float32 arrays
    float32 with them, NEP 50, and they are cheaper than numpy scalars in the loop); for per-image rows
    (B, N_COEFS), float32 columns shaped (B, 1, ..., 1) that broadcast against images."""
    c = np.asarray(coefs, dtype=np.float32)
    if c.ndim == 1:
        return c.tolist()
    return [col.reshape((-1,) + (1,) * (ndim - 1)) for col in c.T]


def _sigma(model_output: np.ndarray, c: int, s_min, s_log):
    """s_min, or per pixel s_min * exp(s_log * (v + 1) / 2) when the network has learned-variance channels."""
    if model_output.shape[1] == 2 * c and np.any(s_log != 0):
        return s_min * np.exp(s_log * (model_output[:, c:] + 1.0) / 2.0)
    return s_min


def step(x_t: np.ndarray, model_output: np.ndarray, z: np.ndarray, coefs: np.ndarray) -> np.ndarray:
    """One reverse step x_t -> x_{t-1} from a plan row with an all-zero history (float32 in, float32 out).

    That is every step of a history-free plan (DDPM, DDIM) and the first step of a multistep one.
    `model_output` has C channels (eps) or 2C (eps, v) for learned variance; `z` is N(0, I) noise like x_t;
    `coefs` is one row (N_COEFS,) or one per image (B, N_COEFS).
    """
    assert x_t.dtype == np.float32 and z.shape == x_t.shape, (x_t.dtype, z.shape, x_t.shape)
    c = x_t.shape[1]
    a_x, a_e, clip, s_min, s_log, u_x, _, u_0, _, _, _, p_c, p_0, _, _, c_e = _columns(coefs, x_t.ndim)
    eps = model_output[:, :c]
    m = np.minimum(np.maximum(a_x * x_t - a_e * eps, -clip), clip)        # (1) predicted x_0, clipped
    x_c = x_t if (isinstance(u_x, float) and u_x == 1.0 and u_0 == 0.0) else u_x * x_t + u_0 * m  # (2) h = 0
    x_prev = p_c * x_c + p_0 * m                                             # (3) mean of p(x_{t-1} | x_t)
    if not (isinstance(c_e, float) and c_e == 0.0):  # DDPM has no eps term: skip it (a pass over the image per step)
        x_prev += c_e * eps
    return (x_prev + _sigma(model_output, c, s_min, s_log) * z).astype(np.float32, copy=False)  # (4) + sigma z


def step_with_history(x_t: np.ndarray, model_output: np.ndarray, z: np.ndarray, coefs: np.ndarray,
                      hist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One reverse step of a multistep plan: (x_{t-1}, h_out) from x_t, the network output, z, a row (or per-image
    rows) and the history h (B, N_HIST, C, H, W) = [last_sample, m_1, m_2, m_3]; float32 throughout."""
    assert x_t.dtype == np.float32 and hist.shape == (len(x_t), N_HIST, *x_t.shape[1:]), hist.shape
    c = x_t.shape[1]
    a_x, a_e, clip, s_min, s_log, u_x, u_l, u_0, u_1, u_2, u_3, p_c, p_0, p_1, p_2, c_e = _columns(coefs, x_t.ndim)
    eps = model_output[:, :c]
    h0, h1, h2, h3 = hist[:, 0], hist[:, 1], hist[:, 2], hist[:, 3]
    m = np.minimum(np.maximum(a_x * x_t - a_e * eps, -clip), clip)                # (1) x_0-prediction
    x_c = u_x * x_t + u_l * h0 + u_0 * m + u_1 * h1 + u_2 * h2 + u_3 * h3          # (2) corrector (UniPC)
    x_prev = p_c * x_c + p_0 * m + p_1 * h1 + p_2 * h2 + c_e * eps                 # (3) predictor
    x_prev = (x_prev + _sigma(model_output, c, s_min, s_log) * z).astype(np.float32, copy=False)
    h_out = np.empty_like(hist)                                                    # (4) shift the history
    h_out[:, 0], h_out[:, 1], h_out[:, 2:] = x_c, m, hist[:, 1:3]
    return x_prev, h_out
