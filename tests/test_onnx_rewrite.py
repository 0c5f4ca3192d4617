"""The CPU GroupNormalization rewrite: same network output as the file as exported, no GroupNormalization left."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from ddpm_deploy.graph.rewrite import instance_norm_from_group_norm
from ddpm_deploy.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

# fp32: the same math through other kernels (InstanceNormalization vs the inlined function body); only the
# summation order differs. fp16: both keep stage 1 in fp32 and stage 2 in fp16, but round at different points;
# fp16 has 11 bits, so a few units of 2^-11 on values of order 1.
ATOL = {"fp32": 1e-5, "fp16": 1e-2}


def _ops(model) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_rewrite_replaces_every_group_norm(tiny_onnx):
    model = onnx.load(tiny_onnx)
    n = _ops(model).count("GroupNormalization")
    assert n > 0
    assert instance_norm_from_group_norm(model) == n
    assert "GroupNormalization" not in _ops(model) and _ops(model).count("InstanceNormalization") == n


def test_older_opset_is_left_alone(tiny_onnx):
    model = onnx.load(tiny_onnx)
    model.opset_import[0].version = 18  # opset-18 GroupNormalization has per-group scale: another meaning
    assert instance_norm_from_group_norm(model) == 0


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_rewritten_backend_matches_file_as_exported(tiny_onnx, tiny_onnx_fp16, dtype):
    path = tiny_onnx if dtype == "fp32" else tiny_onnx_fp16
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 1, 8, 8), dtype=np.float32)
    t = np.array([0, 17, 33, 49], dtype=np.float32)
    with OnnxRuntimeBackend(path, threads=1) as fast, OnnxRuntimeBackend(path, threads=1, cpu_rewrites=False) as ref:
        np.testing.assert_allclose(fast.eps(x, t), ref.eps(x, t), atol=ATOL[dtype])
