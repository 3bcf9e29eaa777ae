"""Will TensorRT's ONNX parser take this graph? Answered on a CPU-only machine, before anyone reaches a GPU.

The table below transcribes the ONNX-TensorRT operator support matrix (``docs/operators.md`` of
github.com/onnx/onnx-tensorrt, TensorRT 10.x: opsets 9 to 24) with the restrictions that can bite an exported CNN:
constant ``axes`` of reductions and (un)squeeze, ``Resize`` modes, 2D/3D pooling, shape tensors that come from
constants or ``Shape`` (never from data), known input ranks, and its dtype rules: no DOUBLE (the parser clamps it to
FLOAT), UINT8 only as a network input or output tensor (so only a ``Cast`` may read a uint8 image input), INT8/FP8/
INT4/FP4 only inside Q/DQ quantization. An op the table does not list, or lists as unsupported, is a problem.

Imports ``onnx`` only (no torch, no TensorRT).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["TrtOpProblem", "check_tensorrt_compatibility", "SUPPORTED_OPS", "OPSET_RANGE"]

OPSET_RANGE = (9, 24)  # ai.onnx opsets the TensorRT 10.x parser accepts (10.0 stopped at 20)

_FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}
_INTS = {TensorProto.INT32, TensorProto.INT64}
_QUANT = {TensorProto.INT8, TensorProto.FLOAT8E4M3FN, TensorProto.INT4, TensorProto.FLOAT4E2M1}
_TYPE_CODES = {"F": _FLOATS, "I": _INTS, "B": {TensorProto.BOOL}, "U": {TensorProto.UINT8}, "Q": _QUANT,
               "f": {TensorProto.FLOAT, TensorProto.FLOAT16}, "s": {TensorProto.FLOAT}, "i": {TensorProto.INT32}}
# Every dtype the parser accepts somewhere; anything else (DOUBLE, STRING, UINT16, ...) is a problem wherever it is.
_ANY_SUPPORTED = _FLOATS | _INTS | _QUANT | {TensorProto.BOOL, TensorProto.UINT8}

# op -> dtype codes of its checked input (F: fp32/fp16/bf16, I: int32/int64, B: bool, U: uint8, Q: quantized,
# f: fp32/fp16, s: fp32 only, i: int32). From the 10.x support matrix; ops it marks "N" are left out.
_TABLE = """
Abs FI; Acos F; Acosh F; Add FI; And B; ArgMax FI; ArgMin FI; Asin F; Asinh F; Atan F; Atanh F; Attention FQ;
AveragePool F; BatchNormalization F; BlackmanWindow f; Cast FIUB; CastLike FIUB; Ceil F; Celu F; Clip F; Concat FIB;
Constant FQIB; ConstantOfShape FQIB; Conv F; ConvTranspose F; Cos F; Cosh F; CumSum F; DeformConv f;
DepthToSpace FI; DequantizeLinear Q; Div FI; Dropout F; Einsum F; Elu F; Equal FI; Erf F; Exp F; Expand FIB;
EyeLike FIB; Flatten FIB; Floor F; Gather FIB; GatherElements FIB; GatherND FIB; Gelu FQI; Gemm F;
GlobalAveragePool F; GlobalLpPool F; GlobalMaxPool F; Greater FI; GreaterOrEqual FI; GridSample f;
GroupNormalization F; GRU F; HammingWindow f; HannWindow f; HardSigmoid F; HardSwish F; Hardmax F; Identity FIB;
If FIB; ImageScaler F; InstanceNormalization F; IsInf F; IsNaN FI; LayerNormalization F; LeakyRelu F; Less FI;
LessOrEqual FI; Log F; LogSoftmax F; Loop FIB; LRN F; LSTM F; LpNormalization F; LpPool F; MatMul F; Max FI;
MaxPool F; Mean FQI; MeanVarianceNormalization F; Min FI; Mish f; Mod FI; Mul FI; Neg FI; NonMaxSuppression f;
NonZero f; Not B; OneHot FIB; Or B; Pad FI; ParametricSoftplus F; Pow FI; PRelu F; QuantizeLinear F; RandomNormal F;
RandomNormalLike F; RandomUniform F; RandomUniformLike F; Range FI; Reciprocal F; ReduceL1 FI; ReduceL2 FI;
ReduceLogSum FI; ReduceLogSumExp FI; ReduceMax FI; ReduceMean FI; ReduceMin FI; ReduceProd FI; ReduceSum FI;
ReduceSumSquare FI; Relu FI; Reshape FIB; Resize F; ReverseSequence FIB; RMSNormalization F; RNN F; RoiAlign f;
RotaryEmbedding F; Round F; STFT s; ScaledTanh F; Scan F; Scatter FI; ScatterElements FI; ScatterND FI; Selu F;
Shape FIB; Shrink FI; Sigmoid F; Sign FI; Sin F; Sinh F; Size FIB; Slice FIB; Softmax F; Softplus F; Softsign F;
SpaceToDepth FI; Split FIB; Sqrt F; Squeeze FIB; Sub FI; Sum FI; Tan F; Tanh F; TensorScatter Fi; ThresholdedRelu F;
Tile FIB; TopK FI; Transpose FIB; Trilu FIB; Unsqueeze FIB; Upsample F; Where FIB; Xor B
"""
SUPPORTED_OPS: dict[str, frozenset[int]] = {
    op: frozenset().union(*(_TYPE_CODES[c] for c in codes))
    for op, codes in (entry.split() for entry in _TABLE.replace("\n", " ").split(";"))
}
_CHECKED_INPUT = {"Where": 1}  # which input carries the op's data type (input 0 for every other op)
_SUBGRAPH_OPS = {"If", "Loop", "Scan"}  # their bodies are checked node by node instead

_REDUCE_OPS = {"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
               "ReduceProd", "ReduceSum", "ReduceSumSquare"}
# Ops through which a shape tensor stays a shape tensor (TensorRT evaluates these at build/shape time).
_SHAPE_OPS = {"Shape", "Size", "Constant", "Concat", "Gather", "Slice", "Unsqueeze", "Squeeze", "Cast", "Add", "Sub",
              "Mul", "Div", "Identity", "Reshape", "Max", "Min", "ReduceProd", "Range", "Equal", "Where", "Not", "Neg",
              "Abs", "ConstantOfShape", "Mod", "Expand", "Tile", "Flatten"}
_RESIZE_COORD = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
_RESIZE_NEAREST = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}


@dataclass(frozen=True)
class TrtOpProblem:
    """One reason TensorRT's ONNX parser would refuse (or silently change) the graph."""

    node: str  # node name, or the tensor name for graph inputs, outputs and initializers
    op_type: str  # ONNX op type; "graph" for problems of the model as a whole
    problem: str

    def __str__(self) -> str:
        return f"{self.op_type} node {self.node!r}: {self.problem}"


