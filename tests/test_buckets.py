"""Batch buckets (ganet.buckets): which sizes are recorded, and the runner that pads to them -- with a recording fake
capture, then with the real torch forward run eagerly on the CPU (the CUDA graph capture itself: test_serve_gpu_graphs.py).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ganet.buckets import BucketedRunner, bucket_sizes
from ganet.preprocess import Preprocessing, image_to_uint8
from ganet.serve.torch_graphs import TorchForward, convert_model, eager_capture

from test_serve import calibrate_batchnorm, photos


def test_bucket_sizes_double_to_16_then_step_by_half_and_end_at_max_batch():
    assert bucket_sizes(256) == (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
    assert bucket_sizes(8) == (1, 2, 4, 8)
    assert bucket_sizes(1) == (1,)
    assert bucket_sizes(100) == (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 100)
    assert bucket_sizes(20) == (1, 2, 4, 8, 16, 20)
    for m in range(1, 600):  # padding never exceeds a third of a call above 16, half below
        sizes = bucket_sizes(m)
        assert sizes[-1] == m and list(sizes) == sorted(set(sizes))
        assert all(b / a <= (2 if a < 16 else 1.5) for a, b in zip(sizes, sizes[1:]))
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        bucket_sizes(0)


class RecordingCapture:
    """capture(n) that records each capture and the exact rows each replay receives; logits = per-row sums."""

    def __init__(self) -> None:
        self.captured: list[int] = []
        self.seen: list[np.ndarray] = []

    def __call__(self, n: int):
        self.captured.append(n)
        out = np.full((n, 2), np.nan, np.float32)  # a reused output buffer, as a graph's static output is

        def replay(rows: np.ndarray) -> np.ndarray:
            assert rows.shape[0] == n
            self.seen.append(rows.copy())
            out[:, 0] = rows.reshape(n, -1).sum(1)
            out[:, 1] = n
            return out
        return replay


def test_runner_pads_to_the_bucket_returns_only_real_rows_and_captures_each_size_once():
    fake = RecordingCapture()
    runner = BucketedRunner(fake, bucket_sizes(8), (2, 3))
    rng = np.random.default_rng(0)
    calls = [5, 8, 3, 1, 5, 2, 7]
    for b in calls:
        images = rng.integers(1, 256, (b, 2, 3), dtype=np.uint8)  # never zero: padded rows are recognisable
        out = runner(images)
        n = runner.bucket(b)
        assert out.shape == (b, 2) and out.dtype == np.float32
        np.testing.assert_array_equal(out[:, 0], images.reshape(b, -1).sum(1))  # the real rows, in order
        assert (out[:, 1] == n).all()  # ... through the bucket's replay
        rows = fake.seen[-1]
        assert rows.shape[0] == n and np.array_equal(rows[:b], images)
        assert not rows[b:].any()  # padded rows are zeros, also after a larger batch filled them
    assert fake.captured == [8, 4, 1, 2]  # on first use, once each
    assert [runner.bucket(b) for b in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    out = runner(np.ones((3, 2, 3), np.uint8))
    out[:] = -1  # the caller owns its answer: the next call does not change it
    runner(np.ones((4, 2, 3), np.uint8))
    assert (out == -1).all()


def test_runner_capture_all_goes_largest_first_and_refuses_bad_batches():
    fake = RecordingCapture()
    runner = BucketedRunner(fake, [8, 1, 4, 2, 4], (3,))
    assert runner.sizes == (1, 2, 4, 8) and runner.max_batch == 8
    runner.capture_all()
    runner.capture_all()
    assert fake.captured == [8, 4, 2, 1]
    with pytest.raises(ValueError, match="batch size 9 is outside 1..8"):
        runner(np.zeros((9, 3), np.uint8))
    with pytest.raises(ValueError, match="batch size 0"):
        runner(np.zeros((0, 3), np.uint8))
    with pytest.raises(ValueError, match=r"expected uint8 images of shape \(B, 3\), got float32"):
        runner(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"got uint8 \(2, 4\)"):
        runner(np.zeros((2, 4), np.uint8))
    with pytest.raises(ValueError, match="positive"):
        BucketedRunner(fake, [], (3,))
    broken = BucketedRunner(lambda n: (lambda rows: np.zeros((n - 1, 2), np.float32)), [4], (3,))
    with pytest.raises(RuntimeError, match="returned 3 rows"):
        broken(np.zeros((2, 3), np.uint8))


@pytest.fixture(scope="module")
def cifar_model():
    """test_serve's untrained BN-calibrated ga_shufflenet_v2_cifar (answers depend on the image) and 5 photos."""
    from ganet.models import create_model

    torch.manual_seed(0)
    model = create_model("ga_shufflenet_v2_cifar", num_classes=10)
    calibrate_batchnorm(model)
    prep = Preprocessing.for_input_size(32)
    images = np.stack([image_to_uint8(img, prep) for img in photos().values()])  # (5, 3, 32, 32)
    return model, prep, images


