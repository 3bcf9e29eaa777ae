"""Fixed batch sizes for runtimes that replay a recorded forward pass (CUDA graphs): which sizes to record, and a
runner that pads each batch up to the next recorded size and returns only the real rows.

A CUDA graph replays the kernels it recorded, shapes and addresses included, so a backend records one graph per
batch size into static buffers. This module is the bookkeeping around that, in NumPy only, so that it is tested
on the CPU: what a backend supplies is ``capture(n)``, which records (or just prepares) the forward for exactly
``n`` images and returns a function that runs it. ``ganet.serve.torch_graphs`` (PyTorch), ``ganet.serve.trt_graphs``
(TensorRT) and ``ganet.serve.ort_graphs`` (ONNX Runtime) supply theirs.

    runner = BucketedRunner(capture, bucket_sizes(256), sample_shape=(3, 224, 224))
    runner.capture_all()             # before serving: every size recorded once, largest first
    logits = runner(images)          # (B, 3, 224, 224) uint8, 1 <= B <= 256 -> (B, num_classes) float32
"""
from __future__ import annotations

import bisect
from collections.abc import Callable

import numpy as np

__all__ = ["bucket_sizes", "BucketedRunner", "Replay", "Capture"]

Replay = Callable[[np.ndarray], np.ndarray]  # exactly n rows (n, *sample) -> (n, num_classes); may reuse its output
Capture = Callable[[int], Replay]  # n -> the replay for batch size n (called once per size)

# Below this many images a replay costs about the same whatever the batch: each of the network's ~650 kernels is a
# few microseconds of launch and latency, not of arithmetic. So padding 5 rows to 8 is nearly free, and doubling
# keeps the recorded graphs few.
DOUBLING_UP_TO = 16
# Above it the GPU time grows with the rows; steps of 1.5x bound the padded share of a call to a third (powers of two
# alone waste up to half: 129 images padded to 256).
STEP = 1.5


def bucket_sizes(max_batch: int) -> tuple[int, ...]:
    """The batch sizes to record for ``max_batch``: 1, 2, 4, 8, 16, then 24, 32, 48, 64, 96, 128, 192, 256, ... (each
    1.5x or 4/3x the last, all multiples of 8), and ``max_batch`` itself as the largest."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes, n = [], 1
    while n < DOUBLING_UP_TO:
        sizes.append(n)
        n *= 2
    pow2 = DOUBLING_UP_TO
    while n < max_batch * 2:  # 16, 24, 32, 48, 64, 96, ...: the powers of two and 1.5x each
        sizes.append(n)
        n = int(pow2 * STEP) if n == pow2 else (pow2 := pow2 * 2)
    return tuple(s for s in sizes if s < max_batch) + (max_batch,)


class BucketedRunner:
    """``runner(images)`` -> logits, through the replay recorded for the smallest bucket that holds the batch.

    The images are copied into the first rows of one host buffer (``host_buffer(shape, dtype)``, e.g. page-locked
    memory for fast copies to the GPU; default ``np.zeros``); the rows after them, up to the bucket, are zeros (rows
    that held images in an earlier call are cleared), and their outputs are dropped. Each size is captured once,
    on first use or in :meth:`capture_all`. Not thread-safe: one runner per inference thread.
    """

    def __init__(self, capture: Capture, sizes: tuple[int, ...] | list[int], sample_shape: tuple[int, ...],
                 dtype: np.dtype | type = np.uint8,
                 host_buffer: Callable[[tuple[int, ...], np.dtype], np.ndarray] | None = None) -> None:
        if not sizes or min(sizes) < 1:
            raise ValueError(f"bucket sizes must be positive integers, got {sizes!r}")
        self.sizes = tuple(sorted(set(int(s) for s in sizes)))
        self.sample_shape, self.dtype = tuple(sample_shape), np.dtype(dtype)
        self.capture = capture
        self.replays: dict[int, Replay] = {}  # size -> its replay, in the order they were captured
        self._host = (host_buffer or (lambda shape, dt: np.zeros(shape, dt)))((self.max_batch, *self.sample_shape),
                                                                             self.dtype)
        self._host[:] = 0
        self._filled = 0  # rows of the host buffer holding images of the last call; every row after them is zero

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def bucket(self, batch: int) -> int:
        """The smallest size >= ``batch``."""
        if not 1 <= batch <= self.max_batch:
            raise ValueError(f"batch size {batch} is outside 1..{self.max_batch}")
        return self.sizes[bisect.bisect_left(self.sizes, batch)]

    def replay(self, n: int) -> Replay:
        """The replay for bucket ``n``, captured now if it has not been."""
        if n not in self.replays:
            self.replays[n] = self.capture(n)
        return self.replays[n]

    def capture_all(self) -> None:
        """Capture every size, largest first (a graph memory pool shared by all then needs no more than the largest
        graph's memory: each smaller capture reuses blocks the larger one freed)."""
        for n in reversed(self.sizes):
            self.replay(n)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if images.dtype != self.dtype or tuple(images.shape[1:]) != self.sample_shape or images.ndim != 1 + len(
                self.sample_shape):
            raise ValueError(f"expected {self.dtype} images of shape (B, {', '.join(map(str, self.sample_shape))}), "
                             f"got {images.dtype} {tuple(images.shape)}")
        batch = len(images)
        n = self.bucket(batch)
        host = self._host
        host[:batch] = images
        if self._filled > batch:
            host[batch:self._filled] = 0
        self._filled = batch
        out = self.replay(n)(host[:n])
        if len(out) != n:
            raise RuntimeError(f"the replay for batch size {n} returned {len(out)} rows")
        return np.array(out[:batch], dtype=np.float32)  # a copy: the replay's output buffer is reused
