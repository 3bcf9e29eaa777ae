"""The fused Group Attention kernel (ganet/kernels/group_attention.c) and the graph that uses it.

Reference: the PyTorch block in fp32 (its eager forward, which test_group_attention.py ties to the paper's
equations). Real ONNX Runtime sessions, the real library built by the host's C compiler.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

import ganet.kernels
from ganet.export.onnx_export import ImageModel, export_onnx
from ganet.export.ort_fused import FusionError, _weights, fuse_group_attention, has_fused_ops
from ganet.kernels import DOMAIN, LIBRARY_ENV, OP_TYPE, OP_TYPE_SHUFFLE, OP_TYPE_SHUFFLE_SPLIT, OP_TYPE_STEM, \
    OPSET_VERSION, KernelUnavailable, build_library, library_path, register_kernels
from ganet.layers.group_attention import GroupAttention
from ganet.models import create_model
from ganet.preprocess import Preprocessing


@pytest.fixture(autouse=True)
def _no_kernel_overrides(monkeypatch):
    """The tests say which library to use; a developer's own GANET_KERNEL_LIBRARY / GANET_DISABLE_KERNELS must not
    decide it."""
    monkeypatch.delenv(LIBRARY_ENV, raising=False)
    monkeypatch.delenv("GANET_DISABLE_KERNELS", raising=False)


def _randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial GA parameters: alpha != 0 (the pairwise term counts), affine maps away from the identity."""
    g = torch.Generator().manual_seed(seed)
    for block in (m for m in module.modules() if isinstance(m, GroupAttention)):
        with torch.no_grad():
            for name, lo, hi in (("alpha", -1.5, 1.5), ("u4u_gamma", 0.5, 2.0), ("u4u_beta", -0.5, 0.5),
                                 ("pool_gamma", 0.5, 3.0), ("pool_beta", -0.5, 0.5), ("assign_gamma", 0.5, 2.0),
                                 ("assign_beta", -0.5, 0.5)):
                p = getattr(block, name, None)
                if p is not None:  # ablations lack some
                    p.copy_(torch.rand(p.shape, generator=g) * (hi - lo) + lo)
    return module


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    register_kernels(options)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _single_block_graph(block: GroupAttention, shape: tuple[int, ...]) -> onnx.ModelProto:
    """One ganet.ops::GroupAttention node with the block's weights; the batch and spatial dims are dynamic."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", shape[1], "h", "w"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", shape[1], "h", "w"])
    node = helper.make_node(OP_TYPE, ["x", "k.u4u_weight", "k.pair_weight", "k.params"], ["y"], domain=DOMAIN,
                            epsilon=float(block.eps))
    graph = helper.make_graph([node], "ga", [x], [y], initializer=_weights(block, "k"))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                   helper.make_opsetid(DOMAIN, OPSET_VERSION)])


# (channels, groups, batch, H, W): the paper's widths at the CIFAR and ImageNet stage sizes (C/G = 4, 8, 16, the
# unrolled paths), a C/G with no unrolled path (6), one channel per group, and maps that are not a multiple of the
# kernel's 16-pixel tiles (7x9, 5x5, 1x1).
SHAPES = [(60, 15, 3, 32, 32), (120, 15, 2, 14, 14), (240, 15, 2, 7, 7), (36, 6, 2, 5, 5), (15, 15, 1, 7, 9),
          (60, 15, 1, 1, 1), (120, 15, 2, 28, 28)]


@pytest.mark.parametrize("channels,groups,batch,h,w", SHAPES)
def test_fused_kernel_matches_the_block(channels, groups, batch, h, w):
    torch.manual_seed(channels + h)
    block = _randomise(GroupAttention(channels, groups), seed=h).eval()
    x = torch.randn(batch, channels, h, w) * 2 + 0.5  # block inputs follow a ReLU in the network; signed here too
    with torch.no_grad():
        expected = block(x).numpy()
    (got,) = _session(_single_block_graph(block, x.shape)).run(None, {"x": x.numpy()})
    # fp32 rounding through ~60 ops on maps of up to 784 pixels, and a polynomial exp (rel. error < 3e-7)
    scale = float(np.abs(expected).max())
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 2e-5 * max(scale, 1.0), np.abs(got - expected).max()


def test_fused_kernel_pairwise_term_is_computed():
    """A bug that dropped the rank-1 term would still pass with alpha = 0: check alpha changes the output."""
    block = _randomise(GroupAttention(60, 15)).eval()
    x = torch.randn(2, 60, 8, 8)
    session = _session(_single_block_graph(block, x.shape))
    with_term = session.run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        block.alpha.zero_()
    without = _session(_single_block_graph(block, x.shape)).run(None, {"x": x.numpy()})[0]
    assert np.abs(with_term - without).max() > 1e-2


@pytest.mark.parametrize("split", [False, True])
def test_fused_kernel_writes_the_channel_shuffle(split):
    """GroupAttentionShuffle[Split]: z = channel_shuffle(concat(a, GA(x)), 2), or its two halves. C = 60, G = 15:
    the halves meet inside group 7 (channels 28..31), so one group's output goes to both."""
    block = _randomise(GroupAttention(60, 15), seed=3).eval()
    x, a = torch.randn(3, 60, 7, 9) * 2, torch.randn(3, 60, 7, 9)
    with torch.no_grad():
        z = torch.stack((a, block(x)), dim=2).flatten(1, 2).numpy()  # (B, 120, H, W): z[2k] = a[k], z[2k+1] = y[k]
    outputs = ["lo", "hi"] if split else ["z"]
    graph = _single_block_graph(block, x.shape)
    node = graph.graph.node[0]
    node.op_type = OP_TYPE_SHUFFLE_SPLIT if split else OP_TYPE_SHUFFLE
    node.input.append("a")
    del node.output[:], graph.graph.output[:]
    node.output.extend(outputs)
    graph.graph.input.append(helper.make_tensor_value_info("a", TensorProto.FLOAT, ["b", 60, "h", "w"]))
    graph.graph.output.extend(helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs)
    session = _session(graph)
    got = np.concatenate(session.run(None, {"x": x.numpy(), "a": a.numpy()}), axis=1)
    assert got.shape == z.shape
    assert np.array_equal(got[:, 0::2], a.numpy())  # a is copied, not computed
    assert np.abs(got - z).max() <= 2e-5 * max(float(np.abs(z).max()), 1.0)
    with pytest.raises(Exception, match=r"a has shape \(3, 60, 6, 9\); expected x's shape"):
        session.run(None, {"x": x.numpy(), "a": a[:, :, :6].numpy().copy()})


