"""TensorRT op-compatibility checker, mixed-fp16 ONNX, the TensorRT module and the Triton repository writer.

Everything runs on a CPU except the ``gpu`` tests at the end, which need ``tensorrt`` and a CUDA GPU
(``pytest -m gpu tests/test_export_trt_triton.py`` on such a host).
"""
from __future__ import annotations

import subprocess
from collections import Counter
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ganet.export.fp16 import fp32_island_nodes, ga_scope, island_summary, to_mixed_fp16
from ganet.export.parity import photo_arrays
from ganet.export.tensorrt import (EngineMismatchError, TensorRTRunner, TensorRTUnavailableError, _pin_fp32,
                                   build_engine, check_engine_compatible, engine_mismatches, tensorrt_available)
from ganet.export.triton import render_config_pbtxt, write_triton_repository
from ganet.export.trt_ops import TrtOpProblem, check_tensorrt_compatibility

from stand_in_tensorrt import FakeLayer

NUM_CLASSES, SIZE = 10, 32


# --- a real GA model on real images, exported both ways ------------------------------------------------------------

SIX_PHOTOS = 6  # china, flower, astronaut, chelsea, coffee, rocket: the first six of parity.photographs


def _photo_arrays() -> list[np.ndarray]:
    """The same six photographs as (H, W, 3) arrays, to crop from."""
    return list(photo_arrays().values())[:SIX_PHOTOS]


