"""ganet-export's contract that needs no export: bad input, usage errors, --trt without TensorRT, the manifest
reader, the baked-batch detector. Seconds; the exports themselves are tested in test_export.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ganet.checkpoint import save_checkpoint
from ganet.export import cli
from ganet.export import onnx_export as OX
from ganet.export.manifest import FORMAT, FORMAT_VERSION, ManifestError, load_manifest
from ganet.models import create_model
from ganet.preprocess import Preprocessing


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "cifar.safetensors"
    save_checkpoint(path, create_model("ga_shufflenet_v2_cifar", num_classes=10), "ga_shufflenet_v2_cifar",
                    preprocessing=Preprocessing.for_input_size(32))
    return path


def manifest_dict() -> dict:
    """A minimal valid manifest (what the exporter writes, less the results)."""
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "model": "ga_shufflenet_v2_cifar", "num_classes": 2,
        "labels": ["cat", "dog"], "max_batch": 4, "preprocessing": Preprocessing.for_input_size(32).to_dict(),
        "input": {"name": "image", "dtype": "uint8", "shape": ["batch", 3, 32, 32], "dynamic_axes": {"0": "batch"},
                  "layout": "NCHW", "color": "RGB", "value_range": [0, 255]},
        "output": {"name": "logits", "dtype": "float32", "shape": ["batch", 2], "dynamic_axes": {"0": "batch"}},
        "artifacts": [{"kind": "onnx", "file": "model.onnx", "precision": "fp32"}],
        "files": {"model.onnx": {"sha256": "0" * 64, "bytes": 10}},
    }


def test_help_reads_like_documentation():
    text = cli.build_parser().format_help()
    for flag in ("--output", "--verify", "--int8", "--trt", "--fp16", "--triton", "--max-batch", "--opset",
                 "--simplify", "--calibration-images", "--force", "exit codes", "uint8", "1e-4"):
        assert flag in text


def _write_foreign_safetensors(path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(path))


@pytest.mark.parametrize("make,message", [
    (lambda p: None, "no such file"),
    (lambda p: p.write_bytes(b"\x00" * 5), "truncated"),
    (lambda p: p.write_bytes(b"this is not a checkpoint at all, just text"), "not a safetensors"),
    (_write_foreign_safetensors, "not a ganet checkpoint"),
])
def test_bad_checkpoint_exits_2_and_leaves_no_dir(tmp_path, capsys, make, message):
    ckpt = tmp_path / "model.safetensors"
    make(ckpt)
    out = tmp_path / "out"
    assert cli.main([str(ckpt), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(ckpt) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["model.safetensors"] if ckpt.exists() else [])


def test_truncated_real_checkpoint_exits_2(small_checkpoint, tmp_path, capsys):
    ckpt = tmp_path / "cut.safetensors"
    ckpt.write_bytes(small_checkpoint.read_bytes()[:-1000])
    assert cli.main([str(ckpt), "--output", str(tmp_path / "out")]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.safetensors"]


def test_trt_without_tensorrt_fails_before_any_work(small_checkpoint, tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here: the GPU tests cover --trt")
    except ImportError:
        pass
    out = tmp_path / "out"
    assert cli.main([str(small_checkpoint), "--output", str(out), "--trt"]) == 2
    err = capsys.readouterr().err
    assert "TensorRT" in err and "pip install" in err and "nothing was written" in err
    assert list(tmp_path.iterdir()) == []


def test_usage_errors(small_checkpoint, tmp_path, capsys):
    assert cli.main([str(small_checkpoint), "--output", str(tmp_path / "o"), "--fp16"]) == 2
    assert "--fp16 builds a TensorRT engine" in capsys.readouterr().err
    assert cli.main([str(small_checkpoint), "--output", str(tmp_path / "o"), "--max-batch", "0"]) == 2
    assert "--max-batch must be >= 1" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    assert cli.main([str(small_checkpoint), "--output", str(tmp_path / "full")]) == 2
    assert "not empty; pass --force" in capsys.readouterr().err and (tmp_path / "full" / "keep.txt").exists()
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2 and "CHECKPOINT" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_verify_of_a_non_export_exits_2(tmp_path, capsys):
    assert cli.main(["--verify", str(tmp_path)]) == 2
    assert "manifest.json: missing" in capsys.readouterr().err


def test_baked_batch_reshape_is_named():
    from onnx import TensorProto, helper

    def graph(shape: list[int]):
        return helper.make_model(helper.make_graph(
            [helper.make_node("Reshape", ["x", "shape"], ["y"], name="r")], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [helper.make_tensor("shape", TensorProto.INT64, [len(shape)], shape)]))

    assert OX.batch_baked_reshapes(graph([2, 2, 2])) == ["r (shape [2, 2, 2], the export batch)"]
    assert OX.batch_baked_reshapes(graph([4, 2])) == ["r (shape [4, 2])"]
    assert OX.batch_baked_reshapes(graph([-1, 2, 4])) == [] and OX.batch_baked_reshapes(graph([0, 8])) == []


def test_manifest_round_trip_and_errors(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(manifest_dict()))
    m = load_manifest(tmp_path)
    assert (m.input.shape, m.input.dynamic_axes, m.output.shape) == (("batch", 3, 32, 32), {0: "batch"},
                                                                     ("batch", 2))
    assert m.artifact("onnx").file == "model.onnx" and m.artifact("tensorrt") is None
    assert m.path(m.artifact("onnx")) == tmp_path / "model.onnx"

    with pytest.raises(ManifestError, match="no such export directory"):
        load_manifest(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="missing: not a ganet export directory"):
        load_manifest(tmp_path / "empty")
    good = manifest_dict()
    cases = [
        ("{not json", "corrupt: not valid JSON"),
        (json.dumps({"format": "something.else"}), "not a ganet export manifest"),
        (json.dumps(good | {"format_version": 99}), "newer ganet.*manifest format 99"),
        (json.dumps(good | {"format_version": "1"}), "invalid format_version"),
        (json.dumps({k: v for k, v in good.items() if k != "labels"}), r"missing keys \['labels'\]"),
        (json.dumps(good | {"num_classes": 3}), "2 labels for num_classes=3"),
        (json.dumps(good | {"input": {"name": "image"}}), "invalid 'input' entry"),
        (json.dumps(good | {"artifacts": [{"kind": "onnx", "file": "other.onnx", "precision": "fp32"}]}),
         "'other.onnx' is not listed under 'files'"),
        (json.dumps(good | {"artifacts": [{"kind": "openvino", "file": "model.onnx", "precision": "fp32"}]}),
         "unknown artifact kind 'openvino'"),
        (json.dumps(good | {"preprocessing": {"input_size": 32}}), "invalid entry.*missing fields"),
    ]
    for text, match in cases:
        (tmp_path / "manifest.json").write_text(text)
        with pytest.raises(ManifestError, match=match) as e:
            load_manifest(tmp_path)
        assert str(tmp_path / "manifest.json") in str(e.value)


def test_manifest_reader_needs_neither_torch_nor_onnx(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(manifest_dict()))
    code = ("import sys; sys.modules['torch'] = sys.modules['onnx'] = sys.modules['onnxruntime'] = None; "
            f"from ganet.export.manifest import load_manifest; m = load_manifest({str(tmp_path)!r}); "
            "print(m.input.name, m.input.dtype, m.preprocessing.input_size, m.artifact('onnx').file)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["image", "uint8", "32", "model.onnx"]