SHUFFLE_NODES = [OP_TYPE, "Unsqueeze", "Unsqueeze", "Concat", "Reshape"]


# (concat order, sizes of a Split reading the shuffled map or None for no Split, the node types after folding)
@pytest.mark.parametrize("a_first,split,expected", [
    (True, None, [OP_TYPE_SHUFFLE]),  # the map is a graph output: the whole map
    (True, [60, 60], [OP_TYPE_SHUFFLE_SPLIT]),  # a Split into the halves goes in too
    (True, [50, 70], [OP_TYPE_SHUFFLE, "Split"]),  # other sizes: only the shuffle folds
    (False, None, SHUFFLE_NODES),  # concat(y, a) puts y in the even channels, which the ops do not write
])
def test_shuffle_folding_only_where_the_graph_is_that_shuffle(a_first, split, expected):
    from ganet.export.ort_fused import _fold_shuffles, _rewrite

    block = _randomise(GroupAttention(60, 15), seed=5).eval()
    graph = _single_block_graph(block, (2, 60, 6, 6))
    g = graph.graph
    g.input.append(helper.make_tensor_value_info("a", TensorProto.FLOAT, ["b", 60, 6, 6]))
    del g.output[:]
    g.initializer.extend([onnx.numpy_helper.from_array(np.array([2], np.int64), "axis2"),
                          onnx.numpy_helper.from_array(np.array([-1, 120, 6, 6], np.int64), "shape")])
    pair = ["ua", "uy"] if a_first else ["uy", "ua"]
    g.node.extend([helper.make_node("Unsqueeze", ["a", "axis2"], ["ua"]),
                   helper.make_node("Unsqueeze", ["y", "axis2"], ["uy"]),
                   helper.make_node("Concat", pair, ["stacked"], axis=2),
                   helper.make_node("Reshape", ["stacked", "shape"], ["z"])])
    outputs = ["z"]
    if split is not None:
        g.initializer.append(onnx.numpy_helper.from_array(np.array(split, np.int64), "sizes"))
        g.node.append(helper.make_node("Split", ["z", "sizes"], ["lo", "hi"], axis=1))
        outputs = ["lo", "hi"]
    g.output.extend(helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs)
    folded = onnx.ModelProto()
    folded.CopyFrom(graph)
    _rewrite(folded.graph, _fold_shuffles)
    assert [n.op_type for n in folded.graph.node] == expected
    feeds = {"x": np.random.default_rng(1).normal(size=(2, 60, 6, 6)).astype(np.float32),
             "a": np.random.default_rng(2).normal(size=(2, 60, 6, 6)).astype(np.float32)}
    for got, want in zip(_session(folded).run(None, feeds), _session(graph).run(None, feeds)):
        assert np.array_equal(got, want)