def _crops(images_hw3: list[np.ndarray], n: int, size: int, seed: int = 0) -> np.ndarray:
    """Random square crops of the photos resized to ``size``: more real inputs, (n, 3, S, S) uint8."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        img = images_hw3[k % len(images_hw3)]
        h, w = img.shape[:2]
        s = int(rng.integers(size, min(h, w) // 2))
        y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
        out.append(np.asarray(Image.fromarray(img[y:y + s, x:x + s]).resize((size, size), 2)).transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(out))


@pytest.fixture(scope="module")
def ga_setup():
    """ga_shufflenet_v2_cifar (10 classes) made input-dependent without training, wrapped to take uint8 images.

    A freshly initialised network maps every image to nearly the same logits, which would make any precision test
    vacuous. So: GA parameters moved off their identity init (alpha != 0 turns on the pooling/softmax path),
    BatchNorm statistics recalibrated on crops of real photos, and the classifier scaled to logits of a few units.
    """
    import torch
    from torch import nn

    from ganet.export.onnx_export import ImageModel
    from ganet.export.parity import photographs
    from ganet.layers.group_attention import GroupAttention
    from ganet.models import create_model
    from ganet.preprocess import Preprocessing

    torch.manual_seed(0)
    model = create_model("ga_shufflenet_v2_cifar", num_classes=NUM_CLASSES)
    prep = Preprocessing.for_input_size(SIZE)
    wrapped = ImageModel(model, prep)  # the export contract: uint8 (B, 3, S, S) in, normalised in the graph
    photos = _photo_arrays()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, GroupAttention):
                m.alpha.uniform_(0.2, 0.5)
                for name in ("u4u_gamma", "pool_gamma", "assign_gamma"):
                    getattr(m, name).uniform_(0.8, 1.2)
                for name in ("u4u_beta", "pool_beta", "assign_beta"):
                    getattr(m, name).normal_(0.0, 0.1)
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration pass
        model.train()
        wrapped(torch.from_numpy(_crops(photos, 96, SIZE, seed=1)))
        wrapped.eval()
        model.fc.weight.mul_(10.0)
    real = photographs(prep).images[:SIX_PHOTOS]
    images = np.concatenate([real, _crops(photos, 58, SIZE, seed=2)])  # (64, 3, 32, 32) uint8
    with torch.no_grad():
        reference = wrapped(torch.from_numpy(images)).numpy()
    return wrapped, model, images, reference


@pytest.fixture(scope="module")
def uint8_onnx(ga_setup, tmp_path_factory) -> Path:
    """What ganet-export writes: ``export_onnx`` (uint8 in, normalisation in the graph, dynamo, opset 18)."""
    from ganet.export.onnx_export import export_onnx
    from ganet.preprocess import Preprocessing

    _, model, _, _ = ga_setup
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    export_onnx(model, Preprocessing.for_input_size(SIZE), path, max_batch=64)
    return path


@pytest.fixture(scope="module")
def float_onnx(ga_setup, tmp_path_factory) -> Path:
    """The plain model (float input), TorchScript exporter: no node metadata, scopes only in node names."""
    import torch

    _, model, _, _ = ga_setup
    path = tmp_path_factory.mktemp("export_ts") / "model.onnx"
    with pytest.warns(DeprecationWarning):
        torch.onnx.export(model, (torch.randn(2, 3, SIZE, SIZE),), str(path), dynamo=False, opset_version=18,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def _ort(model: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


# --- trt_ops: the real exports pass --------------------------------------------------------------------------------

@pytest.mark.slow
def test_real_ga_exports_are_tensorrt_compatible(uint8_onnx, float_onnx):
    for path in (uint8_onnx, float_onnx):
        model = onnx.load(str(path))
        assert check_tensorrt_compatibility(model) == [], path
    uint8_model = onnx.load(str(uint8_onnx))
    assert uint8_model.graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    first = [n for n in uint8_model.graph.node if "image" in n.input]
    assert [n.op_type for n in first] == ["Cast"]  # the one op TensorRT lets read a uint8 input


# --- trt_ops: hand-built graphs, one problem each ------------------------------------------------------------------

def _model(nodes, inputs, outputs, initializers=(), opset: int = 18) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name: str, elem_type: int = TensorProto.FLOAT, shape=("batch", 3, 8, 8)):
    return helper.make_tensor_value_info(name, elem_type, shape)


def _const(name: str, values, dtype=np.int64):
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def test_uint8_cast_normalisation_graph_passes():
    nodes = [helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Mul", ["x", "scale"], ["xs"], name="mul"),
             helper.make_node("Add", ["xs", "shift"], ["xn"], name="add"),
             helper.make_node("Conv", ["xn", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("ReduceMean", ["y", "axes"], ["pooled"], name="gap", keepdims=0),
             helper.make_node("Gemm", ["pooled", "fc"], ["logits"], name="fc", transB=1)]
    inits = [_const("scale", np.full((1, 3, 1, 1), 1 / 255), np.float32), _const("shift", np.zeros((1, 3, 1, 1)),
             np.float32), _const("w", np.ones((4, 3, 3, 3)), np.float32), _const("axes", [2, 3]),
             _const("fc", np.ones((5, 4)), np.float32)]
    model = _model(nodes, [_vi("image", TensorProto.UINT8)], [_vi("logits", shape=("batch", 5))], inits)
    onnx.checker.check_model(model, full_check=True)
    assert check_tensorrt_compatibility(model) == []


def _problem_cases():
    x, y = _vi("x"), _vi("y")
    yield "unsupported op", _model([helper.make_node("Unique", ["x"], ["y"], name="uniq")], [x], [y]), \
        "uniq", "Unique", "not supported"
    yield "made-up op", _model([helper.make_node("FancyAttention", ["x"], ["y"], name="fa")], [x], [y]), \
        "fa", "FancyAttention", "not supported"
    yield "custom domain", _model([helper.make_node("Gelu", ["x"], ["y"], name="g", domain="com.microsoft")],
                                  [x], [y]), "g", "Gelu", "custom domain"
    yield "reduce axes from a tensor", _model(
        [helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="mean_dyn")],
        [x, helper.make_tensor_value_info("axes", TensorProto.INT64, [1])], [y]), "mean_dyn", "ReduceMean", \
        "`axes` (input 'axes') must be an initializer"
    yield "double tensor", _model(
        [helper.make_node("Cast", ["x"], ["xd"], to=TensorProto.DOUBLE, name="to_double"),
         helper.make_node("Relu", ["xd"], ["yd"], name="relu_double"),
         helper.make_node("Cast", ["yd"], ["y"], to=TensorProto.FLOAT, name="back")], [x], [y]), \
        "relu_double", "Relu", "DOUBLE"
    yield "cast to double", _model(
        [helper.make_node("Cast", ["x"], ["xd"], to=TensorProto.DOUBLE, name="to_double"),
         helper.make_node("Cast", ["xd"], ["y"], to=TensorProto.FLOAT, name="back")], [x], [y]), \
        "to_double", "Cast", "cast to DOUBLE"
    yield "double initializer", _model(
        [helper.make_node("Cast", ["x"], ["xd"], to=TensorProto.DOUBLE, name="c"),
         helper.make_node("Mul", ["xd", "k"], ["yd"], name="mul_double"),
         helper.make_node("Cast", ["yd"], ["y"], to=TensorProto.FLOAT, name="back")], [x], [y],
        [_const("k", [2.0], np.float64)]), "mul_double", "Mul", "initializer 'k' is DOUBLE"
    yield "uint8 input into Mul", _model(
        [helper.make_node("Mul", ["image", "k"], ["y"], name="mul_u8")], [_vi("image", TensorProto.UINT8)],
        [_vi("y", TensorProto.UINT8)], [_const("k", [2], np.uint8)]), "mul_u8", "Mul", "uint8"
    yield "resize cubic", _model(
        [helper.make_node("Resize", ["x", "", "scales"], ["y"], name="up", mode="cubic")], [x], [y],
        [_const("scales", [1, 1, 2, 2], np.float32)]), "up", "Resize", "mode='cubic'"
    yield "dynamic rank", _model([helper.make_node("Relu", ["x"], ["y"], name="r")],
                                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)], [y]), \
        "x", "graph", "dynamic rank"
    yield "reshape shape from data", _model(
        [helper.make_node("ReduceMax", ["x"], ["m"], name="rmax", keepdims=0),
         helper.make_node("Cast", ["m"], ["mi"], to=TensorProto.INT64, name="to_int"),
         helper.make_node("Concat", ["mi", "minus1"], ["shape"], name="cat", axis=0),
         helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape_data")],
        [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [_const("minus1", [-1])]), \
        "reshape_data", "Reshape", "computed from tensor values"
    yield "maxpool indices", _model(
        [helper.make_node("MaxPool", ["x"], ["y", "idx"], name="pool", kernel_shape=[2, 2])], [x],
        [y, helper.make_tensor_value_info("idx", TensorProto.INT64, None)]), "pool", "MaxPool", "`Indices`"
    yield "1d pooling", _model(
        [helper.make_node("AveragePool", ["x"], ["y"], name="pool1d", kernel_shape=[2])],
        [_vi("x", shape=(1, 3, 8))], [_vi("y", shape=(1, 3, 7))]), "pool1d", "AveragePool", "2D or 3D"
    yield "topk from a tensor", _model(
        [helper.make_node("TopK", ["x", "k"], ["y", "i"], name="topk")],
        [x, helper.make_tensor_value_info("k", TensorProto.INT64, [1])],
        [y, helper.make_tensor_value_info("i", TensorProto.INT64, None)]), "topk", "TopK", "`K`"
    body = helper.make_graph([helper.make_node("NonMaxUnpool", ["x"], ["z"], name="inner")], "then", [],
                             [_vi("z")])
    yield "unsupported op inside If", _model(
        [helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=body, name="branch")],
        [x, helper.make_tensor_value_info("c", TensorProto.BOOL, [])], [y]), "inner", "NonMaxUnpool", \
        "not supported"
    yield "opset too new", _model([helper.make_node("Relu", ["x"], ["y"], name="r")], [x], [y], opset=25), \
        "<model>", "graph", "opset 25"


@pytest.mark.parametrize("case", list(_problem_cases()), ids=lambda c: c[0])
def test_each_problem_is_reported_with_its_node(case):
    _, model, node, op_type, text = case
    problems = check_tensorrt_compatibility(model)
    matching = [p for p in problems if p.node == node and p.op_type == op_type and text in p.problem]
    assert matching, f"expected a {op_type} problem on {node!r} containing {text!r}, got {[str(p) for p in problems]}"


def test_problem_str_names_node_and_op():
    problem = TrtOpProblem("node_mean_3", "ReduceMean", "`axes` must be an initializer")
    assert str(problem) == "ReduceMean node 'node_mean_3': `axes` must be an initializer"
    with pytest.raises(TypeError, match="onnx.ModelProto"):
        check_tensorrt_compatibility(b"not a model")


# --- fp16: which nodes stay fp32 -----------------------------------------------------------------------------------

def test_ga_scope_from_metadata_and_from_names():
    meta = helper.make_node("Softmax", ["a"], ["b"], name="node_softmax_3")
    meta.metadata_props.add(key="namespace", value=": __main__.W/net: ganet.models.shufflenet_v2.ShuffleNetV2/"
                            "net.stage3.1: ganet.models.shufflenet_v2.InvertedResidual/net.stage3.1.attn: "
                            "ganet.layers.group_attention.GroupAttention/softmax_3: aten.softmax.int")
    se = helper.make_node("ReduceMean", ["a"], ["b"], name="node_mean")
    se.metadata_props.add(key="namespace", value=": m.stage2.0.attn: ganet.layers.squeeze_excite.SqueezeExcite/mean")
    named = helper.make_node("Softmax", ["a"], ["b"], name="/m/stage2/stage2.0/attn/Softmax")
    assert ga_scope(meta) == "net.stage3.1.attn"
    assert ga_scope(se) is None  # an attention block, but not GA: nothing to keep in fp32
    assert ga_scope(named) == "/m/stage2/stage2.0/attn"
    assert ga_scope(helper.make_node("Relu", ["a"], ["b"], name="/m/conv1/Relu")) is None


# Per GA block in the dynamo export of GroupAttention.forward_graph: the U4U and pair logit matmuls, the two
# normalize() chains (mean, centre, mean square, sqrt, + eps, gamma / sigma, * centred, + beta), the split into
# pooling and assigning maps, their softmax and sigmoid, and the U4U sigmoid.
EXPECTED_ISLAND = {"MatMul": 2, "ReduceMean": 4, "Sub": 2, "Mul": 4, "Sqrt": 2, "Add": 4, "Div": 2, "Sigmoid": 2,
                   "Split": 1, "Softmax": 1}
GA_BLOCKS = 4 + 8 + 4  # one per ShuffleNetV2 unit


@pytest.mark.slow
def test_fp32_islands_are_exactly_the_ga_normalisation_and_softmax(uint8_onnx, float_onnx):
    model = onnx.load(str(uint8_onnx))
    summary = island_summary(model)
    assert len(summary) == GA_BLOCKS
    for scope, counts in summary.items():
        assert scope.endswith(".attn"), scope
        assert counts == EXPECTED_ISLAND, scope
    names = set(fp32_island_nodes(model))
    by_name = {n.name: n for n in model.graph.node}
    # Every softmax and every spatial norm of the graph is kept; no convolution and nothing outside GA blocks is.
    assert {n.name for n in model.graph.node if n.op_type in ("Softmax", "Sqrt")} <= names
    # Every island node is inside a GA block: by its recorded module path, or (a Split the exporter's optimizer
    # made, with no metadata) by the block that feeds it and reads it.
    assert all(ga_scope(by_name[n]) is not None or (not by_name[n].metadata_props and by_name[n].op_type == "Split")
               for n in names)
    assert not any(by_name[n].op_type in ("Conv", "Gemm") for n in names)
    head_mean = [n for n in model.graph.node if n.op_type == "ReduceMean" and ga_scope(n) is None]
    assert len(head_mean) == 1 and head_mean[0].name not in names  # the classifier's global average pool
    # A simplifier that drops node metadata (onnxslim does) leaves the structure: the same nodes are found.
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    for node in stripped.graph.node:
        del node.metadata_props[:]
    assert fp32_island_nodes(stripped) == fp32_island_nodes(model)
    # The TorchScript export (no metadata) finds the same blocks by name, with one softmax and two sigmoids each.
    ts_summary = island_summary(onnx.load(str(float_onnx)))
    assert len(ts_summary) == GA_BLOCKS
    assert all(c["Softmax"] == 1 and c["Sigmoid"] == 2 and c["MatMul"] == 1 for c in ts_summary.values())


@pytest.mark.slow
def test_exported_ga_blocks_have_the_export_shape(uint8_onnx):
    """graph_mode reached the exporter: per GA block three matmuls (U4U logits, pair logits, pooling), no Transpose
    (a full copy of the feature map), no ReduceL2 or Pow (slow in ONNX Runtime), no Slice copies of the logits."""
    model = onnx.load(str(uint8_onnx))
    blocks: dict[str, Counter] = {}
    for node in model.graph.node:
        scope = ga_scope(node)
        if scope:
            blocks.setdefault(scope, Counter())[node.op_type] += 1
    assert len(blocks) == GA_BLOCKS
    for scope, ops in blocks.items():
        assert ops["MatMul"] == 3, (scope, ops)
        assert not {"Transpose", "ReduceL2", "Pow", "Slice", "Gather"} & set(ops), (scope, ops)


# fp16 tolerances, relative to the largest fp32 logit. This untrained network amplifies rounding more than a trained
# one would (ORT fp32 vs PyTorch already differs by ~4e-4 here), so they are loose; a wrong cast or a lost island
# gives errors of the order of the logits themselves. Measured: max 3.9%, mean 0.39%, top-1 agreement 62/64.
FP16_MAX_REL = 0.10  # max |logit_fp16 - logit_fp32|
FP16_MEAN_REL = 0.01  # mean |logit_fp16 - logit_fp32|
FP16_MARGIN_REL = 0.05  # top-1 must agree wherever the fp32 winner leads by more than this


@pytest.mark.slow
def test_mixed_fp16_runs_in_onnxruntime_and_matches_fp32(uint8_onnx, ga_setup):
    _, _, images, reference = ga_setup
    model = onnx.load(str(uint8_onnx))
    mixed = to_mixed_fp16(model)
    onnx.checker.check_model(mixed, full_check=True)

    graph = mixed.graph
    assert graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    assert [(o.name, o.type.tensor_type.elem_type) for o in graph.output] == [("logits", TensorProto.FLOAT)]
    inits = {t.name: t.data_type for t in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert convs and all(inits[n.input[1]] == TensorProto.FLOAT16 for n in convs)
    island = set(fp32_island_nodes(model))
    assert island and island <= {n.name for n in graph.node}
    casts = [n for n in graph.node if n.op_type == "Cast" and n.name.endswith(("__to_fp16", "__to_fp32"))]
    assert len(casts) >= 2 * GA_BLOCKS  # into and out of every island, at least

    fp32 = _ort(model, images)
    assert np.abs(fp32 - reference).max() < 1e-2  # ORT fp32 agrees with PyTorch (B1's parity test is tighter)
    half = _ort(mixed, images)
    assert half.dtype == np.float32 and half.shape == fp32.shape
    scale = np.abs(fp32).max()
    delta = np.abs(half - fp32)
    assert scale > 1.0  # the logits are input-dependent, not collapsed
    print(f"mixed fp16 vs fp32 (ORT CPU, {len(images)} images): max |d| {delta.max():.4f}, mean {delta.mean():.4f}, "
          f"max |logit| {scale:.2f}, top-1 agreement {(half.argmax(1) == fp32.argmax(1)).mean():.4f}")
    assert delta.max() <= FP16_MAX_REL * scale, (delta.max(), scale)
    assert delta.mean() <= FP16_MEAN_REL * scale, (delta.mean(), scale)
    top2 = np.sort(fp32, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > FP16_MARGIN_REL * scale  # a winner well ahead of the runner-up
    assert clear.sum() >= len(images) // 2
    np.testing.assert_array_equal(half.argmax(1)[clear], fp32.argmax(1)[clear])
    assert (half.argmax(1) == fp32.argmax(1)).mean() >= 0.9


def test_to_mixed_fp16_on_a_small_graph_keeps_io_types_and_fp32_only_inputs():
    nodes = [helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="linear", name="resize"),
             helper.make_node("Mul", ["y", "k"], ["z"], name="mul"),
             helper.make_node("ReduceMean", ["z", "axes"], ["logits"], keepdims=0, name="mean")]
    model = _model(nodes, [_vi("image", TensorProto.UINT8, ("batch", 3, 4, 4))], [_vi("logits", shape=("batch", 3))],
                   [_const("scales", [1, 1, 2, 2], np.float32), _const("k", [0.1], np.float32), _const("axes", [2, 3])])
    mixed = to_mixed_fp16(model)
    onnx.checker.check_model(mixed, full_check=True)
    inits = {t.name: t.data_type for t in mixed.graph.initializer}
    assert inits == {"scales": TensorProto.FLOAT, "k": TensorProto.FLOAT16, "axes": TensorProto.INT64}
    ops = [(n.op_type, list(n.input), list(n.output)) for n in mixed.graph.node]
    assert ops[0][0] == "Cast" and mixed.graph.node[0].attribute[0].i == TensorProto.FLOAT16  # uint8 -> fp16
    assert ops[-1] == ("Cast", ["logits__fp16"], ["logits"])  # computed in fp16, handed out as float32
    assert island_summary(model) == {} and fp32_island_nodes(model) == []  # no GA block here
    images = np.random.default_rng(0).integers(0, 256, (2, 3, 4, 4), dtype=np.uint8)
    np.testing.assert_allclose(_ort(mixed, images), _ort(model, images), rtol=2e-3)


def test_to_mixed_fp16_refuses_control_flow():
    body = helper.make_graph([helper.make_node("Identity", ["x"], ["z"])], "b", [], [_vi("z")])
    model = _model([helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=body, name="if")],
                   [_vi("x"), helper.make_tensor_value_info("c", TensorProto.BOOL, [])], [_vi("y")])
    with pytest.raises(ValueError, match="control flow"):
        to_mixed_fp16(model)


# --- tensorrt: what runs without TensorRT --------------------------------------------------------------------------

def test_tensorrt_module_imports_without_torch_or_tensorrt():
    code = ("import sys, ganet.export.tensorrt, ganet.export.trt_ops, ganet.export.fp16, ganet.export.triton; "
            "bad = [m for m in ('torch', 'tensorrt') if m in sys.modules]; sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_without_tensorrt_build_and_run_raise_with_install_hint(tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here: the GPU tests below cover it")
    except ImportError:
        pass

    assert tensorrt_available() is False
    with pytest.raises(TensorRTUnavailableError, match="pip install tensorrt"):
        build_engine(tmp_path / "model.onnx", tmp_path / "model.plan", max_batch=8, opt_batch=4, fp16=False)
    with pytest.raises(TensorRTUnavailableError, match="pip install tensorrt"):
        TensorRTRunner(tmp_path / "model.plan", {"tensorrt_version": "10.7.0", "compute_capability": "8.9"})
    assert not (tmp_path / "model.plan").exists()


HERE = {"tensorrt_version": "10.7.0", "gpu_name": "NVIDIA L4", "compute_capability": "8.9", "cuda_version": "12.6",
        "driver_version": "560.35.03"}


def test_engine_mismatches_compare_tensorrt_release_and_compute_capability():
    assert engine_mismatches(HERE, HERE) == []
    # The GPU name, CUDA and driver are recorded but do not decide; a post-release tag is the same release.
    other_card = {**HERE, "gpu_name": "NVIDIA RTX 4090", "cuda_version": "12.8", "driver_version": "570.1"}
    assert engine_mismatches(HERE, other_card) == []
    assert engine_mismatches({**HERE, "tensorrt_version": "10.7.0.post1"}, HERE) == []
    assert engine_mismatches(HERE, {**HERE, "tensorrt_version": "10.8.0"}) == \
        ["built with TensorRT version 10.7.0, this machine has 10.8.0"]
    assert engine_mismatches(HERE, {**HERE, "compute_capability": "9.0"}) == \
        ["built with GPU compute capability 8.9, this machine has 9.0"]
    assert len(engine_mismatches({"gpu_name": "x"}, HERE)) == 2  # nothing recorded: cannot vouch for it


def test_check_engine_compatible_raises_with_rebuild_hint():
    check_engine_compatible(HERE, current=HERE)
    with pytest.raises(EngineMismatchError, match=r"rebuild it with `ganet-export --trt`") as info:
        check_engine_compatible(HERE, current={**HERE, "tensorrt_version": "11.0.0", "compute_capability": "9.0"})
    message = str(info.value)
    assert "NVIDIA L4" in message and "10.7.0" in message and "11.0.0" in message and "9.0" in message


def test_pin_fp32_matches_layers_by_node_name_suffix_and_output_tensor():
    from types import SimpleNamespace

    trt = SimpleNamespace(float32="f32", float16="f16")
    layers = [FakeLayer("node_softmax", [("softmax", "f32")]),  # the node's own layer
              FakeLayer("node_mean_1", [("tmp", "f32")]),  # a second layer the parser made for node_mean
              FakeLayer("ONNXTRT_Broadcast_7", [("sub_28", "f32")]),  # a helper layer writing an island tensor
              FakeLayer("node_conv", [("conv_out", "f32")]),  # not in the island
              FakeLayer("node_mean_2", [("mean_2", "f32")]),  # another ONNX node, not a layer of node_mean
              FakeLayer("node_shape", [("shape_out", "i32")])]  # integer output: never pinned
    network = SimpleNamespace(num_layers=len(layers), get_layer=lambda i: layers[i])
    islands = {"node_softmax", "node_mean", "node_sub", "node_shape"}
    onnx_nodes = frozenset(islands | {"node_conv", "node_mean_2"})
    pinned = _pin_fp32(trt, network, islands, {"sub_28", "shape_out"}, onnx_nodes)
    assert pinned == 3
    assert [layer.precision for layer in layers] == ["f32", "f32", "f32", None, None, None]
    assert layers[0].output_types == {0: "f32"} and layers[3].output_types == {}


# --- tensorrt: the build/run plumbing against a stand-in with the documented API's shape ---------------------------
# A CPU stand-in for `tensorrt` and cuda-python's runtime: the calls build_engine and TensorRTRunner make, with the
# signatures the TensorRT 10/11 Python docs give; "device" memory is host memory and the engine runs ONNX Runtime.
# It proves the plumbing (profile, flags, timing cache, pinned buffers, copies, batch slicing), not TensorRT: the
# gpu tests below run the real library.


def _classifier_onnx(path: Path) -> Path:
    """uint8 (B, 3, 8, 8) -> logits (B, 4): Cast, normalise, Conv, global mean, Gemm."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Mul", ["x", "scale"], ["xs"], name="mul"),
             helper.make_node("Conv", ["xs", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("ReduceMean", ["y", "axes"], ["pooled"], name="gap", keepdims=0),
             helper.make_node("Gemm", ["pooled", "fc"], ["logits"], name="fc", transB=1)]
    inits = [_const("scale", [1 / 255], np.float32), _const("w", rng.normal(size=(6, 3, 3, 3)), np.float32),
             _const("axes", [2, 3]), _const("fc", rng.normal(size=(4, 6)), np.float32)]
    model = _model(nodes, [_vi("image", TensorProto.UINT8, ("batch", 3, 8, 8))], [_vi("logits", shape=("batch", 4))],
                   inits)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("version, fp16", [("10.7.0", False), ("10.7.0", True), ("11.0.0", True)])
def test_build_and_run_plumbing_with_stand_in_tensorrt(stand_in, tmp_path, version, fp16):
    import json


    trt, cudart = stand_in(version)
    onnx_path = _classifier_onnx(tmp_path / "model.onnx")
    cache = tmp_path / "cache" / "timing.cache"
    cache.parent.mkdir()
    cache.write_bytes(json.dumps(["from-an-earlier-build"]).encode())
    plan = tmp_path / "out" / "model.plan"
    info = build_engine(onnx_path, plan, max_batch=16, opt_batch=8, fp16=fp16, timing_cache=cache)

    assert info["tensorrt_version"] == version and info["compute_capability"] == "8.9"
    assert info["gpu_name"] == "Stand-in GPU" and info["cuda_version"] == "12.4"
    assert info["driver_version"] == "CUDA driver API 12.6"
    assert info["input_name"] == "image" and info["input_shape"] == ["batch", 3, 8, 8]
    assert (info["max_batch"], info["opt_batch"], info["tf32"]) == (16, 8, False)
    record = json.loads(plan.read_bytes())
    assert record["shapes"] == [[1, 3, 8, 8], [8, 3, 8, 8], [16, 3, 8, 8]]
    assert "TF32" not in record["flags"]
    if not fp16:
        assert info["precision"] == "fp32" and info["fp16_mode"] is None and trt.parsed == [str(onnx_path)]
    elif version.startswith("10."):
        assert {"FP16", "OBEY_PRECISION_CONSTRAINTS"} <= set(record["flags"])
        assert info["fp16_mode"].startswith("BuilderFlag.FP16") and trt.parsed == [str(onnx_path)]
        assert info["fp32_island_nodes"] == 0  # no GA block in this graph
    else:  # 11.x: the strongly typed path parses the mixed-precision graph, written to a temporary file
        assert info["fp16_mode"].startswith("strongly-typed") and trt.parsed[0].endswith("model.mixed_fp16.onnx")
    assert sorted(p.name for p in plan.parent.iterdir()) == ["model.plan"]  # no temporary left behind
    built = "model.mixed_fp16.onnx" if version.startswith("11.") and fp16 else "model.onnx"
    assert set(json.loads(cache.read_bytes())) == {"from-an-earlier-build", built}  # loaded, extended, saved

    images = np.random.default_rng(1).integers(0, 256, (16, 3, 8, 8), dtype=np.uint8)
    expected = _ort(onnx.load_from_string(bytes.fromhex(record["onnx"])), images)  # the graph that was parsed
    with TensorRTRunner(plan, info) as runner:
        assert (runner.max_batch, runner.num_classes, runner.sample_shape) == (16, 4, (3, 8, 8))
        for batch in (1, 3, 16):
            out = runner(images[:batch])
            assert out.dtype == np.float32 and out.shape == (batch, 4)
            np.testing.assert_array_equal(out, expected[:batch])
        assert len(cudart.memory) == 4  # pinned in/out, device in/out
        with pytest.raises(ValueError, match="expects uint8 images, got float32"):
            runner(images.astype(np.float32))
        with pytest.raises(ValueError, match=r"shape \(B, 3, 8, 8\)"):
            runner(images[:, :2])
        with pytest.raises(ValueError, match="batch size 17 is outside the engine's range 1..16"):
            runner(np.concatenate([images, images[:1]]))
        with pytest.raises(ValueError, match="batch size 0"):
            runner(images[:0])
    assert cudart.memory == {}  # close() freed every buffer
    with pytest.raises(EngineMismatchError, match="rebuild it with `ganet-export --trt`"):
        TensorRTRunner(plan, {**info, "tensorrt_version": "9.3.0"})


# --- triton --------------------------------------------------------------------------------------------------------

def _parse_config(text: str):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.mark.parametrize("platform", ["onnxruntime_onnx", "tensorrt_plan"])
def test_config_pbtxt_parses_as_tritons_model_config(platform):
    from tritonclient.grpc import model_config_pb2 as pb

    text = render_config_pbtxt(model_name="ga_shufflenet_v2", platform=platform, input_name="image",
                               input_dtype="uint8", input_dims=[3, 224, 224], output_name="logits",
                               num_classes=1000, max_batch=32)
    config = _parse_config(text)
    assert config.name == "ga_shufflenet_v2" and config.platform == platform
    assert config.max_batch_size == 32
    (inp,), (out,) = config.input, config.output
    assert (inp.name, inp.data_type, list(inp.dims)) == ("image", pb.TYPE_UINT8, [3, 224, 224])
    assert (out.name, out.data_type, list(out.dims), out.label_filename) == ("logits", pb.TYPE_FP32, [1000],
                                                                             "labels.txt")
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8, 16, 32]
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    (group,) = config.instance_group
    assert group.count == 1
    if platform == "tensorrt_plan":
        assert group.kind == pb.ModelInstanceGroup.KIND_GPU
        assert not config.parameters
    else:
        assert group.kind == pb.ModelInstanceGroup.KIND_AUTO
        assert config.optimization.graph.level == 1
        assert {k: v.string_value for k, v in config.parameters.items()} == {
            "intra_op_thread_count": "0", "inter_op_thread_count": "0", "execution_mode": "0",
            "enable_mem_arena": "1", "enable_mem_pattern": "1"}


