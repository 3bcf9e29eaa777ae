"""INT8 for CPU hosts: ONNX Runtime static quantization (QDQ), calibrated on training images.

Weights are quantised per channel (int8, symmetric), activations per tensor (uint8, asymmetric), as ONNX Runtime
recommends for CNNs on x86. Kept in float: the uint8 input's normalisation (Cast/Mul/Add: re-quantising 8-bit data
gains nothing), the classifier (the logits' scale matters to every consumer), and every node of the GA blocks
(``ganet.export.fp16.ga_scope``): their attention logits are standardised by a spatial standard deviation, which
magnifies quantisation error (one digits experiment: 1.7 points of held-out top-1 lost with them quantised, none
without).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["QuantizationError", "quantize_int8", "top1_accuracy"]


class QuantizationError(RuntimeError):
    pass


def _nodes_kept_float(model_path: Path) -> list[str]:
    """Everything before the first Conv (input normalisation), the Gemm head and the GA blocks' nodes."""
    import onnx

    from ganet.export.fp16 import ga_scope

    model = onnx.load(str(model_path), load_external_data=False)
    keep = []
    for node in model.graph.node:
        if node.op_type == "Conv":
            break
        keep.append(node.name)
    keep += [n.name for n in model.graph.node if n.op_type == "Gemm" or ga_scope(n) is not None]
    return keep


def quantize_int8(fp32_path: str | os.PathLike, int8_path: str | os.PathLike, calibration: np.ndarray,
                  batch_size: int = 32) -> dict[str, Any]:
    """Write the QDQ INT8 model of ``fp32_path`` to ``int8_path``; ``calibration`` is uint8 (N, 3, S, S).

    Returns the settings for the manifest. Calibration: min/max of every activation over ``calibration``.
    """
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    if calibration.dtype != np.uint8 or calibration.ndim != 4 or len(calibration) == 0:
        raise QuantizationError(f"calibration images must be uint8 (N, 3, S, S) with N >= 1, got {calibration.dtype} "
                                f"{calibration.shape}")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([calibration[i:i + batch_size] for i in range(0, len(calibration), batch_size)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"image": batch}

    prepared = int8_path.with_name(int8_path.name + ".prep.onnx")
    excluded = _nodes_kept_float(fp32_path)  # from the exporter's graph: it carries the module-path metadata
    try:
        # Shape inference + ORT's basic optimisations, as quantize_static's documentation advises.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        settings = {"method": "onnxruntime.quantization.quantize_static", "format": "QDQ",
                    "activation_type": "uint8", "weight_type": "int8", "per_channel": True,
                    "calibrate_method": "MinMax", "calibration_images": int(len(calibration)),
                    "nodes_kept_float": len(excluded)}
        quantize_static(str(prepared), str(int8_path), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=excluded)
    finally:
        prepared.unlink(missing_ok=True)
        for leftover in int8_path.parent.glob(f"{int8_path.name}.prep*"):  # ours only: the folder is the caller's
            leftover.unlink(missing_ok=True)
    return settings


def top1_accuracy(logits: np.ndarray, targets: np.ndarray) -> float:
    return float((logits.argmax(1) == targets).mean())