def _dtype_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(elem_type)


class _Graph:
    """Name lookups over one (sub)graph, with the model's inferred tensor types."""

    def __init__(self, graph: onnx.GraphProto, types: dict[str, int], outer_constants: set[str],
                 functions: frozenset[tuple[str, str]] = frozenset()) -> None:
        self.graph = graph
        self.functions = functions  # (domain, name) of the model's local functions, which the parser inlines
        self.types = types
        self.initializers = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
        self.constants = set(outer_constants) | self.initializers
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers.setdefault(inp, []).append(node)
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                self.constants.update(o for o in node.output if o)
        self.inputs = {i.name for i in graph.input} - self.initializers
        self.outputs = {o.name for o in graph.output}
        self._shape_ok: dict[str, bool] = {}

    def is_constant(self, name: str) -> bool:
        """An initializer or a Constant node's output: what the parser can read as weights at parse time."""
        return name in self.constants

    def constant_value(self, name: str):
        for t in self.graph.initializer:
            if t.name == name:
                return numpy_helper.to_array(t)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def is_shape_tensor(self, name: str) -> bool:
        """True if ``name`` is computed from constants and ``Shape``/``Size`` only, never from tensor values."""
        if name in self._shape_ok:
            return self._shape_ok[name]
        self._shape_ok[name] = False  # cycle guard
        if self.is_constant(name):
            ok = True
        elif name in self.inputs:
            ok = self.types.get(name) in _INTS  # an explicit shape-tensor network input
        else:
            node = self.producer.get(name)
            if node is None:
                ok = False
            elif node.op_type in ("Shape", "Size"):
                ok = True
            else:
                ok = node.op_type in _SHAPE_OPS and all(self.is_shape_tensor(i) for i in node.input if i)
        self._shape_ok[name] = ok
        return ok


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _as_str(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _input(node: onnx.NodeProto, index: int) -> str:
    return node.input[index] if len(node.input) > index else ""


# --- per-op restrictions: each returns problem texts for one node --------------------------------------------------

def _needs_constant(index: int, what: str, wording: str = "an initializer") -> Callable:
    def check(node: onnx.NodeProto, g: _Graph) -> Iterator[str]:
        name = _input(node, index)
        if name and not g.is_constant(name):
            yield f"`{what}` (input {name!r}) must be {wording}; it is computed at run time"
    return check


def _check_resize(node: onnx.NodeProto, g: _Graph) -> Iterator[str]:
    mode = _as_str(_attr(node, "mode", "nearest"))
    if mode not in ("nearest", "linear"):
        yield f"mode={mode!r} is not supported (only 'nearest' and 'linear')"
    coord = _as_str(_attr(node, "coordinate_transformation_mode", "half_pixel"))
    if coord not in _RESIZE_COORD:
        yield f"coordinate_transformation_mode={coord!r} is not supported (supported: {sorted(_RESIZE_COORD)})"
    nearest = _as_str(_attr(node, "nearest_mode", "round_prefer_floor"))
    if mode == "nearest" and nearest not in _RESIZE_NEAREST:
        yield f"nearest_mode={nearest!r} is not supported (supported: {sorted(_RESIZE_NEAREST)})"
    if _attr(node, "antialias", 0):
        yield "antialias=1 is not supported"
    policy = _as_str(_attr(node, "keep_aspect_ratio_policy", "stretch"))
    if policy != "stretch":
        yield f"keep_aspect_ratio_policy={policy!r} is not supported (only 'stretch')"


def _check_pool(node: onnx.NodeProto, g: _Graph) -> Iterator[str]:
    kernel = _attr(node, "kernel_shape", [])
    if len(kernel) not in (2, 3):
        yield f"only 2D or 3D pooling is supported, got kernel_shape={list(kernel)}"
    if any(d != 1 for d in _attr(node, "dilations", [])):
        yield f"dilations must be empty or all ones, got {list(_attr(node, 'dilations'))}"
    if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1]:
        yield "the `Indices` output is not supported"


