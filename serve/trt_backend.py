"""The TensorRT backend: a thin wrapper over ``ganet.export.tensorrt.TensorRTRunner``. GPU-only; no torch."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from ganet.export.tensorrt import TensorRTRunner

__all__ = ["TensorRTBackend"]


class TensorRTBackend:
    name = "tensorrt"
    device = "cuda"

    def __init__(self, plan_path: str | os.PathLike, engine_info: dict[str, Any]) -> None:
        self.runner = TensorRTRunner(plan_path, engine_info)  # refuses a foreign engine (EngineMismatchError)
        self.max_batch = self.runner.max_batch

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.runner(images)

    def gpu_memory_bytes(self) -> float:
        free, total = self.runner._cudart.cudaMemGetInfo()[1:]
        return float(total - free)

    def close(self) -> None:
        self.runner.close()
