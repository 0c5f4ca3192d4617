"""The fused step's interface lives in ddpm_deploy.fused_io and is versioned (issue 22 item 4): the graph is built
to it, every manifest of a fused graph records its version, the manifest reader checks the field, and what is
cached on disk for a fused graph is keyed by it. (The refusal of an engine of another version: test_tensorrt's
compatibility rule and test_device_emulation's load through the emulated TensorRT.)"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ddpm_deploy import fused_io
from ddpm_deploy.errors import UserError
from ddpm_deploy.artifact.manifest import MANIFEST_KEY, Manifest


def test_fused_graph_is_built_to_the_interface(tiny_onnx):
    """Names, order, dtypes and shapes of the built graph are fused_io's; its metadata manifest describes the
    fused graph (not the eps graph it came from) with the interface version."""
    import onnx
    import onnxruntime as ort

    from ddpm_deploy.graph.fused import fused_model

    manifest = Manifest.read(tiny_onnx)
    model = fused_model(tiny_onnx, manifest)
    assert tuple(i.name for i in model.graph.input) == fused_io.FUSED_INPUTS
    assert tuple(o.name for o in model.graph.output) == fused_io.FUSED_OUTPUTS
    for v in (*model.graph.input, *model.graph.output):
        assert v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT, v.name  # IO_DTYPE
    stamped = Manifest.from_json({p.key: p.value for p in model.metadata_props}[MANIFEST_KEY], "fused")
    assert stamped.graph == "fused" and stamped.fused_interface == fused_io.FUSED_INTERFACE_VERSION
    assert stamped.io == fused_io.FUSED_IO
    b = 3
    want = {**fused_io.input_shapes(manifest, b), **fused_io.output_shapes(manifest, b)}
    feeds = {n: np.zeros(want[n], np.float32) for n in fused_io.FUSED_INPUTS}
    feeds["coefs"][:, fused_io.COL["clip"]] = 1.0
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for name, out in zip(fused_io.FUSED_OUTPUTS, sess.run(None, feeds)):
        assert out.shape == want[name] and out.dtype == np.float32, name


def test_interface_tables_agree():
    assert fused_io.N_COEFS == len(fused_io.COL) == 16 and fused_io.N_HIST == len(fused_io.HIST_SLOTS) == 4
    assert set(fused_io.FUSED_IO["inputs"]) == set(fused_io.INPUTS) and set(fused_io.FUSED_IO["outputs"]) == set(
        fused_io.OUTPUTS)
    state = {n for pair in fused_io.FUSED_STATE for n in pair}
    assert state | set(fused_io.FUSED_PER_STEP) == set(fused_io.FUSED_INPUTS) | {"x_prev", "hist_out"}
    from ddpm_deploy.sampling import plan as samplers

    assert samplers.COL is fused_io.COL and not hasattr(samplers, "HISTORY_COLUMNS")  # one definition, fused_io's


@pytest.mark.parametrize("value,graph,words", [
    ("1", "fused", "must be an integer"), (0, "fused", "must be an integer in 1.."), (1.5, "fused", "must be an integer"),
    (True, "fused", "must be an integer"), (1, None, "belongs to fused graphs only")])
def test_manifest_field_is_checked(tiny_onnx, value, graph, words):
    """A sidecar's fused_interface is read like every other field: type and range, one line naming file and
    field; it belongs to fused graphs only."""
    d = Manifest.read(tiny_onnx).to_dict()
    d["fused_interface"] = value
    if graph:
        d["graph"] = graph
    with pytest.raises(UserError) as e:
        Manifest.from_dict(d, "m.trt.json")
    msg = str(e.value)
    assert "m.trt.json" in msg and "fused_interface" in msg and words in msg and "\n" not in msg


def test_manifest_round_trips_the_version(tiny_onnx):
    from ddpm_deploy.graph.fused import fused_manifest

    m = fused_manifest(Manifest.read(tiny_onnx))
    d = json.loads(m.to_json())
    assert d["fused_interface"] == fused_io.FUSED_INTERFACE_VERSION and d["graph"] == "fused"
    assert Manifest.from_dict(d, "x").to_dict() == m.to_dict()
    assert "fused_interface" not in Manifest.read(tiny_onnx).to_dict()  # an eps graph has none


def test_onnxruntime_tensorrt_cache_is_keyed_by_model_and_interface(tiny_onnx, tiny_onnx_fp16, monkeypatch):
    """onnxruntime's TensorRT provider reuses a cached engine for any graph with the same names; its folder names
    the model's weights, dtype and the interface version, so none of them can change under a cached engine."""
    from ddpm_deploy.runtime.backends.onnxruntime_backend import trt_cache_folder

    m32, m16 = Manifest.read(tiny_onnx), Manifest.read(tiny_onnx_fp16)
    here = trt_cache_folder(m32, "c")
    assert here.startswith("c/") and here != trt_cache_folder(m16, "c")
    assert here != trt_cache_folder(m32.replace(source_sha256="0" * 64), "c")
    monkeypatch.setattr(fused_io, "FUSED_INTERFACE_VERSION", fused_io.FUSED_INTERFACE_VERSION + 1)
    assert trt_cache_folder(m32, "c") != here


def test_auto_cache_is_keyed_by_the_interface(tmp_path, monkeypatch):
    """Backend auto caches a choice measured on the fused step: another interface measures afresh (no hand-bumped
    CACHE_FORMAT needed)."""
    from ddpm_deploy.runtime.auto import cache_key, cache_path

    key = lambda: cache_key("0" * 64, 1, machine={"cpu": "x"}, versions={"numpy": "1"})  # noqa: E731
    before = cache_path(key(), tmp_path)
    assert cache_path(key(), tmp_path) == before
    monkeypatch.setattr(fused_io, "FUSED_INTERFACE_VERSION", fused_io.FUSED_INTERFACE_VERSION + 1)
    assert cache_path(key(), tmp_path) != before