def test_misspelled_config_field_is_rejected_by_the_schema():
    from google.protobuf.text_format import ParseError

    text = render_config_pbtxt(model_name="m", platform="onnxruntime_onnx", input_name="image", input_dtype="uint8",
                               input_dims=[3, 32, 32], output_name="logits", num_classes=10, max_batch=8)
    _parse_config(text)  # the control: the real text parses
    with pytest.raises(ParseError, match="max_batch_sizes"):
        _parse_config(text.replace("max_batch_size:", "max_batch_sizes:"))
    with pytest.raises(ParseError):
        _parse_config(text.replace("label_filename", "labels_filename"))


def _tiny_onnx(path: Path) -> Path:
    nodes = [helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("ReduceMean", ["x", "axes"], ["logits"], name="mean", keepdims=0)]
    model = _model(nodes, [_vi("image", TensorProto.UINT8, ("batch", 3, 4, 4))], [_vi("logits", shape=("batch", 3))],
                   [_const("axes", [2, 3])])
    onnx.save(model, str(path))
    return path


def test_write_triton_repository_layout_for_onnx_and_plan(tmp_path):
    onnx_file = _tiny_onnx(tmp_path / "model.onnx")
    plan_file = tmp_path / "model.plan"
    plan_file.write_bytes(b"\x00serialized-engine\xff")
    labels = ["red", "green", "blue"]
    repo = tmp_path / "triton"
    common = dict(input_name="image", input_dtype="uint8", input_dims=[3, 4, 4], output_name="logits",
                  num_classes=3, labels=labels, max_batch=16)
    onnx_dir = write_triton_repository(repo, model_name="tiny", model_file=onnx_file, platform="onnxruntime_onnx",
                                       **common)
    plan_dir = write_triton_repository(repo, model_name="tiny_trt", model_file=plan_file, platform="tensorrt_plan",
                                       **common)
    assert onnx_dir == repo / "tiny" and plan_dir == repo / "tiny_trt"
    assert sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()) == [
        "tiny/1/model.onnx", "tiny/config.pbtxt", "tiny/labels.txt",
        "tiny_trt/1/model.plan", "tiny_trt/config.pbtxt", "tiny_trt/labels.txt"]
    assert (onnx_dir / "1" / "model.onnx").read_bytes() == onnx_file.read_bytes()
    assert (plan_dir / "1" / "model.plan").read_bytes() == plan_file.read_bytes()
    assert (onnx_dir / "labels.txt").read_text().splitlines() == labels
    assert _parse_config((plan_dir / "config.pbtxt").read_text()).platform == "tensorrt_plan"
    assert _parse_config((onnx_dir / "config.pbtxt").read_text()).output[0].label_filename == "labels.txt"
    # Writing again replaces the model directory as a whole and leaves no staging directories behind.
    write_triton_repository(repo, model_name="tiny", model_file=onnx_file, platform="onnxruntime_onnx",
                            **{**common, "labels": ["r", "g", "b"]})
    assert (onnx_dir / "labels.txt").read_text().splitlines() == ["r", "g", "b"]
    assert sorted(p.name for p in repo.iterdir()) == ["tiny", "tiny_trt"]