def _stem_graphs(channels: int, h: int, w: int, seed: int = 0) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """The ImageNet stem as the exporter writes it (Cast, Mul, Add, Conv 3x3/2, Relu, MaxPool 3x3/2) and as one
    ganet.ops::Stem node, with the same random weights, bias and ImageNet normalisation."""
    rng = np.random.default_rng(seed)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    scale, shift = (1 / (255 * std)).astype(np.float32), (-mean / std).astype(np.float32)
    weight = rng.normal(0, 0.3, (channels, 3, 3, 3)).astype(np.float32)
    bias = rng.normal(0, 0.5, channels).astype(np.float32)
    inits = [onnx.numpy_helper.from_array(a, n) for n, a in
             (("scale4", scale.reshape(1, 3, 1, 1)), ("shift4", shift.reshape(1, 3, 1, 1)), ("w", weight),
              ("b", bias), ("scale", scale), ("shift", shift))]
    x = helper.make_tensor_value_info("image", TensorProto.UINT8, ["b", 3, h, w])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    k3s2 = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}
    standard = helper.make_graph([helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
                                  helper.make_node("Mul", ["f", "scale4"], ["m"]),
                                  helper.make_node("Add", ["m", "shift4"], ["n"]),
                                  helper.make_node("Conv", ["n", "w", "b"], ["c"], **k3s2),
                                  helper.make_node("Relu", ["c"], ["r"]),
                                  helper.make_node("MaxPool", ["r"], ["y"], **k3s2)], "stem", [x], [y], inits[:4])
    fused = helper.make_graph([helper.make_node(OP_TYPE_STEM, ["image", "scale", "shift", "w", "b"], ["y"],
                                                domain=DOMAIN)], "stem", [x], [y], inits[2:])
    return (helper.make_model(standard, opset_imports=[helper.make_opsetid("", 18)]),
            helper.make_model(fused, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid(DOMAIN, OPSET_VERSION)]))


# (channels, H, W, batch): the 224x224 stem, odd and even sizes (the pool's and conv's edges), tiny maps
@pytest.mark.parametrize("channels,h,w,batch", [(24, 224, 224, 2), (24, 225, 223, 2), (24, 65, 47, 3),
                                                (20, 7, 9, 2), (8, 1, 1, 1), (24, 2, 3, 2)])
