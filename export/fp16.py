"""fp32 ONNX -> fp16 ONNX with fp32 inputs/outputs (onnxruntime's float16 converter), keeping fragile nodes fp32.

Always kept in fp32: the timestep embedding (every node between the `t` input and its Sin/Cos): sin(t * f)
with t up to 999 needs more than fp16's 11-bit mantissa (fp16 spacing at 999 is 0.5 rad). Beyond that,
`precision_audit` (export --fp16) picks nodes from real reverse-chain trajectories.
"""

from __future__ import annotations

from collections import deque

ALWAYS_FP32_OPS: list[str] = []


def _producers(model) -> dict:
    return {out: node for node in model.graph.node for out in node.output}


def timestep_embedding_nodes(model, t_input: str = "t") -> list[str]:
    """Names of nodes on a path from input `t` to a Sin/Cos (inclusive)."""
    producers = _producers(model)
    keep, queue = set(), deque(n for n in model.graph.node if n.op_type in ("Sin", "Cos"))
    while queue:
        node = queue.popleft()
        if node.name in keep:
            continue
        keep.add(node.name)
        queue.extend(producers[i] for i in node.input if i in producers)
    # Only nodes that (transitively) depend on t: drop constant-only branches, which are cheap either way.
    return sorted(keep)


def ensure_node_names(model) -> None:
    """The converter blocks nodes by name; give unnamed nodes stable names."""
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"


def convert(model, fp32_nodes: list[str]):
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True, op_block_list=DEFAULT_OP_BLOCK_LIST + ALWAYS_FP32_OPS,
                                    node_block_list=list(fp32_nodes))


def fp16_from_fp32(model, *, ckpt=None, audit: bool = True, echo=print):
    """Returns (fp16 model, precision map for the manifest)."""
    import copy

    model = copy.deepcopy(model)
    ensure_node_names(model)
    fp32_nodes = timestep_embedding_nodes(model)
    reasons = {n: "timestep embedding (sin/cos of t needs fp32)" for n in fp32_nodes}
    if audit and ckpt is not None:
        from .precision_audit import audit_fp16

        found = audit_fp16(model, ckpt, fp32_nodes, echo=echo)
        reasons.update(found)
    model16 = convert(model, sorted(reasons))
    precision = {"default": "float16", "fp32_nodes": {n: reasons[n] for n in sorted(reasons)}}
    echo(f"  fp16: {len(model.graph.node)} nodes, {len(reasons)} kept in fp32")
    return model16, precision
