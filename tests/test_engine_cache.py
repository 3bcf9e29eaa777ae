"""The GPU image's engine cache (ganet/serve/engine_cache.py) against the CPU stand-in for TensorRT.

TensorRT cannot be installed here, so `tests/stand_in_tensorrt.py` stands in for it (the "engine" runs ONNX Runtime
on the ONNX bytes it was built from): these tests prove the cache's plumbing, keys, checks, lock and atomic
install, not TensorRT. Several tests run real processes on one cache directory (tests/run_with_stand_in.py), as
two containers starting at once on one volume would.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from ganet.export.manifest import FORMAT, FORMAT_VERSION, MANIFEST_FILE, hash_directory, load_manifest
from ganet.preprocess import Preprocessing
from ganet.serve.local import free_port, stop, wait_ready

LAUNCHER = Path(__file__).resolve().parent / "run_with_stand_in.py"
SIZE, CLASSES = 8, 3


def make_tiny_export(root: Path, seed: int = 0, with_engine: dict | None = None) -> Path:
    """An export directory with a real (tiny) ONNX model honouring the export contract: uint8 `image`
    (B, 3, 8, 8) -> float32 `logits` (B, 3), batch axis dynamic; and a manifest written as ganet-export writes one."""
    weights = np.random.default_rng(seed).normal(size=(3, CLASSES)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
         helper.make_node("ReduceMean", ["x", "axes"], ["pooled"], keepdims=0),  # (B, 3)
         helper.make_node("MatMul", ["pooled", "w"], ["logits"])],  # (B, CLASSES)
        "tiny", [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        [helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3]),
         helper.make_tensor("w", TensorProto.FLOAT, weights.shape, weights.ravel())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    export = root / f"export{seed}"
    export.mkdir(parents=True)
    onnx.save(model, export / "model.onnx")
    artifacts = [{"kind": "onnx", "file": "model.onnx", "precision": "fp32"}]
    if with_engine is not None:
        (export / "model.plan").write_bytes(b"a plan from elsewhere")
        artifacts.append({"kind": "tensorrt", "file": "model.plan", "precision": "fp32", **with_engine})
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": "tiny", "num_classes": CLASSES,
                "labels": ["a", "b", "c"], "max_batch": 4, "preprocessing": Preprocessing.for_input_size(SIZE).to_dict(),
                "input": {"name": "image", "dtype": "uint8", "shape": ["batch", 3, SIZE, SIZE],
                          "dynamic_axes": {"0": "batch"}},
                "output": {"name": "logits", "dtype": "float32", "shape": ["batch", CLASSES],
                           "dynamic_axes": {"0": "batch"}},
                "artifacts": artifacts, "files": hash_directory(export)}
    (export / MANIFEST_FILE).write_text(json.dumps(manifest))
    return export


@pytest.fixture
def trt10(stand_in):
    trt, cudart = stand_in("10.7.0")
    return trt


def _env(**changes) -> dict:
    from ganet.export.tensorrt import current_engine_environment

    return {**current_engine_environment(), **changes}


def _images(n: int = 3) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (n, 3, SIZE, SIZE), dtype=np.uint8)


def _reference(export: Path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(export / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": images})[0]


def test_builds_once_then_reuses_and_serves_the_onnx(tmp_path, trt10):
    from ganet.export.tensorrt import TensorRTRunner
    from ganet.serve.engine_cache import ensure_engine

    export, cache = make_tiny_export(tmp_path), tmp_path / "cache"
    first = ensure_engine(load_manifest(export), cache)
    assert first.outcome == "built" and first.reason == "no cached engine"
    assert first.key == f"Stand_in_GPU-sm8.9-trt10.7.0-fp32-b4-{load_manifest(export).files['model.onnx'].sha256[:16]}"
    second = ensure_engine(load_manifest(export), cache)
    assert second.outcome == "reused" and second.plan == first.plan and len(trt10.parsed) == 1
    assert sorted(p.name for p in cache.iterdir()) == sorted([first.key, f"{first.key}.lock",
                                                               "timing-Stand_in_GPU-sm8.9-trt10.7.0.cache"])
    with TensorRTRunner(second.plan, second.info) as runner:  # the cached plan is the export's model, batch 1..4
        assert runner.max_batch == 4
        np.testing.assert_array_equal(runner(_images()), _reference(export, _images()))


def test_key_names_gpu_capability_tensorrt_precision_batch_and_onnx(tmp_path, trt10):
    from ganet.serve.engine_cache import cache_key

    env, sha = _env(), "ab" * 32
    keys = {cache_key(env, sha, "fp32", 4), cache_key(_env(compute_capability="9.0"), sha, "fp32", 4),
            cache_key(_env(tensorrt_version="10.8.0"), sha, "fp32", 4), cache_key(env, "cd" * 32, "fp32", 4),
            cache_key(_env(gpu_name="NVIDIA H100 80GB HBM3"), sha, "fp32", 4), cache_key(env, sha, "fp16", 4),
            cache_key(env, sha, "fp32", 8)}
    assert len(keys) == 7
    assert cache_key(_env(gpu_name="NVIDIA H100 80GB HBM3"), sha, "fp32", 4).startswith("NVIDIA_H100_80GB_HBM3-sm8.9")


@pytest.mark.parametrize("damage, why", [
    (lambda e: (e / "model.plan").write_bytes((e / "model.plan").read_bytes()[:-7]), "corrupt"),  # truncated
    (lambda e: (e / "model.plan").write_bytes(b"X" + (e / "model.plan").read_bytes()[1:]), "corrupt"),  # same size
    (lambda e: (e / "model.plan").unlink(), "corrupt"),
    (lambda e: (e / "engine.json").write_text("{\"key\": "), "corrupt"),
    (lambda e: (e / "engine.json").write_text(json.dumps({**json.loads((e / "engine.json").read_text()),
                                                           "compute_capability": "9.0"})), "foreign"),
    (lambda e: (e / "engine.json").write_text(json.dumps({**json.loads((e / "engine.json").read_text()),
                                                           "tensorrt_version": "10.6.0"})), "foreign"),
    (lambda e: (e / "engine.json").write_text(json.dumps({**json.loads((e / "engine.json").read_text()),
                                                           "onnx_sha256": "0" * 64})), "foreign"),
])
def test_damaged_or_foreign_entry_is_rebuilt_never_served(tmp_path, trt10, damage, why):
    from ganet.serve.engine_cache import ensure_engine

    export, cache = make_tiny_export(tmp_path), tmp_path / "cache"
    built = ensure_engine(load_manifest(export), cache)
    good = (built.plan.read_bytes(), (built.plan.parent / "engine.json").read_text())
    damage(built.plan.parent)
    again = ensure_engine(load_manifest(export), cache)
    assert again.outcome == "built" and again.reason.startswith(f"{why} cached engine"), again.reason
    assert again.plan.read_bytes() == good[0] and len(trt10.parsed) == 2
    record = json.loads((again.plan.parent / "engine.json").read_text())
    assert record["compute_capability"] == "8.9" and record["tensorrt_version"] == "10.7.0"
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # no staging or old entry left


def test_an_entry_copied_from_another_gpu_is_not_served(tmp_path, trt10):
    """An entry built on an sm 9.0 host, copied under this host's key (a hand-copied volume): rebuilt."""
    from ganet.serve.engine_cache import cache_key, ensure_engine

    export, cache = make_tiny_export(tmp_path), tmp_path / "cache"
    other = ensure_engine(load_manifest(export), cache, env=_env(compute_capability="9.0"))
    here = cache_key(_env(), load_manifest(export).files["model.onnx"].sha256, "fp32", 4)
    assert other.key != here
    (cache / here).mkdir()
    for name in ("model.plan", "engine.json"):
        (cache / here / name).write_bytes((other.plan.parent / name).read_bytes())
    got = ensure_engine(load_manifest(export), cache)
    assert got.outcome == "built" and got.reason.startswith("foreign cached engine"), got.reason


