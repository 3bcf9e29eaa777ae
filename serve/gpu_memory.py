"""GPU memory for the ``ganet_gpu_memory_bytes`` gauge where the backend itself has no way to ask.

ONNX Runtime's CUDA execution provider exposes no memory query to Python, so that backend reads the device's used
memory through NVML (``pip install nvidia-ml-py``; the driver ships libnvidia-ml). Device-wide, like the TensorRT
backend's ``cudaMemGetInfo``: NVML's per-process numbers carry host PIDs, which a container cannot match.
"""
from __future__ import annotations

import logging
from typing import Callable

__all__ = ["nvml_device_memory"]

log = logging.getLogger("ganet.serve")


def nvml_device_memory(device_index: int = 0) -> Callable[[], float] | None:
    """A function returning the used memory of GPU ``device_index`` in bytes, or None (logged) without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
    except Exception as e:  # ImportError, or NVMLError when there is no driver
        log.info("no GPU memory metric: %s (pip install nvidia-ml-py)", e, extra={"event": "gpu_memory"})
        return None
    return lambda: float(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
