"""Malformed and mismatched checkpoints, crafted byte by byte: every tool that loads one refuses it within seconds,
with one line that names the file and the problem, exit code 2, no traceback and no output left behind."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ganet
from ganet.checkpoint import CheckpointError, read_checkpoint_info
from ganet.export import cli as export_cli
from ganet.preprocess import Preprocessing
from ganet.train import cli as train_cli

MODEL = "shufflenet_v2_cifar"  # the smallest registered model: the crafted files stay small and quick to write
PREP = Preprocessing.for_input_size(8)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good") / "good.safetensors"
    ganet.save_checkpoint(path, ganet.create_model(MODEL, num_classes=2), MODEL, preprocessing=PREP)
    return path


def metadata(path: Path) -> dict[str, str]:
    raw = path.read_bytes()
    return json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])["__metadata__"]


def write_raw(path: Path, header: dict | bytes, data: bytes = b"") -> Path:
    """A safetensors file exactly as given: 8-byte little-endian header length, the header, the data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def with_tensors(good: Path, dst: Path, change) -> Path:
    """The good checkpoint's tensors, changed by ``change(state)``, under its own metadata."""
    state = ganet.load_checkpoint(good)[0].state_dict()
    change(state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst), metadata=metadata(good))
    return dst


def relabelled(good: Path, dst: Path, **changes: str) -> Path:
    state = ganet.load_checkpoint(good)[0].state_dict()
    save_file(state, str(dst), metadata=metadata(good) | changes)
    return dst


CASES = {
    "entry not an object": (lambda good, p: write_raw(p, {"__metadata__": metadata(good), "w": 5}),
                            "is a JSON int, not an object"),
    "no data_offsets": (lambda good, p: write_raw(p, {"__metadata__": metadata(good),
                                                      "w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8),
                        "has no data_offsets"),
    "deep nesting": (lambda good, p: write_raw(p, b'{"w": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
                     "nested too deep"),
    "deep nesting in metadata": (lambda good, p: relabelled(good, p, labels="[" * 100_000 + "]" * 100_000),
                                 "nested too deep"),
    "huge header length": (lambda good, p: p.write_bytes(struct.pack("<Q", 2 ** 62) + b"{}" + b"\0" * 64),
                           "the header claims 4611686018427387904 bytes"),
    "truncated": (lambda good, p: p.write_bytes(good.read_bytes()[:-1000]), "truncated or corrupt"),
    "unknown dtype": (lambda good, p: write_raw(p, {"__metadata__": metadata(good),
                                                    "w": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}},
                                                b"\0" * 8), "has dtype 'F99'"),
    "offsets disagree with the shape": (
        lambda good, p: write_raw(p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8),
        "data_offsets span 8 bytes"),
    "overlapping tensors": (
        lambda good, p: write_raw(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
        "overlap or leave a gap"),
    "metadata not strings": (lambda good, p: write_raw(p, {"__metadata__": {"format": 5}}),
                             "__metadata__ must be an object of strings"),
    "labels not strings": (lambda good, p: relabelled(good, p, labels="[1, 2]"), "labels must be a JSON list"),
    "extra not an object": (lambda good, p: relabelled(good, p, extra="[]"), "must be JSON objects"),
    "integer weights": (lambda good, p: with_tensors(good, p, lambda s: s.update(
        {"fc.weight": s["fc.weight"].to(torch.int32)})), "mismatched (1): fc.weight is I32 [2, 1024]"),
    "shapes of another head": (lambda good, p: with_tensors(good, p, lambda s: s.update(
        {"fc.weight": torch.zeros(3, 1024), "fc.bias": torch.zeros(3)})),
        "fc.weight is F32 [3, 1024], the model's is float32 [2, 1024]"),
    "another architecture's name": (lambda good, p: relabelled(good, p, model="ga_shufflenet_v2_cifar"),
                                    "missing (208): stage2.0.attn"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_export_refuses_in_one_line(good, tmp_path, capsys, case):
    make, message = CASES[case]
    bad = tmp_path / "bad.safetensors"
    make(good, bad)
    t0 = time.monotonic()
    assert export_cli.main([str(bad), "--output", str(tmp_path / "out")]) == 2
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert message in err and str(bad) in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert elapsed < 5, f"{elapsed:.1f} s to refuse"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


def test_imagenet_weights_labelled_as_the_cifar_form_are_refused_at_once(tmp_path, capsys):
    """The ImageNet and CIFAR forms share every parameter name and shape; only their strides differ. The CIFAR form
    at 224x224 costs 9.5 GMACs an image (49x its design), and its export ran for minutes: now refused up front."""
    path = tmp_path / "imagenet.safetensors"
    model = ganet.create_model("ga_shufflenet_v2", num_classes=2)
    ganet.save_checkpoint(path, model, "ga_shufflenet_v2")  # the 224x224 preprocessing of the ImageNet form
    mislabelled = relabelled(path, tmp_path / "mislabelled.safetensors", model="ga_shufflenet_v2_cifar")
    t0 = time.monotonic()
    assert export_cli.main([str(mislabelled), "--output", str(tmp_path / "out")]) == 2
    assert time.monotonic() - t0 < 5
    err = capsys.readouterr().err
    assert "ga_shufflenet_v2_cifar is built for 32x32 inputs and is asked for 224x224, 49x" in err
    assert str(mislabelled) in err and err.count("\n") == 1 and not (tmp_path / "out").exists()
    # The same weights under their own name load; ganet-train refuses to make such a model in the first place.
    assert ganet.load_checkpoint(path)[1].model == "ga_shufflenet_v2"
    assert train_cli.main(["--model", "ga_shufflenet_v2_cifar", "--input-size", "224",
                           "--output", str(tmp_path / "run")]) == 2
    assert "is built for 32x32 inputs" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_every_loader_refuses_in_one_line(good, tmp_path, capsys):
    bad = CASES["entry not an object"][0](good, tmp_path / "bad.safetensors")
    assert train_cli.main(["--eval", str(bad)]) == 2  # ganet-train --eval
    err = capsys.readouterr().err
    assert str(bad) in err and "not an object" in err and err.count("\n") == 1
    assert train_cli.main(["--init", str(bad), "--output", str(tmp_path / "run"), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and err.count("\n") == 1 and not (tmp_path / "run").exists()
    # ganet-train --resume, on a resume state that was cut short
    run = tmp_path / "resumable"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(train_cli.TrainConfig(input_size=8, output=str(run)).to_dict()))
    (run / "last.state.safetensors").write_bytes(good.read_bytes()[:5000])
    assert train_cli.main(["--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "last.state.safetensors: truncated" in err and err.count("\n") == 1
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "last.state.safetensors"]


def test_cli_process_prints_one_line_and_no_traceback(good, tmp_path):
    bad = CASES["no data_offsets"][0](good, tmp_path / "bad.safetensors")
    result = subprocess.run(["ganet-export", str(bad), "--output", str(tmp_path / "out")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"ganet-export: error: cannot export: {bad}: corrupt header")


def test_the_torch_free_reader_refuses_the_same_files(good, tmp_path):
    bad = CASES["entry not an object"][0](good, tmp_path / "bad.safetensors")
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None
        from ganet.checkpoint import CheckpointError, read_checkpoint_info
        assert read_checkpoint_info({str(good)!r}).num_classes == 2
        try:
            read_checkpoint_info({str(bad)!r})
        except CheckpointError as e:
            print(e)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "tensor 'w' in the header is a JSON int" in result.stdout
    with pytest.raises(CheckpointError, match="not an object"):
        read_checkpoint_info(bad)
