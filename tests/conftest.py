import sys

import pytest
import torch

from stand_in_tensorrt import fake_cudart, fake_tensorrt


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def stand_in(monkeypatch):
    """Install the stand-ins as `tensorrt` and `cuda.bindings.runtime`; returns a function choosing the version."""
    from types import ModuleType

    cudart = fake_cudart()
    cuda, bindings = ModuleType("cuda"), ModuleType("cuda.bindings")
    cuda.bindings, bindings.runtime = bindings, cudart
    for name, module in (("cuda", cuda), ("cuda.bindings", bindings), ("cuda.bindings.runtime", cudart)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # the driver version then comes from the CUDA driver API

    def install(version: str):
        trt = fake_tensorrt(version, cudart)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        return trt, cudart
    return install


@pytest.fixture
def record_gpu_figure():
    """Figures for benchmarks/gpu_checks.sh's results folder: appended to $GANET_GPU_FIGURES (JSON lines) if set."""
    import json
    import os

    def record(name: str, figures: dict) -> None:
        path = os.environ.get("GANET_GPU_FIGURES")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps({"name": name, **figures}) + "\n")
    return record
