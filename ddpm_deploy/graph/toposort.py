"""Topological order of an ONNX graph's nodes (onnx.checker and TensorRT's parser want it)."""

from __future__ import annotations


def toposort(model) -> int:
    """Put `model`'s nodes in topological order (in place); returns how many moved.

    onnxruntime's float16 converter appends its input Casts at the end of the node list, so an fp16 export is
    valid but unsorted, which onnx.checker (and so `fused_from_eps`) refuses."""
    g = model.graph
    known = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    missing = [{i for i in n.input if i not in known} for n in g.node]
    waiting: dict[str, list[int]] = {}
    for j, need in enumerate(missing):
        for name in need:
            waiting.setdefault(name, []).append(j)
    order, emitted = [], [False] * len(missing)

    def emit(j, scan):  # Kahn's algorithm; a node ready at its own place stays there
        stack = [j]
        while stack:
            j = stack.pop()
            emitted[j] = True
            order.append(j)
            for out in g.node[j].output:
                for w in waiting.pop(out, []):
                    missing[w].discard(out)
                    if not missing[w] and w < scan:  # a node passed over earlier: place it now
                        stack.append(w)

    for j in range(len(missing)):
        if not missing[j]:
            emit(j, j)
    order += [j for j in range(len(missing)) if not emitted[j]]  # unresolvable: left for the checker to report
    moved = sum(a != b for a, b in enumerate(order))
    if moved:
        nodes = [type(g.node[j])() for j in order]
        for new, j in zip(nodes, order, strict=True):
            new.CopyFrom(g.node[j])
        del g.node[:]
        g.node.extend(nodes)
    return moved