@pytest.mark.parametrize("change, message", [
    ({"labels": ["a", "b"]}, "labels must be 3"),
    ({"input_dims": [-1, 3, 4, 4]}, "without the batch axis"),
    ({"platform": "tensorrt_plan"}, "expects a .plan or .engine file"),
    ({"platform": "pytorch_libtorch"}, "unknown Triton platform"),
    ({"input_dtype": "float64"}, "unsupported tensor dtype"),
    ({"model_name": "../escape"}, "plain directory name"),
    ({"max_batch": 0}, "max_batch must be a positive integer"),
])
def test_write_triton_repository_rejects_bad_arguments(tmp_path, change, message):
    args = dict(model_name="tiny", model_file=_tiny_onnx(tmp_path / "model.onnx"), platform="onnxruntime_onnx",
                input_name="image", input_dtype="uint8", input_dims=[3, 4, 4], output_name="logits", num_classes=3,
                labels=["a", "b", "c"], max_batch=8)
    with pytest.raises(ValueError, match=message):
        write_triton_repository(tmp_path / "repo", **{**args, **change})
    assert not (tmp_path / "repo" / "tiny").exists()


# --- gpu: TensorRT itself (skipped where tensorrt or a CUDA GPU is missing) ----------------------------------------

@pytest.fixture(scope="module")
def trt_expected(uint8_onnx, ga_setup) -> tuple[np.ndarray, np.ndarray]:
    """GPU tests: skip without TensorRT and a CUDA GPU; else the images and ONNX Runtime's fp32 logits to match."""
    pytest.importorskip("tensorrt")
    if not tensorrt_available():
        pytest.skip("TensorRT imports but no CUDA GPU (or cuda-python) is available")
    images = ga_setup[2]
    return images, _ort(onnx.load(str(uint8_onnx)), images)


