"""Reading an int8 OpenVINO model of `export --int8` (the fused step graph, quantized by NNCF; manifest in the
sidecar `<model>.xml.json`) for the OpenVINO backend.

The .xml and .bin are read into memory once, checked against the sidecar's engine_sha256, and OpenVINO reads those
same bytes: a file swapped after the check cannot be what runs, and a sidecar never describes another model.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import UserError, first_line
from ...files import sha256_bytes
from ...artifact.fields import REEXPORT_INT8
from ...artifact.manifest import Manifest, int8_sidecar_path


def read_int8_model(core, path: str, manifest: Manifest, precision: str):
    """The ov.Model of the int8 file at `path` described by `manifest` (its sidecar's). Its float layers (the
    step's update, the layers kept out of quantization) run in fp32: --precision bf16 is refused."""
    if precision != "fp32":
        raise UserError(f"{path} is an int8 model: its float layers run in fp32 (--precision {precision} does not "
                        "apply); leave --precision out")
    xml, weights = Path(path), Path(path).with_suffix(".bin")
    try:
        xml_bytes, bin_bytes = xml.read_bytes(), weights.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {e.filename}: {e.strerror}; the .xml needs its .bin beside it, "
                        f"{REEXPORT_INT8}") from None
    if sha256_bytes(xml_bytes + bin_bytes) != manifest.engine_sha256:
        raise UserError(f"{int8_sidecar_path(path)} describes another model than {xml.name} + {weights.name} "
                        f"(sha256 differs); {REEXPORT_INT8}")
    try:
        import openvino as ov

        model = core.read_model(xml_bytes, ov.Tensor(_as_array(bin_bytes)))
    except Exception as e:
        raise UserError(f"OpenVINO cannot read {path}: {first_line(e)}; {REEXPORT_INT8}") from None
    names = {n for port in model.inputs for n in port.get_names()} | {n for port in model.outputs
                                                                      for n in port.get_names()}
    missing = [n for n in manifest.io.get("inputs", {}) if n not in names]
    missing += [n for n in manifest.io.get("outputs", {}) if n not in names]
    if missing:
        raise UserError(f"{path} lacks the fused step's {', '.join(missing)}: it is not a model of `export --int8`; "
                        f"{REEXPORT_INT8}")
    return model


def _as_array(data: bytes):
    import numpy as np

    return np.frombuffer(data, dtype=np.uint8)
