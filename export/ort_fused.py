"""The CPU-serving graph: every Group Attention block of ``model.onnx`` replaced by one fused custom op.

``model.onnx`` stays the one standard graph that TensorRT, Triton and every ONNX runtime read. For ONNX Runtime on
CPUs the export also writes ``model.fused.onnx``: the same graph in which each GA block's subgraph (about 30 nodes
and nine passes over its feature map) is one ``ganet.ops::GroupAttention`` node computed by
``ganet/kernels/group_attention.c``, sample by sample in the L2 cache. It is checked against PyTorch with the same
tolerances as ``model.onnx``; serving uses it where the kernel library builds and loads, and otherwise the standard
graph (it says which in its log).

A GA block is found by the module path the dynamo exporter records on each node (``ganet.export.fp16.ga_scope``):
its nodes read one tensor from outside (the block input) and one of their outputs is read outside (the block
output). The fused node takes its weights from the PyTorch module itself, not from the graph.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ganet.export.fp16 import STRUCTURAL, _index, _scopes
from ganet.kernels import DOMAIN, OP_TYPE, OPSET_VERSION

__all__ = ["FUSED_FILE", "FusionError", "fuse_group_attention", "has_fused_ops"]

FUSED_FILE = "model.fused.onnx"


class FusionError(RuntimeError):
    """A GA block's subgraph does not have the one-input, one-output shape the fusion expects."""


def _module(root: Any, scope: str) -> Any:
    """The module at ``scope`` (the exporter's path may carry prefixes the wrapper does not have)."""
    parts = scope.split(".")
    for start in range(len(parts)):
        try:
            return root.get_submodule(".".join(parts[start:]))
        except AttributeError:
            continue
    raise FusionError(f"no module at {scope!r} in {type(root).__name__}")


def _fusable(block: Any) -> bool:
    # The kernel implements the full block of the paper; the Table 2 ablations keep their standard subgraph.
    return bool(block.use_u4u and block.use_u4p and block.normalize)


def as_np(t: Any) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _weights(block: Any, key: str) -> list[onnx.TensorProto]:
    g, ch = block.groups, block.channels
    pair = np.stack([as_np(block.pool_conv.weight).reshape(g, ch // g),
                     as_np(block.assign_conv.weight).reshape(g, ch // g)], axis=1)  # (G, 2, C/G)
    params = np.stack([as_np(p) for p in (block.u4u_gamma, block.u4u_beta, block.pool_gamma, block.pool_beta,
                                          block.assign_gamma, block.assign_beta, block.alpha)])  # (7, G)
    return [numpy_helper.from_array(np.ascontiguousarray(as_np(block.u4u_conv.weight).reshape(g, ch)),
                                    f"{key}.u4u_weight"),
            numpy_helper.from_array(np.ascontiguousarray(pair), f"{key}.pair_weight"),
            numpy_helper.from_array(np.ascontiguousarray(params), f"{key}.params")]


def fuse_group_attention(model: onnx.ModelProto, root: Any) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with each fusable GA block as one custom node; ``root`` is the exported torch module.

    Returns the new graph and the number of blocks fused (0: nothing to fuse, e.g. a baseline network).
    """
    from ganet.layers.group_attention import GroupAttention

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    nodes = list(graph.node)  # keep the list alive: the helpers key nodes by id()
    scope = _scopes(nodes)
    producer, consumers = _index(nodes)
    initializers = {t.name for t in graph.initializer}
    graph_outputs = {o.name for o in graph.output}

    blocks: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        s = scope[id(node)]
        if s and s != STRUCTURAL:
            blocks.setdefault(s, []).append(node)

    replacement: dict[int, onnx.NodeProto] = {}  # first node of a block -> the fused node
    removed: set[int] = set()
    new_initializers: list[onnx.TensorProto] = []
    for s, members in blocks.items():
        block = _module(root, s)
        if not isinstance(block, GroupAttention):
            raise FusionError(f"{s!r} is a {type(block).__name__}, not a GroupAttention")
        if not _fusable(block):
            continue
        ids = {id(n) for n in members}
        made = {o for n in members for o in n.output}
        inputs = {i for n in members for i in n.input
                  if i and i not in made and i not in initializers
                  and not (i in producer and producer[i].op_type == "Constant")}
        outputs = {o for n in members for o in n.output
                   if o in graph_outputs or any(id(c) not in ids for c in consumers.get(o, []))}
        if len(inputs) != 1 or len(outputs) != 1:
            raise FusionError(f"GA block {s!r}: expected one input and one output, found inputs {sorted(inputs)} "
                              f"and outputs {sorted(outputs)}")
        key = s.replace(".", "_").replace(" ", "")
        new_initializers += _weights(block, key)
        (x,), (y,) = inputs, outputs
        replacement[id(members[0])] = helper.make_node(
            OP_TYPE, [x, f"{key}.u4u_weight", f"{key}.pair_weight", f"{key}.params"], [y], name=f"{key}/fused",
            domain=DOMAIN, epsilon=float(block.eps))
        removed |= ids

    if not replacement:
        return out, 0
    kept: list[onnx.NodeProto] = []
    for node in nodes:  # the fused node takes its block's place, so the graph stays topologically sorted
        if id(node) in replacement:
            kept.append(replacement[id(node)])
        if id(node) not in removed:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(new_initializers)
    used = {i for n in graph.node for i in n.input}
    unused = [t for t in graph.initializer if t.name not in used]
    for t in unused:
        graph.initializer.remove(t)
    del graph.value_info[:]  # shapes of the removed intermediates
    out.opset_import.append(helper.make_opsetid(DOMAIN, OPSET_VERSION))
    return out, len(replacement)


def has_fused_ops(model: onnx.ModelProto) -> bool:
    return any(n.domain == DOMAIN for n in model.graph.node)