@pytest.mark.gpu
@pytest.mark.slow
def test_tensorrt_fp32_engine_matches_onnxruntime(trt_expected, uint8_onnx, tmp_path):
    images, expected = trt_expected
    cache = tmp_path / "timing.cache"
    info = build_engine(uint8_onnx, tmp_path / "model.plan", max_batch=64, opt_batch=16, fp16=False,
                        timing_cache=cache)
    assert info["precision"] == "fp32" and info["tf32"] is False and cache.stat().st_size > 0
    assert {"tensorrt_version", "gpu_name", "compute_capability", "cuda_version", "driver_version"} <= set(info)
    with TensorRTRunner(tmp_path / "model.plan", info) as runner:
        for batch in (1, 3, 64):
            np.testing.assert_allclose(runner(images[:batch]), expected[:batch], rtol=0, atol=1e-3)
        with pytest.raises(ValueError, match="uint8"):
            runner(images.astype(np.float32))
        with pytest.raises(ValueError, match="shape"):
            runner(images[:, :, :16])
        with pytest.raises(ValueError, match="batch size 65"):
            runner(np.concatenate([images, images[:1]]))
    # A second build reuses (and keeps) the timing cache; a tampered record is refused before deserialising.
    build_engine(uint8_onnx, tmp_path / "again.plan", max_batch=8, opt_batch=4, fp16=False, timing_cache=cache)
    with pytest.raises(EngineMismatchError, match="rebuild it with `ganet-export --trt`"):
        TensorRTRunner(tmp_path / "model.plan", {**info, "compute_capability": "1.0"})


@pytest.mark.gpu
@pytest.mark.slow
def test_tensorrt_fp16_engine_keeps_top1(trt_expected, uint8_onnx, tmp_path):
    images, expected = trt_expected
    info = build_engine(uint8_onnx, tmp_path / "model.plan", max_batch=64, opt_batch=16, fp16=True)
    assert info["precision"] == "fp16" and info["fp16_mode"]
    assert info["fp32_island_nodes"] == GA_BLOCKS * sum(EXPECTED_ISLAND.values())
    with TensorRTRunner(tmp_path / "model.plan", info) as runner:
        half = runner(images)
    scale, delta = np.abs(expected).max(), np.abs(half - expected)
    print(f"TensorRT fp16 ({info['fp16_mode']}): max |d| {delta.max():.4f}, mean {delta.mean():.4f}, "
          f"top-1 agreement {(half.argmax(1) == expected.argmax(1)).mean():.3f}")
    assert delta.max() <= FP16_MAX_REL * scale and delta.mean() <= FP16_MEAN_REL * scale
    assert (half.argmax(1) == expected.argmax(1)).mean() >= 0.9