def _check_dropout(node: onnx.NodeProto, g: _Graph) -> Iterator[str]:
    name = _input(node, 2)
    if name:
        value = g.constant_value(name)
        if value is None or bool(value):
            yield f"`training_mode` (input {name!r}) must be an initializer that is False"


def _check_topk(node: onnx.NodeProto, g: _Graph) -> Iterator[str]:
    if _attr(node, "sorted", 1) != 1:
        yield "sorted must be 1"
    k = _input(node, 1)
    value = g.constant_value(k) if k else None
    if k and value is None:
        yield f"`K` (input {k!r}) must be an initializer"
    elif value is not None and int(value.reshape(-1)[0]) >= 3840:
        yield f"`K` must be less than 3840, got {int(value.reshape(-1)[0])}"


def _check_zero_point(index: int) -> Callable:
    def check(node: onnx.NodeProto, g: _Graph) -> Iterator[str]:
        name = _input(node, index)
        if name:
            value = g.constant_value(name)
            if value is None or value.any():
                yield f"the zero point (input {name!r}) must be a constant zero"
    return check


def _check_attr(name: str, allowed, what: str) -> Callable:
    def check(node: onnx.NodeProto, g: _Graph) -> Iterator[str]:
        value = _attr(node, name)
        if value is not None and _as_str(value) not in {str(a) for a in allowed}:
            yield f"{name}={_as_str(value)!r} is not supported ({what})"
    return check


def _check_constant(node: onnx.NodeProto, g: _Graph) -> Iterator[str]:
    for a in node.attribute:
        if a.name in ("sparse_value", "value_string", "value_strings"):
            yield f"the `{a.name}` attribute is not supported"


def _check_layer_norm(node: onnx.NodeProto, g: _Graph) -> Iterator[str]:
    if any(o for o in node.output[1:]):
        yield "only the first output `Y` is supported"


