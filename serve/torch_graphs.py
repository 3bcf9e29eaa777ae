"""The torch backend's forward pass: precision, memory layout, and CUDA graphs recorded once per batch bucket.

* ``TorchForward``: uint8 images on the device -> float32 logits: the normalisation of the exported graph, then the
  model in fp32, or in a converted fp16/bf16 copy (``convert_model``: BatchNorm keeps fp32 parameters, and the GA
  blocks compute their normalisation, sigmoid and softmax in fp32, as the export's fp16 islands do), channels_last
  on CUDA, where cuDNN's fastest convolutions want it.
* ``CudaGraphCapture``: ``capture(n)`` for ``ganet.buckets.BucketedRunner``: records ``TorchForward`` at batch size
  ``n`` into a ``torch.cuda.CUDAGraph`` reading a static device input and writing a static output, all sizes in one
  memory pool, on a stream of its own. The only code here that needs a GPU (tests/test_serve_gpu_graphs.py).
* ``eager_capture``: the same ``capture(n)`` contract run eagerly, for the CPU: the bucketing tests and the CPU run of
  benchmarks/bench_gpu_model.py go through it.
"""
from __future__ import annotations

import numpy as np
import torch

from ganet.buckets import Replay
from ganet.preprocess import Preprocessing, normalize_constants, normalize_uint8

__all__ = ["PRECISIONS", "convert_model", "TorchForward", "CudaGraphCapture", "eager_capture"]

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WARMUP_RUNS = 2  # eager runs before each capture: cuDNN's autotuning and lazy initialisation stay out of the graph


def convert_model(model: torch.nn.Module, precision: str, channels_last: bool) -> torch.nn.Module:
    """``model`` (in place) in ``precision``, BatchNorm parameters and statistics kept in fp32 (PyTorch's BatchNorm
    takes fp16/bf16 inputs with fp32 parameters), optionally channels_last."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "fp32":
        model.to(PRECISIONS[precision])
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.float()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model.eval()


class TorchForward:
    """``forward(images)``: (B, 3, S, S) uint8 on the model's device -> (B, num_classes) float32, no autograd."""

    def __init__(self, model: torch.nn.Module, prep: Preprocessing, device: str, precision: str = "fp32",
                 channels_last: bool = False) -> None:
        self.model = convert_model(model, precision, channels_last)
        self.prep, self.precision, self.dtype = prep, precision, PRECISIONS[precision]
        self.memory_format = torch.channels_last if channels_last else torch.preserve_format
        self.constants = normalize_constants(prep, torch.empty(0, device=device))  # fp32: the normalisation is fp32

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = normalize_uint8(images, self.prep, self.constants)  # (B, 3, S, S) float32
            x = x.to(dtype=self.dtype, memory_format=self.memory_format)
            return self.model(x).float()


def eager_capture(forward: TorchForward, device: str = "cpu"):
    """``capture(n)`` that records nothing: each replay runs ``forward`` on its n rows (the CPU twin of
    :class:`CudaGraphCapture`, for tests and benchmarks)."""
    def capture(n: int) -> Replay:
        def replay(rows: np.ndarray) -> np.ndarray:
            return forward(torch.from_numpy(rows).to(device)).cpu().numpy()
        return replay
    return capture


class CudaGraphCapture:
    """``capture(n)``: ``forward`` recorded at batch size ``n`` in a CUDA graph. Every graph reads the first ``n``
    rows of one static device input, filled from one page-locked host buffer (:meth:`host_buffer`, which the
    runner's padding writes into), and its output is copied into one page-locked host output.

    All graphs share one memory pool (captured largest first, a smaller graph's activations fit in the blocks the
    largest freed). That is safe because the runner replays one graph at a time and copies its output out before
    the next replay: graphs may overwrite each other's intermediates and outputs, never while one is in use.
    """

    def __init__(self, forward: TorchForward, max_batch: int, sample_shape: tuple[int, ...], device: str) -> None:
        self.forward, self.device = forward, torch.device(device)
        self.stream = torch.cuda.Stream(self.device)  # ours alone: copies and replays do not queue behind others
        self.static_in = torch.zeros((max_batch, *sample_shape), dtype=torch.uint8, device=self.device)
        self.host_in = torch.zeros((max_batch, *sample_shape), dtype=torch.uint8, pin_memory=True)
        self.host_out: torch.Tensor | None = None  # (max_batch, num_classes), once the first capture knows C
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # cuDNN picks the fastest algorithm per shape during the warm-up runs; the graph keeps that choice.
        torch.backends.cudnn.benchmark = True

    def host_buffer(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """The runner's host buffer: a NumPy view of the page-locked input."""
        if tuple(shape) != tuple(self.host_in.shape) or np.dtype(dtype) != np.uint8:
            raise ValueError(f"host buffer {shape} {dtype} does not match the static input {tuple(self.host_in.shape)}")
        return self.host_in.numpy()

    def __call__(self, n: int) -> Replay:
        x = self.static_in[:n]  # (n, 3, S, S): a prefix, same address for every size
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            for _ in range(WARMUP_RUNS):
                self.forward(x)
        self.stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA calls (the GPU JPEG decoder's, say) neither break nor are refused by
        # this capture.
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
            out = self.forward(x)  # (n, C) float32, in the graph's pool
        if self.host_out is None:
            self.host_out = torch.empty((len(self.static_in), out.shape[1]), dtype=torch.float32, pin_memory=True)
        self.graphs[n] = graph
        host_in, host_out, stream = self.host_in[:n], self.host_out[:n], self.stream

        def replay(rows: np.ndarray) -> np.ndarray:
            if rows.ctypes.data != host_in.data_ptr() or len(rows) != n:
                raise ValueError("replay expects the first n rows of host_buffer()")
            with torch.cuda.stream(stream):
                x.copy_(host_in, non_blocking=True)
                graph.replay()
                host_out.copy_(out, non_blocking=True)
            stream.synchronize()
            return host_out.numpy()
        replay(self.host_in[:n].numpy())  # once, so that a broken graph fails here, before serving
        return replay