def test_onnx_that_differs_from_the_manifest_is_refused(tmp_path, trt10):
    from ganet.serve.engine_cache import EngineCacheError, ensure_engine

    export = make_tiny_export(tmp_path)
    manifest = load_manifest(export)
    (export / "model.onnx").write_bytes(make_tiny_export(tmp_path, seed=1).joinpath("model.onnx").read_bytes())
    with pytest.raises(EngineCacheError, match="model.onnx: its SHA-256 .* is not the one the manifest records"):
        ensure_engine(manifest, tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_the_exports_own_engine_is_used_only_when_it_fits(tmp_path, trt10):
    from ganet.serve.engine_cache import engine_for_host

    fits = make_tiny_export(tmp_path, 0, with_engine={"tensorrt_version": "10.7.0", "compute_capability": "8.9"})
    own = engine_for_host(load_manifest(fits), tmp_path / "cache")
    assert own.outcome == "export" and own.plan == fits / "model.plan" and trt10.parsed == []
    foreign = make_tiny_export(tmp_path, 1, with_engine={"tensorrt_version": "10.7.0", "compute_capability": "9.0"})
    built = engine_for_host(load_manifest(foreign), tmp_path / "cache")
    assert built.outcome == "built" and built.plan.parent.parent == tmp_path / "cache"


def _launch(*args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(LAUNCHER), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **env})


