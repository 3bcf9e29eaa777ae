"""A default export (no --atol) records, and gates on, the fp32 ONNX bound of 1e-4 and the fused graph's 2e-4.

The export is the serving tests' real one (an untrained, BatchNorm-calibrated ga_shufflenet_v2_cifar through
`ganet-export` with no --atol), shared by the session, so this costs no export of its own.
"""
from __future__ import annotations

import json

from test_serve import export_dir  # noqa: F401  (the session's export fixture)


def test_a_default_exports_manifest_records_the_default_bounds(export_dir):  # noqa: F811
    manifest = json.loads((export_dir / "manifest.json").read_text())
    onnx, fused = manifest["parity"]["onnx"], manifest["parity"]["onnx_fused"]
    assert onnx["tolerance"] == {"max_abs": 1e-4, "top1_agreement": 1.0}
    assert fused["tolerance"] == {"max_abs": 2e-4, "top1_agreement": 1.0}
    for result in (onnx, fused):  # and the recorded numbers meet them
        assert result["passed"] and 0 < result["max_abs"] <= result["tolerance"]["max_abs"]
        assert result["top1_agreement"] == 1.0
        assert all(b["max_abs"] <= result["tolerance"]["max_abs"] for b in result["by_batch"].values())