def test_stem_node_matches_the_exported_stem(channels, h, w, batch):
    standard, fused = _stem_graphs(channels, h, w)
    images = np.random.default_rng(h * w).integers(0, 256, (batch, 3, h, w), dtype=np.uint8)
    (expected,) = _session(standard).run(None, {"image": images})
    (got,) = _session(fused).run(None, {"image": images})
    assert got.shape == expected.shape == (batch, channels, ((h - 1) // 2) // 2 + 1, ((w - 1) // 2) // 2 + 1)
    # fp32 rounding of a 27-term sum, in another order (and the normalisation as one multiply-add)
    assert np.abs(got - expected).max() <= 1e-5 * float(np.abs(expected).max()) and np.abs(expected).max() > 1


@pytest.mark.parametrize("name,shape,message", [
    ("w", (24, 3, 5, 5), r"ganet.ops::Stem: weight has shape \(24, 3, 5, 5\); expected \(C, 3, 3, 3\)"),
    ("shift", (4,), r"ganet.ops::Stem: shift has shape \(4\); expected \(3\)"),  # the right scale is not blamed
])
def test_stem_node_names_a_bad_input(name, shape, message):
    _, fused = _stem_graphs(24, 16, 16)
    tensor = next(t for t in fused.graph.initializer if t.name == name)
    tensor.CopyFrom(onnx.numpy_helper.from_array(np.zeros(shape, np.float32), name))
    with pytest.raises(Exception, match=message):
        _session(fused).run(None, {"image": np.zeros((1, 3, 16, 16), np.uint8)})


def test_imagenet_stem_is_fused_in_the_network(tmp_path):
    """ga_shufflenet_v2 (the ImageNet stem; 64x64 keeps it quick): one Stem node instead of Cast ... MaxPool, as close
    to the float64 function as the fused graph that keeps them."""
    proto, model, prep = _exported(tmp_path, "ga_shufflenet_v2", size=64)  # data BN statistics: a stem bias
    wrapped = ImageModel(model, prep)
    fused, _ = fuse_group_attention(proto, wrapped)
    kept, _ = fuse_group_attention(proto, wrapped, fuse_stem=False)
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count(OP_TYPE_STEM) == 1 and not {"MaxPool", "Cast", "Mul", "Add"} & set(ops)
    assert {"MaxPool", "Cast"} <= {n.op_type for n in kept.graph.node}
    onnx.checker.check_model(fused)
    images = np.random.default_rng(0).integers(0, 256, (8, 3, 64, 64), dtype=np.uint8)
    with torch.no_grad():
        fp32 = wrapped(torch.from_numpy(images)).numpy()
        exact = copy.deepcopy(wrapped).double()(torch.from_numpy(images)).numpy()
    # what fp32 costs this randomised, sensitive network: PyTorch's forward, or ORT's on the exported graph (each
    # 2e-4..2e-3 from the float64 function on logits of order 5, in either order from image set to image set)
    fp32_error = max(np.abs(fp32 - exact).max(), np.abs(_session(proto).run(None, {"image": images})[0] - exact).max())
    for graph in (fused, kept):
        (logits,) = _session(graph).run(None, {"image": images})
        assert np.abs(logits - exact).max() <= 2 * fp32_error
        assert (logits.argmax(1) == exact.argmax(1)).all()
    assert np.abs(exact).max() > 1.0 and fp32_error < 5e-3  # the bounds above are not vacuous


def _exported(tmp_path: Path, name: str, size: int = 32, **kwargs
              ) -> tuple[onnx.ModelProto, torch.nn.Module, Preprocessing]:
    """A dynamo export (as ganet-export makes it) of ``name`` with randomised GA parameters and data BN statistics."""
    torch.manual_seed(0)
    model = _randomise(create_model(name, **kwargs))
    # BatchNorm statistics from data, as training leaves them: with the initial ones (mean 0, var 1) activations
    # shrink layer by layer, the GA blocks see inputs of order 1e-3 and an absolute tolerance would test nothing.
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.reset_running_stats()
        bn.momentum = None  # a plain average over the batches below
    with torch.no_grad():
        model.train()
        for _ in range(2):
            model(torch.randn(16, 3, size, size))
        model.fc.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    model.eval()
    prep = Preprocessing.for_input_size(size)
    path = tmp_path / "model.onnx"
    export_onnx(model, prep, path)
    return onnx.load(str(path)), model, prep


@pytest.fixture(scope="module")
def exported_ga(tmp_path_factory) -> tuple[onnx.ModelProto, torch.nn.Module, Preprocessing]:
    """One export for the tests below (each dynamo export takes ~6 s); they must not modify the model."""
    return _exported(tmp_path_factory.mktemp("ga"), "ga_shufflenet_v2_cifar")


def test_fused_graph_matches_pytorch_and_has_one_node_per_block(exported_ga):
    proto, model, prep = exported_ga
    fused, blocks = fuse_group_attention(proto, ImageModel(model, prep))
    n_blocks = sum(isinstance(m, GroupAttention) for m in model.modules())
    assert blocks == n_blocks == 16
    assert sum(n.domain == DOMAIN for n in fused.graph.node) == 16 and has_fused_ops(fused)
    assert len(fused.graph.node) < len(proto.graph.node) - 16 * 20  # each block was ~30 nodes
    # every unit's shuffle went into its block: 13 units are followed by a unit that splits its input, 3 (the last
    # of each stage) by a downsampling unit or conv5, which read the whole map
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count(OP_TYPE_SHUFFLE_SPLIT) == 13 and ops.count(OP_TYPE_SHUFFLE) == 3
    assert not {"Concat", "Split", "Unsqueeze"} & set(ops)
    assert OP_TYPE_STEM not in ops  # the CIFAR stem (3x3/1 conv, no max pool) is not the ImageNet one
    onnx.checker.check_model(fused)
    images = np.random.default_rng(0).integers(0, 256, (8, 3, 32, 32), dtype=np.uint8)
    wrapped = ImageModel(model, prep)
    with torch.no_grad():
        fp32 = wrapped(torch.from_numpy(images)).numpy()
        exact = copy.deepcopy(wrapped).double()(torch.from_numpy(images)).numpy()  # the function itself, to ~1e-12
    fp32_error = np.abs(fp32 - exact).max()  # what fp32 arithmetic costs this (randomised, sensitive) network
    session = _session(fused)
    for batch in (1, 3, 8):  # dynamic batch: nothing in the fused graph fixes it
        (logits,) = session.run(None, {"image": images[:batch]})
        # as close to the exact function as PyTorch's own fp32 forward is (both ~2e-4 on logits of order 2)
        assert np.abs(logits - exact[:batch]).max() <= 1.5 * fp32_error + 1e-5
        assert (logits.argmax(1) == exact[:batch].argmax(1)).all()
    assert np.abs(exact).max() > 1.0 and fp32_error < 1e-3  # the bounds above are not vacuous
    # the folded shuffle is the exported one, exactly: same numbers as the graph that keeps Concat and Split
    unfolded, _ = fuse_group_attention(proto, wrapped, fold_shuffles=False)
    assert {n.op_type for n in unfolded.graph.node if n.domain == DOMAIN} == {OP_TYPE}
    assert "Concat" in {n.op_type for n in unfolded.graph.node}
    assert np.array_equal(_session(unfolded).run(None, {"image": images})[0], session.run(None, {"image": images})[0])

    # A node whose weights do not match its input (only a hand-edited graph can have one) fails the run with an
    # error that names them, instead of answering with numbers.
    broken = onnx.ModelProto()
    broken.CopyFrom(fused)
    params = next(t for t in broken.graph.initializer if t.name.endswith(".params"))
    params.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(params)[:6].copy(), params.name))
    with pytest.raises(Exception, match=r"GroupAttention: params has shape \(6, 15\); expected \(7, G\)"):
        _session(broken).run(None, {"image": images[:2]})


