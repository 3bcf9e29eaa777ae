"""Mixed-precision fp16 ONNX for strongly typed TensorRT builds, with the GA block's fragile parts kept in fp32.

The GA block standardises every attention map over H*W (mean, then the root mean square of the centred map) and
takes a softmax over H*W. In fp16 the sum of squares overflows (65504 is reached by 1024 pixels of magnitude 8) and the
softmax normaliser loses the small weights, so those nodes -- the *fp32 islands* -- run in fp32 while every
convolution and matmul over the feature map runs in fp16.

An island starts at a reduction (ReduceMean, ReduceL2, ...) or a Softmax inside a GroupAttention module and
follows the data forward through the small (B, G, H*W) maps until the mask nonlinearity (Sigmoid/Softmax), never
into a MatMul or Conv. GA nodes are recognised by the module path the exporter records: the dynamo exporter's
``namespace`` metadata names the ``GroupAttention`` class; without metadata (the TorchScript exporter) the node
name's ``.../attn/...`` scope is used; with neither (a graph simplifier such as onnxslim drops the metadata), by
structure: a mean whose input is centred by it, the norm (or mean square) of the centred map, and every softmax.

``fp32_island_nodes`` (node names) is what the TensorRT 10 builder pins to fp32 with layer precisions;
``to_mixed_fp16`` writes the same split into the graph (Cast nodes at the boundaries) for TensorRT 11, where
networks are always strongly typed. Imports ``onnx`` only.
"""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["ga_scope", "fp32_island_nodes", "island_summary", "to_mixed_fp16"]

GA_CLASS = "GroupAttention"
_SEED_OPS = {"ReduceMean", "ReduceL2", "ReduceSumSquare", "ReduceSum", "ReduceL1", "Softmax", "LogSoftmax"}
_TERMINAL_OPS = {"Sigmoid", "Softmax", "LogSoftmax", "HardSigmoid", "Tanh"}  # the island ends with the mask
_FEATURE_MAP_OPS = {"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum"}  # never in an island: they stay fp16
_TYPE_AGNOSTIC = {"Shape", "Size"}  # read only a float tensor's shape: no Cast needed in front of them
_FP32_ONLY_INPUTS = {"Resize": {2}, "Upsample": {1}}  # `scales` is tensor(float) by the ONNX spec


def ga_scope(node: onnx.NodeProto) -> str | None:
    """The module path of the GroupAttention block ``node`` belongs to, or None."""
    meta = {p.key: p.value for p in node.metadata_props}
    namespace = meta.get("namespace")
    if namespace:  # ": __main__.W/m: ...ShuffleNetV2/.../m.stage2.0.attn: ganet.layers.group_attention.GroupAttention/op"
        for segment in namespace.split("/"):
            path, _, cls = segment.partition(": ")
            if cls.rsplit(".", 1)[-1] == GA_CLASS:
                return path.strip()
        return None
    parts = node.name.split("/")  # TorchScript exporter: "/m/stage2/stage2.0/attn/Softmax"
    if "attn" in parts[:-1]:
        return "/".join(parts[: parts.index("attn") + 1])
    return None


# The helpers below key nodes by id(): they take a *list* of the graph's nodes and the caller keeps that list alive,
# because protobuf may hand out a fresh wrapper object (with a new id) each time ``graph.node`` is iterated.

def _index(nodes: list[onnx.NodeProto]) -> tuple[dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]]]:
    producer, consumers = {}, {}
    for node in nodes:
        for out in node.output:
            if out:
                producer[out] = node
        for inp in node.input:
            if inp:
                consumers.setdefault(inp, []).append(node)
    return producer, consumers


STRUCTURAL = "(structural)"  # the scope of every node when the graph records no module paths at all


def _scopes(nodes: list[onnx.NodeProto]) -> dict[int, str | None]:
    scope = {id(n): ga_scope(n) for n in nodes}
    if not (any(scope.values()) or any(n.metadata_props for n in nodes)):
        return {id(n): STRUCTURAL for n in nodes}  # e.g. after onnxslim, which drops node metadata
    # A node the exporter's optimizer made (a Split from two slices, say) has no metadata: it belongs to the block
    # that both feeds it and reads all its outputs.
    producer, consumers = _index(nodes)
    for node in nodes:
        if node.metadata_props:
            continue
        inside = {scope[id(producer[i])] for i in node.input if i in producer}
        outside = {scope[id(u)] for o in node.output for u in consumers.get(o, [])}
        if len(inside) == 1 and inside == outside:
            scope[id(node)] = inside.pop()
    return scope


def _is_centring_mean(node: onnx.NodeProto, consumers: dict) -> bool:
    """A ReduceMean whose input also feeds a Sub with the mean: ``x - mean(x)``, a standardisation's first step."""
    if node.op_type != "ReduceMean" or not node.input:
        return False
    return any(u.op_type == "Sub" and list(u.input) == [node.input[0], node.output[0]]
               for u in consumers.get(node.output[0], []))


