"""ganet-serve on a CUDA GPU (skipped without one): the torch backend on cuda gives the export's fp32 answers,
alone and in a batch, and the service reports GPU memory, both from PyTorch and from the driver through NVML.

The export is test_serve.py's: an untrained, BN-calibrated ga_shufflenet_v2_cifar (10 CIFAR labels, 32x32).
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from ganet.preprocess import image_to_uint8
from ganet.serve.backends import OnnxRuntimeBackend, load_backend
from ganet.serve.routes_classify import softmax

from real_images import encode
from test_serve import export_dir, make_client, photos, reference, scores_by_index  # noqa: F401 (fixtures)

pytestmark = pytest.mark.gpu

# PyTorch fp32 on the CPU is ~7e-5 from its own fp64 evaluation on these photographs (test_serve.py), so two
# correct fp32 runtimes may differ by twice that. TF32 convolutions (cuDNN's default) land ~1e-3 away: not fp32.
FP32_ATOL = 2e-4


def test_torch_on_cuda_gives_the_exports_fp32_answers_alone_and_batched(export_dir):
    checkpoint = export_dir.parent / "cifar.safetensors"
    gpu, spec = load_backend(checkpoint, "torch", device="cuda")
    assert gpu.device == "cuda" and next(gpu.model.parameters()).is_cuda
    cpu_ort = OnnxRuntimeBackend(export_dir / "model.onnx", intra_op_threads=1)
    imgs = np.stack([image_to_uint8(img, spec.preprocessing) for img in photos().values()])  # (5, 3, 32, 32)
    batch = np.concatenate([imgs, imgs[:3]])  # 8 = the export's max batch
    batched = gpu(batch)[:5]
    alone = np.concatenate([gpu(imgs[i:i + 1]) for i in range(len(imgs))])
    expected = cpu_ort(imgs)
    print(f"cuda vs ORT CPU: max |d| {np.abs(batched - expected).max():.2e}; alone vs batched "
          f"{np.abs(batched - alone).max():.2e}; logits up to {np.abs(expected).max():.1f}")
    np.testing.assert_allclose(batched, expected, rtol=0, atol=FP32_ATOL)
    np.testing.assert_allclose(alone, expected, rtol=0, atol=FP32_ATOL)
    # cuDNN may pick another algorithm per batch size: equal to rounding, the same ranking.
    np.testing.assert_allclose(batched, alone, rtol=0, atol=FP32_ATOL)
    assert (batched.argmax(1) == alone.argmax(1)).all()
    assert gpu.gpu_memory_bytes() > 0


def test_service_on_cuda_classifies_and_reports_gpu_memory(export_dir, reference):
    jpegs = [encode(img, "JPEG") for img in photos().values()]
    with make_client(export_dir, backend="torch", device="cuda", max_delay_us=2000) as client:
        assert client.get("/v2/health/ready").status_code == 200
        one = client.post("/classify", files={"file": ("a.jpg", jpegs[0], "image/jpeg")}, params={"top_k": 10})
        assert one.status_code == 200, one.text
        expected = softmax(reference(jpegs[0]))
        np.testing.assert_allclose(scores_by_index(one.json()), expected, rtol=0, atol=1e-4)
        many = client.post("/classify", files=[("file", (f"{i}.jpg", j, "image/jpeg")) for i, j in enumerate(jpegs)],
                           params={"top_k": 10})
        assert many.status_code == 200, many.text
        for body, jpeg in zip(many.json()["results"], jpegs):
            np.testing.assert_allclose(scores_by_index(body), softmax(reference(jpeg)), rtol=0, atol=1e-4)
        metrics = client.get("/metrics").text
    (used,) = re.findall(r"^ganet_gpu_memory_bytes (\S+)$", metrics, re.M)
    assert float(used) > 0  # the model's weights at least


def test_nvml_reads_the_drivers_memory():
    """The ONNX Runtime CUDA backend's gauge (gpu_memory.py) against the real driver: a 1 GiB allocation shows."""
    pytest.importorskip("pynvml")
    from ganet.serve.gpu_memory import nvml_device_memory

    read = nvml_device_memory(torch.cuda.current_device())
    assert read is not None
    torch.cuda.synchronize()
    before = read()
    block = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    after = read()
    del block
    free, total = torch.cuda.mem_get_info()
    print(f"NVML used {before / 2**20:.0f} -> {after / 2**20:.0f} MiB; cudaMemGetInfo used "
          f"{(total - free) / 2**20:.0f} MiB of {total / 2**20:.0f}")
    assert 0 < before < total and after - before >= 0.95 * 2**30


@pytest.mark.slow
def test_frontends_are_the_default_on_cuda_and_answer_like_the_cpu(export_dir, reference):
    """A real `ganet-serve --backend torch --device cuda` process: with no --frontends it runs N HTTP front ends
    feeding one model owner (the GPU default), answers as the CPU reference does, and /metrics carries the owner's
    GPU memory through the multiprocess files."""
    import json

    import httpx

    from test_serve_http import start_server, stop

    jpegs = [encode(img, "JPEG") for img in photos().values()]
    proc, url = start_server(export_dir, "--backend", "torch", "--device", "cuda")
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            for jpeg in jpegs:
                r = c.post("/classify", files={"file": ("a.jpg", jpeg, "image/jpeg")}, params={"top_k": 10})
                assert r.status_code == 200, r.text
                np.testing.assert_allclose(scores_by_index(r.json()), softmax(reference(jpeg)), rtol=0, atol=1e-4)
            metrics = c.get("/metrics").text
    finally:
        log = stop(proc)
    (setup,) = [json.loads(line) for line in log.splitlines() if '"event": "frontends"' in line]
    assert 2 <= setup["frontends"] <= 8
    (used,) = re.findall(r"^ganet_gpu_memory_bytes (\S+)$", metrics, re.M)
    assert float(used) > 0
