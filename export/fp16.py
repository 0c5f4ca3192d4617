"""Drive the fp16 conversion of an exported graph: the timestep embedding always stays fp32, the audit on real
trajectories picks the rest (graph edits live in `ddpm_deploy.graph.fp16` and `.precision_audit`)."""

from __future__ import annotations

import copy

from ..graph.fp16 import convert, ensure_node_names, timestep_embedding_nodes
from ..graph.precision_audit import audit_fp16


def fp16_from_fp32(model, *, ckpt=None, audit: bool = True, echo=print, audit_sampler: dict | None = None):
    """Returns (fp16 model, precision map for the manifest)."""
    model = copy.deepcopy(model)
    ensure_node_names(model)
    fp32_nodes = timestep_embedding_nodes(model)
    reasons = {n: "timestep embedding (sin/cos of t needs fp32)" for n in fp32_nodes}
    if audit and ckpt is not None:
        found = audit_fp16(model, ckpt, fp32_nodes, echo=echo, sampler=audit_sampler)
        reasons.update(found)
    model16 = convert(model, sorted(reasons))
    precision = {"default": "float16", "fp32_nodes": {n: reasons[n] for n in sorted(reasons)}}
    echo(f"  fp16: {len(model.graph.node)} nodes, {len(reasons)} kept in fp32")
    return model16, precision