def _check_shape_input(index: int, what: str) -> Callable:
    def check(node: onnx.NodeProto, g: _Graph) -> Iterator[str]:
        name = _input(node, index)
        if name and not g.is_shape_tensor(name):
            yield (f"`{what}` (input {name!r}) is computed from tensor values; TensorRT needs it from constants or "
                   "a Shape subgraph")
    return check


def _check_reduce(node: onnx.NodeProto, g: _Graph) -> Iterator[str]:
    yield from _needs_constant(1, "axes")(node, g)


_RESTRICTIONS: dict[str, list[Callable]] = {
    **{op: [_check_reduce] for op in _REDUCE_OPS},
    "Squeeze": [_needs_constant(1, "axes", "a constant")],
    "Unsqueeze": [_needs_constant(1, "axes", "a constant")],
    "CumSum": [_needs_constant(1, "axis", "a build-time constant")],
    "OneHot": [_needs_constant(1, "depth", "a build-time constant")],
    "Resize": [_check_resize],
    "AveragePool": [_check_pool], "MaxPool": [_check_pool], "LpPool": [_check_pool],
    "Dropout": [_check_dropout],
    "TopK": [_check_topk],
    "QuantizeLinear": [_check_zero_point(2)], "DequantizeLinear": [_check_zero_point(2)],
    "ScatterND": [_check_attr("reduction", ["none"], "only 'none'")],
    "LSTM": [_check_attr("input_forget", [0], "must be 0"), _check_attr("layout", [0], "must be 0")],
    "Constant": [_check_constant],
    "LayerNormalization": [_check_layer_norm],
    "Reshape": [_check_shape_input(1, "shape")],
    "Expand": [_check_shape_input(1, "shape")],
    "ConstantOfShape": [_check_shape_input(0, "input")],
    "Tile": [_check_shape_input(1, "repeats")],
}


# --- the checker ---------------------------------------------------------------------------------------------------

def _inferred_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor whose type ONNX shape inference can tell (main graph and subgraphs)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # a graph shape inference cannot read still gets checked op by op
        inferred = model
    types: dict[str, int] = {}

    def visit(graph: onnx.GraphProto) -> None:
        for vi in [*graph.input, *graph.output, *graph.value_info]:
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                types[vi.name] = vi.type.tensor_type.elem_type
        for t in graph.initializer:
            types[t.name] = t.data_type
        for node in graph.node:
            if node.op_type == "Constant":
                for a in node.attribute:
                    if a.name == "value" and node.output:
                        types[node.output[0]] = a.t.data_type
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    visit(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for sub in a.graphs:
                        visit(sub)

    visit(inferred.graph)
    return types


def _check_graph(g: _Graph, problems: list[TrtOpProblem], top_level: bool) -> None:
    def report(node: str, op: str, text: str) -> None:
        problem = TrtOpProblem(node, op, text)
        if problem not in problems:
            problems.append(problem)

    for node in g.graph.node:
        name = node.name or (node.output[0] if node.output else "<unnamed>")
        op = node.op_type
        if (node.domain, op) in g.functions:
            continue  # a call of a model-local function: its body is checked on its own
        if node.domain not in ("", "ai.onnx"):
            report(name, op, f"custom domain {node.domain!r}: TensorRT needs a plugin for it")
            continue
        allowed = SUPPORTED_OPS.get(op)
        if allowed is None:
            report(name, op, "not supported by TensorRT's ONNX parser (10.x operator support matrix)")
            continue
        checked = _input(node, _CHECKED_INPUT.get(op, 0))
        dtype = g.types.get(checked) if checked else None
        if op == "Cast":
            to = _attr(node, "to")
            if to is not None and to not in allowed:
                report(name, op, f"cast to {_dtype_name(to)} is not supported (TensorRT: {_names(allowed)})")
        if dtype is not None and dtype != TensorProto.UINT8 and op not in _SUBGRAPH_OPS and dtype not in allowed:
            report(name, op, f"input {checked!r} is {_dtype_name(dtype)}; TensorRT supports {_names(allowed)} for "
                             f"{op}" + (" (it would clamp DOUBLE to FLOAT)" if dtype == TensorProto.DOUBLE else ""))
        for out in node.output:
            out_type = g.types.get(out) if out else None
            if out_type is not None and out_type not in _ANY_SUPPORTED:
                report(name, op, f"output {out!r} is {_dtype_name(out_type)}, a type TensorRT does not support")
        for check in _RESTRICTIONS.get(op, ()):
            for text in check(node, g):
                report(name, op, text)
        for a in node.attribute:  # If/Loop/Scan bodies: every node in them must pass too
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else
                        list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []):
                _check_graph(_Graph(sub, g.types, g.constants, g.functions), problems, top_level=False)

    _check_dtypes_and_ranks(g, report, top_level)