def _seeds(all_nodes: list[onnx.NodeProto], scope: dict, consumers: dict) -> list[onnx.NodeProto]:
    nodes = [n for n in all_nodes if n.op_type in _SEED_OPS and scope[id(n)] is not None]
    if not any(s == STRUCTURAL for s in scope.values()):
        return nodes
    # No module paths: GA normalisations are recognised by their shape -- mean(x), x - mean, the norm of x - mean --
    # and every softmax counts (the classifier has none). The global average pool of the head matches none of it.
    means = [n for n in nodes if _is_centring_mean(n, consumers)]
    centred = {u.output[0] for m in means for u in consumers[m.output[0]] if u.op_type == "Sub"}
    squares = {u.output[0] for c in centred for u in consumers.get(c, [])
               if u.op_type == "Mul" and list(u.input) == [c, c]}
    norms = [n for n in nodes if (n.op_type in ("ReduceL2", "ReduceSumSquare") and n.input[0] in centred)
             or (n.op_type == "ReduceMean" and n.input[0] in squares)]  # mean((x - mean)^2)
    softmaxes = [n for n in nodes if n.op_type in ("Softmax", "LogSoftmax")]
    return means + norms + softmaxes


def _island_nodes(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    producer, consumers = _index(nodes)
    scope = _scopes(nodes)
    seeds = _seeds(nodes, scope, consumers)
    keep: dict[int, onnx.NodeProto] = {}
    # Forward from each seed through the small maps, up to and including the mask nonlinearity.
    stack = list(seeds)
    while stack:
        node = stack.pop()
        if id(node) in keep:
            continue
        keep[id(node)] = node
        if node.op_type in _TERMINAL_OPS:
            continue
        for out in node.output:
            for user in consumers.get(out, []):
                if scope[id(user)] == scope[id(node)] and user.op_type not in _FEATURE_MAP_OPS:
                    stack.append(user)
    # Backward from each reduction to the matmul that makes the logits, inclusive: the normalisation subtracts a
    # mean that can be much larger than the spread, so logits rounded to fp16 before it would lose the map itself.
    stack = [n for n in seeds if n.op_type not in _TERMINAL_OPS]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        keep[id(node)] = node
        if node.op_type in _FEATURE_MAP_OPS:
            continue  # its feature-map input is cast to fp32 here, once
        for name in node.input:
            src = producer.get(name)
            if src is not None and scope[id(src)] == scope[id(node)] and id(src) not in seen:
                stack.append(src)
    return [n for n in nodes if id(n) in keep]  # graph order


def fp32_island_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes to compute in fp32 (graph order): the GA normalisations and softmaxes."""
    nodes = _island_nodes(list(model.graph.node))
    unnamed = [n.op_type for n in nodes if not n.name]
    if unnamed:
        raise ValueError(f"fp32_island_nodes: {len(unnamed)} island nodes have no name ({unnamed[:3]}...); "
                         "TensorRT layers are matched by node name, so name every node")
    return [n.name for n in nodes]


def island_summary(model: onnx.ModelProto) -> dict[str, dict[str, int]]:
    """``{GA module path: {op type: count}}`` of the fp32 islands: what a test or a report can assert."""
    summary: dict[str, Counter] = {}
    nodes = list(model.graph.node)
    scope = _scopes(nodes)
    for node in _island_nodes(nodes):
        summary.setdefault(scope[id(node)], Counter())[node.op_type] += 1
    return {scope: dict(counts) for scope, counts in summary.items()}


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    g = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.input, *g.output, *g.value_info]}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def _to_fp16_tensor(t: onnx.TensorProto) -> onnx.TensorProto:
    # Clip to fp16's range first: a weight beyond 65504 would otherwise become inf.
    array = np.clip(numpy_helper.to_array(t), -65504.0, 65504.0).astype(np.float16)
    return numpy_helper.from_array(array, t.name)


def to_mixed_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` computing in fp16 except the fp32 islands; graph inputs and outputs keep their types.

    Float initializers become fp16 unless only island nodes read them; Cast nodes (named ``<tensor>__to_fp16`` /
    ``__to_fp32``) sit wherever a tensor crosses between the two precisions. A graph output produced in fp16 gets a
    final Cast to fp32 under its original name, so the output stays float32 and keeps its name.
    """
    if model.functions or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                              for n in model.graph.node for a in n.attribute):
        raise ValueError("to_mixed_fp16: local functions and control flow (If/Loop/Scan) are not supported; "
                         "export a flat graph")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    types = _elem_types(out)
    nodes = list(graph.node)  # kept alive: ids below refer to these objects
    producer, consumers = _index(nodes)
    keep = {id(n) for n in _island_nodes(nodes)}
    # Constant-only feeders of the islands (e.g. Unsqueeze(gamma)) stay fp32 too: they are folded at build time.
    initializers = {t.name for t in graph.initializer}
    constant = set(initializers)
    for node in nodes:  # graph order is topological
        if node.op_type == "Constant" or (node.input and all(i in constant for i in node.input if i)):
            constant.update(o for o in node.output if o)
    changed = True
    while changed:
        changed = False
        for node in nodes:
            users = [u for o in node.output for u in consumers.get(o, [])]
            if (id(node) not in keep and node.op_type != "Cast" and users and all(id(u) in keep for u in users)
                    and all(o in constant for o in node.output if o)):
                keep.add(id(node))
                changed = True
    kept = len(keep)

    def is_float(name: str) -> bool:
        return types.get(name) == TensorProto.FLOAT

    # Where each float tensor lives: "fp32" or "fp16".
    domain: dict[str, str] = {}
    for vi in graph.input:
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            domain[vi.name] = "fp32"
    def wants_fp32(node: onnx.NodeProto, k: int) -> bool:
        return id(node) in keep or k in _FP32_ONLY_INPUTS.get(node.op_type, ())

    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            uses = [(u, k) for u in consumers.get(init.name, []) for k, i in enumerate(u.input) if i == init.name]
            domain[init.name] = "fp32" if uses and all(wants_fp32(u, k) for u, k in uses) else "fp16"
    for node in nodes:
        for o in node.output:
            if o and is_float(o):
                domain[o] = "fp32" if id(node) in keep else "fp16"

    # Rewrite float payloads of fp16 nodes: initializers, Constant/ConstantOfShape values, Cast targets.
    for i, init in enumerate(graph.initializer):
        if domain.get(init.name) == "fp16":
            graph.initializer[i].CopyFrom(_to_fp16_tensor(init))
    for node in nodes:
        if id(node) in keep:
            continue
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.FLOAT16
            elif a.name == "value" and a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(_to_fp16_tensor(a.t))
            elif a.name == "dtype" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.FLOAT16
        if node.op_type == "ConstantOfShape" and not any(a.name == "value" for a in node.attribute):
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.zeros(1, np.float16))))

    # fp16-computed graph outputs: the producer writes "<name>__fp16", a Cast restores "<name>" in fp32.
    tail: list[onnx.NodeProto] = []
    for vi in graph.output:
        if domain.get(vi.name) == "fp16":
            renamed = f"{vi.name}__fp16"
            for node in nodes:
                for field in (node.input, node.output):
                    for k, name in enumerate(field):
                        if name == vi.name:
                            field[k] = renamed
            domain[renamed] = "fp16"
            types[renamed] = TensorProto.FLOAT
            tail.append(helper.make_node("Cast", [renamed], [vi.name], to=TensorProto.FLOAT,
                                         name=f"{vi.name}__to_fp32"))

    # Boundary casts, each emitted once, right after the tensor's producer (or first, for inputs/initializers).
    casts: dict[tuple[str, str], str] = {}
    after: dict[int, list[onnx.NodeProto]] = {}  # id(producer) -> casts of its outputs
    head: list[onnx.NodeProto] = []

    def in_domain(name: str, want: str) -> str:
        if (name, want) not in casts:
            cast_name = f"{name}__to_{want}"
            to = TensorProto.FLOAT if want == "fp32" else TensorProto.FLOAT16
            cast = helper.make_node("Cast", [name], [cast_name], to=to, name=cast_name)
            src = producers.get(name)
            (after.setdefault(id(src), []) if src is not None else head).append(cast)
            casts[name, want] = cast_name
        return casts[name, want]

    producers, _ = _index(nodes)
    for node in nodes:
        if node.op_type in _TYPE_AGNOSTIC or node.op_type == "Cast":
            continue
        for k, name in enumerate(node.input):
            if not name or name not in domain:
                continue
            want = "fp32" if wants_fp32(node, k) else "fp16"
            if domain[name] != want:
                node.input[k] = in_domain(name, want)

    ordered = list(head)
    for node in nodes:
        ordered.append(node)
        ordered.extend(after.get(id(node), []))
    ordered.extend(tail)
    ordered = [onnx.NodeProto.FromString(n.SerializeToString()) for n in ordered]  # detach before clearing
    del graph.node[:]
    graph.node.extend(ordered)
    del graph.value_info[:]  # stale element types; shape inference rebuilds them on demand
    helper.set_model_props(out, {**{p.key: p.value for p in out.metadata_props},
                                 "ganet.mixed_fp16": json.dumps({"fp32_nodes": kept, "casts": len(casts) + len(tail)})})
    return out
