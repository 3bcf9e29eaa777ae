"""A pixel-probe export: a real ONNX model, served by the real ONNX Runtime backend, whose logits are its input.

``logits[b] = image[b].reshape(-1)`` as float32: a (B, 3, S, S) uint8 batch comes back as (B, 3*S*S) numbers, so a
test reads exactly which pixels the service handed to the model (after decoding, compositing, rounding of FP32
tensors, batching). The graph is two ONNX operators written with ``onnx.helper`` (no torch, no training, a few
milliseconds), and the directory is a valid export (``manifest.json`` with hashes), so ``ganet-serve DIR`` serves
it like any other.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ganet.export.manifest import FORMAT, FORMAT_VERSION, MANIFEST_FILE, hash_directory
from ganet.preprocess import Preprocessing

NAME = "pixel_probe"
SIZE = 4  # 4x4 input: 48 logits, one per (channel, row, column)
PREPROCESSING = Preprocessing(SIZE, SIZE, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
LABELS = tuple(f"{c}{y}{x}" for c in "RGB" for y in range(SIZE) for x in range(SIZE))


def make_probe_export(directory: Path, max_batch: int = 8) -> Path:
    """Write the probe's ``model.onnx`` and ``manifest.json`` into ``directory``; returns it."""
    import onnx
    from onnx import TensorProto, helper

    directory.mkdir(parents=True, exist_ok=True)
    image = helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", 3, SIZE, SIZE])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(LABELS)])
    graph = helper.make_graph([helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
                               helper.make_node("Flatten", ["pixels"], ["logits"], axis=1)],
                              NAME, [image], [logits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(directory / "model.onnx"))
    (directory / "labels.txt").write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "created": "1970-01-01T00:00:00Z",
        "model": NAME, "num_classes": len(LABELS), "labels": list(LABELS), "max_batch": max_batch,
        "checkpoint": {}, "preprocessing": PREPROCESSING.to_dict(),
        "input": {"name": "image", "dtype": "uint8", "shape": ["batch", 3, SIZE, SIZE], "dynamic_axes": {"0": "batch"},
                  "layout": "NCHW", "color": "RGB", "value_range": [0, 255]},
        "output": {"name": "logits", "dtype": "float32", "shape": ["batch", len(LABELS)],
                   "dynamic_axes": {"0": "batch"}},
        "onnx": {"opset": 17, "ir_version": 8}, "versions": {},
        "artifacts": [{"kind": "onnx", "file": "model.onnx", "precision": "fp32"}],
        "parity": {}, "files": hash_directory(directory),
    }
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return directory


def pixels_of(logits: np.ndarray) -> np.ndarray:
    """The probe's logits back as the uint8 images the model saw: (B, 48) -> (B, 3, S, S)."""
    values = np.asarray(logits, dtype=np.float64).reshape(-1, 3, SIZE, SIZE)
    assert np.array_equal(values, np.round(values)) and values.min() >= 0 and values.max() <= 255, values
    return values.astype(np.uint8)