def test_bucketed_eager_forward_equals_the_unpadded_forward(cifar_model):
    """Real torch on the CPU through the runner: every batch size gives what the unpadded batch gives."""
    model, prep, images = cifar_model
    forward = TorchForward(copy.deepcopy(model), prep, "cpu")
    calls = []
    capture = eager_capture(forward)
    runner = BucketedRunner(lambda n: calls.append(n) or capture(n), bucket_sizes(8), images.shape[1:])
    batch = np.concatenate([images, images[::-1]])  # 10 images, the photos twice
    for b in (1, 3, 8):
        expected = forward(torch.from_numpy(batch[:b])).numpy()
        got = runner(batch[:b])
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert sorted(calls) == [1, 4, 8]
    assert np.abs(expected).max() > 1 and len(set(expected.argmax(1))) > 1  # answers that depend on the image


def test_convert_model_keeps_batchnorm_fp32_and_the_ga_maps_in_fp32(cifar_model):
    model = convert_model(copy.deepcopy(cifar_model[0]), "bf16", channels_last=True)
    kinds = {(type(m).__name__, p.dtype) for m in model.modules() for p in m.parameters(recurse=False)}
    assert ("BatchNorm2d", torch.float32) in kinds and ("Conv2d", torch.bfloat16) in kinds
    assert not any(name == "BatchNorm2d" and dtype != torch.float32 for name, dtype in kinds)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="precision must be one of fp32, fp16, bf16"):
        convert_model(model, "int4", False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_group_attention_in_half_precision_computes_its_maps_in_fp32(dtype):
    """Attention logits of ~3000 over 32x32 pixels: the root of their sum of squares (~1e5) is past fp16's largest
    value (65504), so a normalisation computed in fp16 divides by inf. The block in fp16/bf16 must stay as close to
    fp32 (on the same rounded input) as rounding allows; that needs its small maps computed in fp32 (bf16 has
    fp32's range: there the fp32 maps buy precision, not range)."""
    from ganet.layers import GroupAttention

    torch.manual_seed(0)
    block = GroupAttention(30, groups=15).eval()
    with torch.no_grad():
        block.alpha.fill_(1.0)  # the pairwise term on (it starts at 0)
        for conv in (block.u4u_conv, block.pool_conv, block.assign_conv):
            conv.weight.mul_(2000)
        x = torch.randn(2, 30, 32, 32) * 2
        half = copy.deepcopy(block).to(dtype)
        logits = torch.matmul(half._group_weights(), x.to(dtype).reshape(2, 30, -1)).float()  # the maps' start
        assert logits.norm(dim=-1).max() > 65504 and logits.abs().max() < 65504
        expected = block(x.to(dtype).float())  # fp32 on the same rounded input
        got = half(x.to(dtype)).float()
        assert torch.isfinite(got).all()
        rel = ((got - expected).abs().max() / expected.abs().max()).item()
        assert rel < (1e-2 if dtype == torch.float16 else 5e-2), rel