def _events(stderr: str) -> list[dict]:
    out = []
    for line in stderr.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("event") == "engine_cache":
            out.append(entry)
    return out


def test_two_processes_starting_at_once_build_once_and_tear_nothing(tmp_path):
    """Two real processes on one cache, each build taking 2 s: one builds, the other waits on the lock and then
    reuses the very same engine; the plan on disk is whole and matches its record; nothing temporary is left."""
    export, cache = make_tiny_export(tmp_path), tmp_path / "cache"
    procs = [_launch("ensure", str(export), str(cache), STAND_IN_BUILD_S="2") for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append((json.loads(out.strip().splitlines()[-1]), _events(err)))
    outcomes = sorted(r["outcome"] for r, _ in results)
    assert outcomes == ["built", "reused"], results
    waited = [events for r, events in results if r["outcome"] == "reused"][0]
    assert waited[0]["outcome"] == "waiting", waited  # it really started while the other was building
    (key,) = {r["key"] for r, _ in results}
    record = json.loads((cache / key / "engine.json").read_text())
    from ganet.export.manifest import sha256_file

    assert sha256_file(cache / key / "model.plan") == record["plan_sha256"]
    assert json.loads((cache / key / "model.plan").read_bytes())["shapes"][2][0] == 4  # a whole stand-in plan
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".")) == []


def test_ganet_serve_builds_at_start_then_reuses(tmp_path):
    """ganet-serve with --engine-cache on an export without an engine: the log says built, readiness comes after
    the build, answers equal the ONNX model's; the next start says reused and builds nothing."""
    import urllib.request

    export, cache = make_tiny_export(tmp_path), tmp_path / "cache"
    pixels = _images(1)
    expected = _reference(export, pixels)[0]
    for round_, outcome in enumerate(("built", "reused")):
        port = free_port()
        proc = _launch("serve", str(export), "--engine-cache", str(cache), "--port", str(port), "--no-warmup",
                       STAND_IN_BUILD_S="1")
        try:
            start = time.monotonic()
            wait_ready(f"http://127.0.0.1:{port}/v2/health/ready", proc, timeout_s=60)
            ready_s = time.monotonic() - start
            body = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": list(pixels.shape),
                                           "data": pixels.ravel().tolist()}]}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/tiny/infer", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as r:
                answer = json.loads(r.read())
        finally:
            assert stop(proc) in (0, -15)
        logs = proc.stderr.read()
        events = [e["outcome"] for e in _events(logs)]
        assert events[-1] == outcome, logs[-3000:]
        backend = [json.loads(line) for line in logs.splitlines() if '"event": "backend"' in line]
        assert backend[0]["backend"] == "tensorrt" and "engine cache" in backend[0]["reason"]
        np.testing.assert_allclose(answer["outputs"][0]["data"], expected, rtol=1e-6)
        if round_ == 0:
            assert ready_s >= 1.0  # readiness waited for the (1 s) build