def test_ablations_and_baselines_are_left_alone(tmp_path):
    proto, model, prep = _exported(tmp_path, "ga_shufflenet_v2_cifar", attn_kwargs={"use_u4p": False})
    fused, blocks = fuse_group_attention(proto, ImageModel(model, prep))
    assert blocks == 0 and not has_fused_ops(fused)
    base, model, prep = _exported(tmp_path, "shufflenet_v2_cifar")
    assert fuse_group_attention(base, ImageModel(model, prep))[1] == 0


def test_fusion_refuses_a_scope_that_is_not_a_ga_block(exported_ga):
    proto = exported_ga[0]

    class Renamed(torch.nn.Module):  # the graph's module paths no longer lead to GroupAttention modules
        def __init__(self) -> None:
            super().__init__()
            self.model = torch.nn.Module()

    with pytest.raises(FusionError, match="no module at"):
        fuse_group_attention(proto, Renamed())


def test_no_compiler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("GANET_KERNEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(KernelUnavailable, match="no C compiler"):
        library_path()


def test_failed_build_leaves_nothing(tmp_path):
    out = tmp_path / "lib" / "libganet_ops.so"
    with pytest.raises(KernelUnavailable, match="failed"):
        build_library(out, cc="false")  # a compiler that exits 1
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("GANET_DISABLE_KERNELS", "1")
    with pytest.raises(KernelUnavailable, match="GANET_DISABLE_KERNELS"):
        library_path()


def test_library_is_cached_per_source(tmp_path, monkeypatch):
    env = {k: v for k, v in os.environ.items() if k not in (LIBRARY_ENV, "GANET_DISABLE_KERNELS")}
    env["GANET_KERNEL_CACHE"] = str(tmp_path)
    code = "from ganet.kernels import library_path; print(library_path())"
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    path = Path(first.stdout.strip())
    assert path.is_file() and path.is_relative_to(tmp_path)
    assert path.stat().st_mode & 0o777 == 0o755  # another user (a container's service user) can load it
    mtime = path.stat().st_mtime_ns
    again = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert Path(again.stdout.strip()) == path and path.stat().st_mtime_ns == mtime  # not rebuilt

    # another source (an edited kernel) is another library, built beside the first
    edited = tmp_path / "group_attention.c"
    edited.write_text(ganet.kernels.SOURCE.read_text() + "\n/* edited */\n")
    monkeypatch.setenv("GANET_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(ganet.kernels, "SOURCE", edited)
    other = library_path()
    assert other.is_file() and other != path and other.parent.parent == path.parent.parent


def test_prebuilt_library_for_hosts_without_a_compiler(tmp_path, monkeypatch, capsys):
    """python -m ganet.kernels builds ahead of time; GANET_KERNEL_LIBRARY then serves it where no compiler is."""
    from ganet.kernels.__main__ import main

    out = tmp_path / "lib" / "libganet_ops.so"
    assert main([str(out), "--march", "x86-64-v3"]) == 0
    assert f"GANET_KERNEL_LIBRARY={out.resolve()}" in capsys.readouterr().out
    assert main([str(tmp_path / "bad.so"), "--march", "no-such-cpu"]) == 1
    assert "python -m ganet.kernels:" in capsys.readouterr().err and not (tmp_path / "bad.so").exists()

    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv(LIBRARY_ENV, str(out))
    assert library_path() == out
    block = _randomise(GroupAttention(60, 15)).eval()
    x = torch.randn(2, 60, 8, 8)
    with torch.no_grad():
        expected = block(x).numpy()
    (got,) = _session(_single_block_graph(block, x.shape)).run(None, {"x": x.numpy()})
    assert np.abs(got - expected).max() <= 2e-5 * max(float(np.abs(expected).max()), 1.0)

    monkeypatch.setenv(LIBRARY_ENV, str(tmp_path / "missing.so"))
    with pytest.raises(KernelUnavailable, match="does not exist"):
        library_path()
    garbage = tmp_path / "garbage.so"
    garbage.write_bytes(b"not a shared library")
    monkeypatch.setenv(LIBRARY_ENV, str(garbage))
    with pytest.raises(KernelUnavailable, match="could not load"):
        register_kernels(ort.SessionOptions())
