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

Then the ShuffleNetV2 unit around each block folds in too: ``channel_shuffle(concat(a, GA(x)), 2)`` is exported as
Unsqueeze, Unsqueeze, Concat(axis 2), Reshape, and the next unit opens with a Split into halves. Each Concat and
Split copies the whole map (and breaks ONNX Runtime's blocked NCHWc layout), about a tenth of the network's time at
32x32. ``GroupAttentionShuffle`` writes the shuffled map itself and ``GroupAttentionShuffleSplit`` its two halves,
so the block's output is written once, where the next unit reads it.

And the ImageNet stem (uint8 -> Cast, Mul, Add -> 3x3/2 Conv -> ReLU -> 3x3/2 MaxPool) becomes one
``ganet.ops::Stem`` node: ONNX Runtime cannot keep its 24-channel max pool in the blocked layout on AVX-512 (the
block is 16 channels), so it converts the conv's whole 112x112 output back and forth; the node computes the five
in one pass per sample (about 0.35 instead of 0.7 ms per 224x224 image here).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ganet.export.fp16 import STRUCTURAL, _index, _scopes
from ganet.export.trt_ops import _attr, _Graph
from ganet.kernels import DOMAIN, OP_TYPE, OP_TYPE_SHUFFLE, OP_TYPE_SHUFFLE_SPLIT, OP_TYPE_STEM, OPSET_VERSION

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


def fuse_group_attention(model: onnx.ModelProto, root: Any, fold_shuffles: bool = True, fuse_stem: bool = True
                         ) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with each fusable GA block as one custom node; ``root`` is the exported torch module.
    ``fold_shuffles``: also fold the channel shuffle (and the next unit's split) that follows a block into its node;
    ``fuse_stem``: the ImageNet stem as one node too (module docstring). Both leave the numbers as they are.

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
    for enabled, fusion in ((fold_shuffles, _fold_shuffles), (fuse_stem, _fuse_stem)):
        if enabled:
            _rewrite(graph, fusion)
    used = {i for n in graph.node for i in n.input}
    unused = [t for t in graph.initializer if t.name not in used]
    for t in unused:
        graph.initializer.remove(t)
    del graph.value_info[:]  # shapes of the removed intermediates
    out.opset_import.append(helper.make_opsetid(DOMAIN, OPSET_VERSION))
    return out, len(replacement)


def _rewrite(graph: onnx.GraphProto, fusion: Callable[[_Graph], list[onnx.NodeProto]]) -> None:
    """Replace ``graph``'s nodes by what ``fusion`` (``_fold_shuffles``, ``_fuse_stem``) makes of them."""
    nodes = fusion(_Graph(graph, types={}, outer_constants=set()))
    del graph.node[:]
    graph.node.extend(nodes)


def _only_reader(g: _Graph, name: str, op_type: str | None = None) -> onnx.NodeProto | None:
    """The one node that reads ``name`` (of ``op_type``, a standard op, if given); None if the tensor has other
    readers or is a graph output: only then may the fusion make it disappear."""
    readers = g.consumers.get(name, [])
    if len(readers) != 1 or name in g.outputs:
        return None
    if op_type is not None and (readers[0].op_type != op_type or readers[0].domain):
        return None
    return readers[0]


class _Shuffle(NamedTuple):
    """A GA node's shuffle as exported: concat(a, y) of its output y with the other branch a, and what it writes."""
    a: str
    concat: onnx.NodeProto
    nodes: list[onnx.NodeProto]  # Unsqueeze, Unsqueeze, Concat, Reshape[, Split]: what the folded node replaces
    outputs: list[str]  # [the shuffled map] or, where a Split into halves is its only reader, [its two halves]


def _match_shuffle(node: onnx.NodeProto, g: _Graph, channels: int) -> _Shuffle | None:
    """The shuffle after GA node ``node`` (``channels`` wide), or None if the graph there is not exactly that."""
    def unsqueezes_axis_2(n: onnx.NodeProto | None) -> bool:
        if n is None or n.op_type != "Unsqueeze":
            return False
        axes = g.constant_value(n.input[1]) if len(n.input) > 1 else _attr(n, "axes")
        return axes is not None and list(np.atleast_1d(axes)) == [2]

    unsq_y = _only_reader(g, node.output[0])
    concat = _only_reader(g, unsq_y.output[0], "Concat") if unsqueezes_axis_2(unsq_y) else None
    if concat is None or _attr(concat, "axis") != 2 or list(concat.input[1:]) != [unsq_y.output[0]]:
        return None  # (y must be the odd channels: concat(a, y), the order _concat_shuffle writes)
    unsq_a = g.producer.get(concat.input[0])
    if not unsqueezes_axis_2(unsq_a) or _only_reader(g, unsq_a.output[0]) is not concat:
        return None
    reshape = _only_reader(g, concat.output[0], "Reshape")
    shape = g.constant_value(reshape.input[1]) if reshape is not None else None
    if shape is None or len(shape) != 4 or shape[0] != -1 or shape[1] != 2 * channels or min(shape[2:]) < 1:
        return None
    nodes = [unsq_y, unsq_a, concat, reshape]
    split = _only_reader(g, reshape.output[0], "Split")
    if split is not None and _attr(split, "axis", 0) == 1 and len(split.output) == 2:
        has_input = len(split.input) > 1 and bool(split.input[1])
        sizes = g.constant_value(split.input[1]) if has_input else _attr(split, "split", [channels, channels])
        if sizes is not None and list(sizes) == [channels, channels]:  # (no sizes: equal halves)
            return _Shuffle(unsq_a.input[0], concat, nodes + [split], list(split.output))
    return _Shuffle(unsq_a.input[0], concat, nodes, [reshape.output[0]])


def _fold_shuffles(g: _Graph) -> list[onnx.NodeProto]:
    """The graph's nodes with the shuffle after each fused GA node folded into it (module docstring). The folded
    node takes the Concat's place: both its inputs exist there, and every reader of its outputs comes later."""
    weights = {t.name: t for t in g.graph.initializer}
    folded_at: dict[int, onnx.NodeProto] = {}  # id of the Concat -> the folded node
    removed: set[int] = set()
    for node in g.graph.node:
        if node.domain != DOMAIN or node.op_type != OP_TYPE or node.input[1] not in weights:
            continue
        shuffle = _match_shuffle(node, g, channels=int(weights[node.input[1]].dims[1]))  # u4u weight: (G, C)
        if shuffle is None:
            continue
        folded = onnx.NodeProto()
        folded.CopyFrom(node)
        folded.op_type = OP_TYPE_SHUFFLE_SPLIT if len(shuffle.outputs) == 2 else OP_TYPE_SHUFFLE
        folded.input.append(shuffle.a)
        del folded.output[:]
        folded.output.extend(shuffle.outputs)
        folded_at[id(shuffle.concat)] = folded
        removed |= {id(node), *(id(n) for n in shuffle.nodes)}
    return [folded_at.get(id(n), n) for n in g.graph.node if id(n) not in removed or id(n) in folded_at]


def _fuse_stem(g: _Graph) -> list[onnx.NodeProto]:
    """The graph's nodes with the ImageNet stem as one ``ganet.ops::Stem`` node, where the graph has exactly that
    stem: a graph input -> Cast(float) -> Mul(per-channel scale) -> Add(per-channel shift) -> Conv(3 -> C, 3x3,
    stride 2, pad 1) -> Relu -> MaxPool(3x3, stride 2, pad 1), each read only by the next. Else unchanged."""
    def per_channel(node: onnx.NodeProto, x: str) -> np.ndarray | None:
        other = [i for i in node.input if i != x]
        value = g.constant_value(other[0]) if len(other) == 1 else None
        return value.astype(np.float32).reshape(3) if value is not None and \
            value.shape in ((3,), (3, 1, 1), (1, 3, 1, 1)) else None

    def is_3x3_stride_2_pad_1(node: onnx.NodeProto) -> bool:
        return (_attr(node, "kernel_shape") in (None, [3, 3]) and _attr(node, "strides") == [2, 2]
                and _attr(node, "pads") == [1, 1, 1, 1] and _attr(node, "dilations") in (None, [1, 1])
                and _attr(node, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET") and not _attr(node, "ceil_mode")
                and not _attr(node, "storage_order"))

    nodes = list(g.graph.node)
    for cast in nodes:
        if cast.op_type != "Cast" or cast.input[0] not in g.inputs or _attr(cast, "to") != onnx.TensorProto.FLOAT:
            continue
        mul = _only_reader(g, cast.output[0], "Mul")
        add = mul and _only_reader(g, mul.output[0], "Add")
        conv = add and _only_reader(g, add.output[0], "Conv")
        relu = conv and _only_reader(g, conv.output[0], "Relu")
        pool = relu and _only_reader(g, relu.output[0], "MaxPool")
        if not pool or len(pool.output) != 1 or conv.input[0] != add.output[0]:
            continue
        scale, shift = per_channel(mul, cast.output[0]), per_channel(add, mul.output[0])
        weight = g.constant_value(conv.input[1])
        bias = g.constant_value(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
        if scale is None or shift is None or weight is None or weight.ndim != 4 or weight.shape[1:] != (3, 3, 3) \
                or _attr(conv, "group", 1) != 1 or not is_3x3_stride_2_pad_1(conv) or not is_3x3_stride_2_pad_1(pool):
            continue
        bias = np.zeros(weight.shape[0], np.float32) if bias is None else bias.astype(np.float32)
        weights = [numpy_helper.from_array(a, f"stem.{n}") for n, a in
                   (("scale", scale), ("shift", shift), ("weight", weight.astype(np.float32)), ("bias", bias))]
        g.graph.initializer.extend(weights)
        stem = helper.make_node(OP_TYPE_STEM, [cast.input[0]] + [t.name for t in weights],
                                [pool.output[0]], name="stem/fused", domain=DOMAIN)
        gone = {id(n) for n in (mul, add, conv, relu, pool)}
        # the node takes the Cast's place: it reads only a graph input and initializers
        return [stem if n is cast else n for n in nodes if id(n) not in gone]
    return nodes


def has_fused_ops(model: onnx.ModelProto) -> bool:
    return any(n.domain == DOMAIN for n in model.graph.node)
