"""The TensorRT backend: a thin wrapper over ``ganet.export.tensorrt.TensorRTRunner``. GPU-only; no torch.

With ``cuda_graphs`` (the default) each batch bucket's enqueue is recorded in a CUDA graph
(``ganet.serve.trt_graphs``) and batches are padded to their bucket; a bucket TensorRT cannot capture keeps plain
``execute_async_v3``. Without, the engine runs each batch at its own size (the engine's profile is dynamic).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from ganet.export.tensorrt import TensorRTRunner

__all__ = ["TensorRTBackend"]


class TensorRTBackend:
    name = "tensorrt"
    device = "cuda"

    def __init__(self, plan_path: str | os.PathLike, engine_info: dict[str, Any], *, cuda_graphs: bool = True,
                 max_batch: int | None = None) -> None:
        self.runner = TensorRTRunner(plan_path, engine_info)  # refuses a foreign engine (EngineMismatchError)
        self.max_batch = min(max_batch or self.runner.max_batch, self.runner.max_batch)
        self.graphs = None
        if cuda_graphs:
            from ganet.buckets import bucket_sizes
            from ganet.serve.trt_graphs import TensorRTGraphs

            self.graphs = TensorRTGraphs(self.runner, bucket_sizes(self.max_batch))

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return self.graphs.sizes if self.graphs is not None else ()

    def prepare(self) -> None:
        """Record every bucket's graph now, largest first."""
        if self.graphs is not None:
            self.graphs.bucketed.capture_all()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.graphs(images) if self.graphs is not None else self.runner(images)

    def gpu_memory_bytes(self) -> float:
        free, total = self.runner.cudart.cudaMemGetInfo()[1:]
        return float(total - free)

    def close(self) -> None:
        if self.graphs is not None:
            self.graphs.close()
        self.runner.close()