def _names(types) -> str:
    return ", ".join(sorted(_dtype_name(t) for t in types))


def _check_dtypes_and_ranks(g: _Graph, report: Callable, top_level: bool) -> None:
    def first_consumer(tensor: str) -> onnx.NodeProto | None:
        users = g.consumers.get(tensor, [])
        return users[0] if users else None

    for t in g.graph.initializer:
        if t.data_type not in _ANY_SUPPORTED or t.data_type == TensorProto.DOUBLE:
            user = first_consumer(t.name)
            report(user.name if user is not None else t.name, user.op_type if user is not None else "initializer",
                   f"initializer {t.name!r} is {_dtype_name(t.data_type)}; TensorRT does not support it "
                   "(export the weights as float32)")
    if not top_level:
        return
    for vi in g.graph.input:
        if vi.name in g.initializers:
            continue
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            report(vi.name, "graph", f"network input {vi.name!r} is not a tensor")
        elif not tt.HasField("shape"):
            report(vi.name, "graph", f"network input {vi.name!r} has no shape: dynamic rank is not supported")
        elif tt.elem_type not in _ANY_SUPPORTED - _QUANT or tt.elem_type == TensorProto.DOUBLE:
            report(vi.name, "graph", f"network input {vi.name!r} is {_dtype_name(tt.elem_type)}; TensorRT supports "
                                     "float32/float16/bfloat16, int32/int64, bool and uint8 inputs")
    for vi in g.graph.output:
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and not tt.HasField("shape"):
            report(vi.name, "graph", f"network output {vi.name!r} has no shape: dynamic rank is not supported")
    # UINT8 is only supported as a network input or output tensor type: a uint8 image must go straight into a Cast.
    for name, dtype in g.types.items():
        if dtype != TensorProto.UINT8 or name in g.initializers:
            continue
        if name in g.inputs:
            for user in g.consumers.get(name, []):
                if user.op_type not in ("Cast", "CastLike"):
                    report(user.name, user.op_type, f"reads the uint8 network input {name!r} directly; TensorRT "
                                                    "accepts uint8 only as a Cast input (cast it to float first)")
        elif name in g.outputs:
            node = g.producer.get(name)
            if node is not None and node.op_type not in ("Cast", "CastLike"):
                report(node.name, node.op_type, f"produces the uint8 network output {name!r}; only a Cast may")
        elif name in g.producer:
            node = g.producer[name]
            report(node.name, node.op_type, f"output {name!r} is UINT8 inside the network; TensorRT supports uint8 "
                                            "only for network inputs and outputs")


def check_tensorrt_compatibility(model: onnx.ModelProto) -> list[TrtOpProblem]:
    """Every reason TensorRT 10.x's ONNX parser would reject ``model``, in graph order; empty when none is known.

    What it cannot see: kernels missing for a particular GPU, and shapes that only go wrong at build time. Those
    surface when ``ganet.export.tensorrt.build_engine`` runs on a GPU host.
    """
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(f"check_tensorrt_compatibility expects an onnx.ModelProto, got {type(model).__name__}")
    problems: list[TrtOpProblem] = []
    lo, hi = OPSET_RANGE
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and not lo <= opset.version <= hi:
            problems.append(TrtOpProblem("<model>", "graph", f"opset {opset.version} is outside the range TensorRT "
                                                             f"10.x parses ({lo} to {hi})"))
    functions = frozenset((f.domain, f.name) for f in model.functions)
    for function in model.functions:  # local functions are inlined by the parser: check their bodies too
        graph = helper.make_graph(list(function.node), function.name, [], [])
        _check_graph(_Graph(graph, {}, set(), functions), problems, top_level=False)
    _check_graph(_Graph(model.graph, _inferred_types(model), set(), functions), problems, top_level=True)
    return problems
