"""Per-step tables in device memory, for the device backends (TensorRT, onnxruntime IO binding) that bind or copy a
table row per step: rows that start at 256-byte aligned offsets. The loop itself is ddpm_deploy.loop.

TensorRT's setTensorAddress needs 256-byte aligned pointers (NvInferRuntime.h) and onnxruntime's TensorRT provider
ignores its return value (a rejected address silently keeps the old one): every table row starts at a multiple of
ROW_ALIGN from a 256-aligned base.
"""

from __future__ import annotations

import numpy as np

ROW_ALIGN = 256


def row_stride(nbytes: int) -> int:
    """Bytes from one table row to the next: `nbytes` rounded up to ROW_ALIGN."""
    return -(-int(nbytes) // ROW_ALIGN) * ROW_ALIGN


def aligned_rows(a: np.ndarray) -> np.ndarray:
    """(K, ...) float32 -> (K, row_stride / 4) float32, row k = a[k] flattened then zero padding: row k starts
    k * row_stride bytes from the start of the table."""
    rows = np.ascontiguousarray(a.reshape(len(a), -1), dtype=np.float32)
    if rows.shape[1] * 4 == row_stride(rows.shape[1] * 4):  # already a multiple of ROW_ALIGN: no padding
        return rows
    out = np.zeros((len(a), row_stride(rows.shape[1] * 4) // 4), np.float32)
    out[:, :rows.shape[1]] = rows
    return out
