"""The torch backend's CUDA graphs and reduced precisions on a CUDA GPU (all skipped without one):

* graph replay against the eager forward in fp32: max |delta logit| <= 1e-4 of the logits' scale, every batch size
  1..max_batch, each bucket recorded once, padded rows never answered;
* fp16 and bf16 (a converted copy, GA maps in fp32) against fp32: top-1 agreement on the photographs, their random
  crops and the held-out digits (fp16 >= 99.5%, bf16 >= 98%: see TOP1_AGREEMENT), for a digits-trained network (test_export.py's, ~88-91% held-out top-1;
  an untrained network's near-ties would measure its chaos, not the precision).

Figures go to $GANET_GPU_FIGURES when set (benchmarks/gpu_checks.sh collects them).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ganet.export.parity import digits_images, photo_arrays
from ganet.preprocess import image_to_uint8
from ganet.serve.backends import OnnxRuntimeBackend, TorchBackend, load_backend

from test_export import trained_digits_model
from test_serve import export_dir, photos  # noqa: F401 (fixture)

pytestmark = pytest.mark.gpu

GRAPH_VS_EAGER_REL = 1e-4  # of max |logit|
# fp16 (10-bit mantissa) is the precision held to 99.5%; bf16 keeps fp32's range but 7 bits of mantissa, and on
# this network and image set its top-1 agreement measured 98.9% on the CPU (fp16 there: 100%), so bf16 is held to
# 98% and its figure reported.
TOP1_AGREEMENT = {"fp16": 0.995, "bf16": 0.98}


def photo_set(prep, crops_per_photo: int = 30, seed: int = 0) -> np.ndarray:
    """The photographs and random square-ish crops of them through image_to_uint8: (N, 3, S, S) uint8."""
    rng = np.random.default_rng(seed)
    out = []
    for a in photo_arrays().values():
        out.append(image_to_uint8(Image.fromarray(a), prep))
        h, w = a.shape[:2]
        for _ in range(crops_per_photo):
            s = int(rng.integers(min(h, w) // 6, min(h, w)))
            y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
            out.append(image_to_uint8(Image.fromarray(a[y:y + s, x:x + s]), prep))
    return np.stack(out)


def test_graph_replay_equals_eager_fp32_at_every_batch_size(export_dir, record_gpu_figure):
    checkpoint = export_dir.parent / "cifar.safetensors"
    graphs = TorchBackend(checkpoint, "cuda", max_batch=32)
    eager = TorchBackend(checkpoint, "cuda", cuda_graphs=False)
    assert graphs.batch_sizes == (1, 2, 4, 8, 16, 24, 32) and eager.runner is None
    graphs.prepare()
    capture = graphs.runner.capture
    assert sorted(capture.graphs) == list(graphs.batch_sizes)
    images = photo_set(graphs.info.preprocessing, crops_per_photo=4)[:32]  # (32, 3, 32, 32)
    worst, scale = 0.0, 0.0
    for b in list(range(1, 33)) + [5, 1, 32, 17]:
        expected = eager(images[:b])
        got = graphs(images[:b])
        assert got.shape == expected.shape == (b, 10)
        worst, scale = max(worst, float(np.abs(got - expected).max())), max(scale, float(np.abs(expected).max()))
    assert sorted(capture.graphs) == list(graphs.batch_sizes)  # no size captured twice, none added
    reference = OnnxRuntimeBackend(export_dir / "model.onnx", intra_op_threads=1)(images)
    vs_ort = float(np.abs(graphs(images) - reference).max())
    figures = {"max_abs_graph_vs_eager": worst, "logit_scale": scale, "relative": worst / scale,
               "max_abs_graph_vs_onnxruntime_cpu": vs_ort, "buckets": list(graphs.batch_sizes)}
    print(f"CUDA graph vs eager fp32: {figures}")
    record_gpu_figure("graph_vs_eager_fp32", figures)
    assert worst <= GRAPH_VS_EAGER_REL * scale, figures
    assert vs_ort <= 2e-4  # test_serve_gpu.py's fp32 bound against ONNX Runtime on the CPU


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory):
    from ganet.checkpoint import save_checkpoint

    model, data = trained_digits_model()
    path = tmp_path_factory.mktemp("digits") / "digits.safetensors"
    save_checkpoint(path, model, "ga_shufflenet_v2_cifar", labels=data.labels, preprocessing=data.preprocessing,
                    extra={"data": "digits"})
    return path, data.preprocessing


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_keeps_top1(digits_checkpoint, precision, record_gpu_figure):
    path, prep = digits_checkpoint
    images = np.concatenate([photo_set(prep), digits_images(prep, "val").images])
    fp32, spec = load_backend(path, "torch", device="cuda", max_batch=64)
    low, _ = load_backend(path, "torch", device="cuda", max_batch=64, precision=precision)
    assert next(low.model.parameters()).dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    chunks = range(0, len(images), 64)
    a = np.concatenate([fp32(images[i:i + 64]) for i in chunks])
    b = np.concatenate([low(images[i:i + 64]) for i in chunks])
    agreement = float((a.argmax(1) == b.argmax(1)).mean())
    figures = {"images": len(images), "top1_agreement": agreement, "max_abs_logit": float(np.abs(a - b).max()),
               "logit_scale": float(np.abs(a).max())}
    print(f"{precision} vs fp32 (CUDA graphs both): {figures}")
    record_gpu_figure(f"top1_{precision}_vs_fp32", figures)
    assert agreement >= TOP1_AGREEMENT[precision], figures
