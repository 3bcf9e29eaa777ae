"""``ganet-export --verify`` on the pixel probe's export: a fresh export passes; a flipped byte, a changed size, a
missing or an unlisted file, a manifest whose contract or labels disagree with the files, each is named."""
from __future__ import annotations

import hashlib
import json

import pytest

from ganet.export.manifest import hash_directory
from ganet.export.verify import _close, _compare_numbers, VerifyResult, verify_export
from probe_export import make_probe_export


@pytest.fixture
def probe(tmp_path):
    return make_probe_export(tmp_path / "probe")


def edit_manifest(directory, change) -> None:
    path = directory / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))


def test_a_fresh_export_passes_and_says_parity_was_not_rerun(probe):
    result = verify_export(probe, log=lambda line: None)
    assert result.ok and result.differences == [] and not result.parity_rerun
    assert any("parity could not be re-run" in n for n in result.notes), result.notes


def test_changed_missing_and_unlisted_files_are_named(probe):
    data = bytearray((probe / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 1
    (probe / "model.onnx").write_bytes(bytes(data))
    (probe / "extra.bin").write_bytes(b"x")
    (probe / "labels.txt").write_text("short\n")
    result = verify_export(probe, log=lambda line: None)
    text = "\n".join(result.differences)
    assert not result.ok
    assert "model.onnx: sha256 " in text and "extra.bin: not listed in the manifest" in text
    assert "labels.txt: size " in text
    assert "parity not re-run: model.onnx differs from the manifest" in result.notes
    (probe / "labels.txt").unlink()
    assert "labels.txt: missing (manifest lists" in "\n".join(verify_export(probe, log=print).differences)


def test_labels_that_disagree_with_the_manifest_are_named(probe):
    (probe / "labels.txt").write_text("short\n")
    result = verify_export(probe, log=lambda line: None)
    assert "labels: manifest and labels.txt differ" in result.differences


@pytest.mark.parametrize("change, words", [
    (lambda m: m["input"].update(dtype="float32"), "manifest 'image': float32"),
    (lambda m: m["input"].update(name="pixels"), "manifest 'pixels'"),
    (lambda m: m["output"].update(shape=["batch", 47]), "manifest 'logits': float32 ['batch', 47]"),
    (lambda m: m.update(num_classes=47, labels=m["labels"][:47]), "num_classes: manifest says 47"),
    (lambda m: m["preprocessing"].update(input_size=3, resize_size=3), "preprocessing.input_size: manifest says 3"),
])
def test_a_contract_that_disagrees_with_the_model_is_named(probe, change, words):
    edit_manifest(probe, change)
    result = verify_export(probe, log=lambda line: None)
    assert not result.ok and any(words in d for d in result.differences), result.differences


def test_recorded_numbers_compare_with_float_noise_allowed_and_exact_counts():
    assert _close(1e-4, 1.4e-4) and not _close(1e-4, 2.1e-4) and _close(0.0, 5e-7) and not _close(0.0, 2e-6)
    result = VerifyResult()
    _compare_numbers("p", {"max_abs": 1e-4, "top1_agreement": 1.0, "drop_points": 0.5},
                     {"max_abs": 1.2e-4, "top1_agreement": 1.0, "drop_points": 0.5}, ("max_abs", "top1_agreement",
                                                                                     "drop_points"), result)
    assert result.ok
    _compare_numbers("p", {"max_abs": 1e-4, "top1_agreement": 1.0}, {"max_abs": 1e-2, "top1_agreement": 0.99,
                                                                      "mean_abs": 3.0},
                     ("max_abs", "top1_agreement", "mean_abs"), result)
    assert result.differences == ["p.max_abs: manifest says 0.0001, re-run gives 0.01",
                                  "p.top1_agreement: manifest says 1, re-run gives 0.99",
                                  "p.mean_abs: missing from the manifest (re-run gives 3)"]
    assert not result.ok


def test_counts_compare_exactly_to_a_billionth_and_every_key_is_checked():
    result = VerifyResult()
    keys = ("top1_fp32", "top1_int8", "drop_points")
    _compare_numbers("h", {"top1_fp32": 1e-9, "top1_int8": 1.5e-9, "drop_points": 0.5},
                     {"top1_fp32": 0.0, "top1_int8": 0.0, "drop_points": 0.6}, keys, result)
    # 1e-9 apart is the same; 1.5e-9 is not; drop_points is exact too (0.5 vs 0.6 would pass a relative check)
    assert result.differences == ["h.top1_int8: manifest says 1.5e-09, re-run gives 0",
                                  "h.drop_points: manifest says 0.5, re-run gives 0.6"]
    result = VerifyResult()
    _compare_numbers("p", {"max_abs": 1.0}, {"mean_abs": 2.0, "max_abs": 9.0}, ("mean_abs", "max_abs"), result)
    assert result.differences == ["p.mean_abs: missing from the manifest (re-run gives 2)",
                                  "p.max_abs: manifest says 1, re-run gives 9"]  # a missing key stops nothing


def quiet_verify(directory):
    return verify_export(directory, log=lambda line: None)


def test_a_run_without_the_parity_rerun_reports_parity_rerun_as_false_not_a_stand_in(probe):
    """The probe's manifest records no checkpoint, so parity is not re-run and the field keeps its default: exactly
    False (a bool callers may compare with ``is``), not None or another falsy stand-in."""
    result = quiet_verify(probe)
    assert result.parity_rerun is False
    assert VerifyResult().parity_rerun is False


def test_a_changed_file_listed_after_an_intact_one_is_named_with_both_hashes(probe):
    """The files loop goes on past an intact file (labels.txt sorts first) to the next one, and names the changed one
    as exactly ``model.onnx: sha256 NOW, manifest says RECORDED``; nothing else differs."""
    data = bytearray((probe / "model.onnx").read_bytes())
    recorded = hashlib.sha256(data).hexdigest()
    data[len(data) // 2] ^= 1
    (probe / "model.onnx").write_bytes(bytes(data))
    result = quiet_verify(probe)
    assert result.differences == [f"model.onnx: sha256 {hashlib.sha256(data).hexdigest()}, manifest says {recorded}"]
    assert "parity not re-run: model.onnx differs from the manifest" in result.notes


def test_a_missing_file_and_unlisted_files_are_each_named_exactly_in_order(probe):
    """Listed files first (a missing one with the size the manifest lists), then every unlisted file, nested ones by
    their posix path relative to the export, each as ``REL: not listed in the manifest``."""
    size = (probe / "labels.txt").stat().st_size
    (probe / "labels.txt").unlink()
    (probe / "a.bin").write_bytes(b"a")
    (probe / "sub").mkdir()
    (probe / "sub" / "b.bin").write_bytes(b"b")
    result = quiet_verify(probe)
    assert result.differences == [f"labels.txt: missing (manifest lists {size} bytes)",
                                  "a.bin: not listed in the manifest",
                                  "sub/b.bin: not listed in the manifest"]


@pytest.mark.parametrize("replacement", ["garbage", "other_model"])
def test_a_changed_model_onnx_is_not_contract_checked(probe, replacement):
    """When model.onnx's bytes differ from the manifest, its graph is not read: garbage bytes do not crash --verify,
    and a different valid model (output renamed) adds no contract difference; only the file difference is named."""
    import onnx

    recorded = (probe / "model.onnx").stat().st_size
    if replacement == "garbage":
        (probe / "model.onnx").write_bytes(b"not an onnx model")
    else:
        model = onnx.load(str(probe / "model.onnx"))
        model.graph.node[-1].output[0] = model.graph.output[0].name = "class_scores"
        onnx.save(model, str(probe / "model.onnx"))
    now = (probe / "model.onnx").stat().st_size
    assert now != recorded
    result = quiet_verify(probe)
    assert result.differences == [f"model.onnx: size {now} bytes, manifest says {recorded}"]
    assert "parity not re-run: model.onnx differs from the manifest" in result.notes


def test_a_missing_external_data_file_is_named_without_loading_the_weights(probe):
    """An export whose model.onnx keeps its weights in model.onnx.data: the contract check reads only the graph, so
    a deleted data file is reported as missing (with its recorded size) instead of crashing the graph load."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(probe / "model.onnx"))
    cast, flatten = model.graph.node
    cast.output[0] = "cast"
    model.graph.node.insert(1, helper.make_node("Add", ["cast", "offset"], ["pixels"]))
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(1, np.float32), "offset"))
    onnx.checker.check_model(model)
    onnx.save(model, str(probe / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    edit_manifest(probe, lambda m: m.update(files=hash_directory(probe)))
    assert quiet_verify(probe).differences == []
    size = (probe / "model.onnx.data").stat().st_size
    (probe / "model.onnx.data").unlink()
    result = quiet_verify(probe)
    assert result.differences == [f"model.onnx.data: missing (manifest lists {size} bytes)"]


def test_contract_differences_are_named_exactly(probe):
    """Each disagreeing tensor reads ``manifest NAME: DTYPE SHAPE, model.onnx has NAME: DTYPE SHAPE`` (input first),
    followed by the serving contract it breaks, if any (uint8 in, float32 out), then the num_classes that the
    manifest's own output shape contradicts."""
    edit_manifest(probe, lambda m: (m["input"].update(dtype="float32"), m["output"].update(shape=["batch", 47])))
    assert quiet_verify(probe).differences == [
        "manifest 'image': float32 ['batch', 3, 4, 4], model.onnx has 'image': uint8 ['batch', 3, 4, 4]",
        "manifest 'image': float32, the serving contract is uint8",
        "manifest 'logits': float32 ['batch', 47], model.onnx has 'logits': float32 ['batch', 48]",
        "num_classes: manifest says 48, its output shape ['batch', 47]"]
    edit_manifest(probe, lambda m: (m["input"].update(dtype="uint8"), m["output"].update(shape=["batch", 48],
                                                                                          dtype="float16")))
    assert quiet_verify(probe).differences == [
        "manifest 'logits': float16 ['batch', 48], model.onnx has 'logits': float32 ['batch', 48]",
        "manifest 'logits': float16, the serving contract is float32"]


@pytest.mark.parametrize("shape, num_classes_named", [(["batch", 48, 1], True), (["batch", 1, 48], False)])
def test_num_classes_is_checked_against_the_last_output_axis(probe, shape, num_classes_named):
    """num_classes must equal the LAST axis of the manifest's output shape (not the second: a 3-D output tells them
    apart); the shape itself also disagrees with the probe's 2-D graph output."""
    edit_manifest(probe, lambda m: m["output"].update(shape=shape))
    expected = [f"manifest 'logits': float32 {shape}, model.onnx has 'logits': float32 ['batch', 48]"]
    if num_classes_named:
        expected.append(f"num_classes: manifest says 48, its output shape {shape}")
    assert quiet_verify(probe).differences == expected


@pytest.mark.parametrize("shape, input_size_named", [(["batch", 3, 4, 5], True), (["batch", 3, 5, 4], False)])
def test_input_size_is_checked_against_the_last_input_axis(probe, shape, input_size_named):
    """preprocessing.input_size (4) must equal the LAST axis (W) of the manifest's NCHW input shape; a non-square
    shape tells W from H; the shape itself also disagrees with the probe's graph input."""
    edit_manifest(probe, lambda m: m["input"].update(shape=shape))
    expected = [f"manifest 'image': uint8 {shape}, model.onnx has 'image': uint8 ['batch', 3, 4, 4]"]
    if input_size_named:
        expected.append(f"preprocessing.input_size: manifest says 4, its input shape {shape}")
    assert quiet_verify(probe).differences == expected
