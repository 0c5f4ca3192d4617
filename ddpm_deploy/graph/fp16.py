"""fp32 ONNX -> fp16 ONNX with fp32 inputs/outputs (onnxruntime's float16 converter), keeping fragile nodes fp32.

Always kept in fp32: the timestep embedding (every node between the `t` input and its Sin/Cos): sin(t * f)
with t up to 999 needs more than fp16's 11-bit mantissa (fp16 spacing at 999 is 0.5 rad). Beyond that,
`precision_audit` (export --fp16) picks nodes from real reverse-chain trajectories.
"""
# onnx (1.1 s to import) and onnxruntime are imported by the functions that use them.

from __future__ import annotations

from collections import deque

from .toposort import toposort

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
    return sorted(keep)  # includes constant-only ancestors (shape ops): cheap in fp32, and kept with their users


def ensure_node_names(model) -> None:
    """The converter blocks nodes by name; give unnamed nodes stable names."""
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"


def convert(model, fp32_nodes: list[str]):
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    converted = convert_float_to_float16(model, keep_io_types=True,
                                         op_block_list=DEFAULT_OP_BLOCK_LIST,
                                         node_block_list=list(fp32_nodes))
    if _drop_cast_round_trips(converted):
        _drop_dead_nodes(converted)
    toposort(converted)  # the converter appends its input Casts at the end; checkers want graph order
    return converted


def _drop_cast_round_trips(model) -> int:
    """Between two nodes kept in fp32 the converter still routes the tensor through fp16
    (Cast to fp16, then Cast back to fp32), which brings back the overflow the audit avoided.
    Replace each such Cast-to-fp32 with an Identity of the original fp32 tensor."""
    from onnx import TensorProto, helper

    producers = _producers(model)
    to = lambda n: next((a.i for a in n.attribute if a.name == "to"), None)  # noqa: E731
    dropped = 0
    for i, node in enumerate(model.graph.node):
        if node.op_type != "Cast" or to(node) != TensorProto.FLOAT:
            continue
        src = producers.get(node.input[0])
        if src is not None and src.op_type == "Cast" and to(src) == TensorProto.FLOAT16:
            src_in = producers.get(src.input[0])
            # only when the fp16 Cast's input is itself fp32 from a kept node (not a graph input of another type)
            if src_in is not None and src_in.op_type != "Cast":
                model.graph.node[i].CopyFrom(helper.make_node("Identity", [src.input[0]], list(node.output),
                                                              name=node.name))
                dropped += 1
    return dropped


def _drop_dead_nodes(model) -> None:
    """Remove nodes none of whose outputs is used (the fp16 Casts orphaned by _drop_cast_round_trips)."""
    g = model.graph
    while True:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        dead = [i for i, n in enumerate(g.node) if not any(o in used for o in n.output)]
        if not dead:
            return
        for i in reversed(dead):
            del g.node[i]
