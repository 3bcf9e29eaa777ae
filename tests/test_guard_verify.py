"""``ganet-export --verify`` on the pixel probe's export: a fresh export passes; a flipped byte, a changed size, a
missing or an unlisted file, a manifest whose contract or labels disagree with the files, each is named."""
from __future__ import annotations

import json

import pytest

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
