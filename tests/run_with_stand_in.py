"""Run ``ganet-serve`` (or the engine cache alone) in a real process with the CPU stand-in for TensorRT installed.

The ``stand_in`` fixture patches one test process; the engine cache is about several processes (containers) on one
cache directory, so each of those processes installs the stand-in itself, through this launcher:

    python tests/run_with_stand_in.py serve EXPORT --engine-cache DIR ...     # ganet-serve's arguments
    python tests/run_with_stand_in.py ensure EXPORT DIR                       # ensure_engine, prints a JSON line

STAND_IN_TRT_VERSION (default 10.7.0) and STAND_IN_SM ("8.9") pick the "host"; STAND_IN_BUILD_S makes each engine
build take that long, so that two processes started together really overlap.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stand_in_tensorrt import fake_cudart, fake_tensorrt  # noqa: E402


def install() -> None:
    cudart = fake_cudart()
    major, minor = os.environ.get("STAND_IN_SM", "8.9").split(".")
    props = cudart.cudaGetDeviceProperties(0)[1]
    props.major, props.minor = int(major), int(minor)
    cudart.cudaGetDeviceProperties = lambda device: (0, props)
    cudart.cudaMemGetInfo = lambda: (0, 1 << 30, 2 << 30)  # the /metrics GPU gauge
    trt = fake_tensorrt(os.environ.get("STAND_IN_TRT_VERSION", "10.7.0"), cudart)  # enqueues go to its streams
    build_s = float(os.environ.get("STAND_IN_BUILD_S", "0"))
    if build_s:
        build = trt.Builder.build_serialized_network

        def slow_build(self, network, config):
            time.sleep(build_s)
            return build(self, network, config)
        trt.Builder.build_serialized_network = slow_build
    cuda, bindings = ModuleType("cuda"), ModuleType("cuda.bindings")
    cuda.bindings, bindings.runtime = bindings, cudart
    sys.modules.update({"cuda": cuda, "cuda.bindings": bindings, "cuda.bindings.runtime": cudart,
                        "tensorrt": trt, "pynvml": None})


def main(argv: list[str]) -> int:
    install()
    if argv[:1] == ["serve"]:
        from ganet.serve.cli import main as serve

        return serve(argv[1:])
    if argv[:1] == ["ensure"] and len(argv) == 3:
        from ganet.export.manifest import load_manifest
        from ganet.serve.engine_cache import ensure_engine
        from ganet.serve.logs import configure_logging

        configure_logging("info")
        engine = ensure_engine(load_manifest(argv[1]), argv[2])
        print(json.dumps({"outcome": engine.outcome, "key": engine.key, "plan": str(engine.plan),
                          "reason": engine.reason}), flush=True)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
