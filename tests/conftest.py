import logging
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


@pytest.fixture(autouse=True)
def _service_loggers_restored():
    """A test that starts the service in-process gets its JSON logging (handlers replaced, propagation off); put the
    loggers back afterwards so that later tests' ``caplog`` sees their records."""
    loggers = [logging.getLogger(n) for n in ("ganet.serve", "uvicorn", "uvicorn.error", "uvicorn.access")]
    saved = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    yield
    for lg, (handlers, level, propagate) in zip(loggers, saved):
        lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate


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


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`ganet-demo` run once per session (the README's first command): the embedded default trained, exported,
    served. ``.output`` holds ``best.safetensors`` (the default checkpoint) and ``export/``; ``.result`` is the
    finished process, ``.elapsed_s`` its wall time. tests/test_preprocess_and_cli.py checks the run; other tests
    reuse its checkpoint instead of training another."""
    import subprocess
    import time
    from types import SimpleNamespace

    output = tmp_path_factory.mktemp("demo")
    t0 = time.monotonic()
    result = subprocess.run(["ganet-demo", "--output", str(output)], capture_output=True, text=True, timeout=900)
    return SimpleNamespace(output=output, result=result, elapsed_s=time.monotonic() - t0)


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
