"""The TensorRT backend's CUDA graphs (ganet.serve.trt_graphs) with the stand-in TensorRT and CUDA runtime
(tests/stand_in_tensorrt.py: ONNX Runtime as the engine, stream capture as the CUDA runtime documents it). TensorRT
itself cannot be installed here; the real library runs in the gpu tests of test_export_trt_triton.py.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest

from ganet.export.tensorrt import build_engine
from ganet.serve.trt_backend import TensorRTBackend

from test_export_trt_triton import _classifier_onnx, _ort


@pytest.fixture
def engine(stand_in, tmp_path):
    """A stand-in engine for batch 1..16 of (3, 8, 8) uint8 -> 4 logits, and the ONNX Runtime logits to match."""
    def make(version: str = "10.7.0"):
        trt, cudart = stand_in(version)
        onnx_path = _classifier_onnx(tmp_path / "model.onnx")
        info = build_engine(onnx_path, tmp_path / "model.plan", max_batch=16, opt_batch=8, fp16=False)
        images = np.random.default_rng(1).integers(0, 256, (16, 3, 8, 8), dtype=np.uint8)
        return trt, cudart, tmp_path / "model.plan", info, images, _ort(onnx.load(str(onnx_path)), images)
    return make


def test_each_bucket_is_one_graph_replayed_with_its_own_context(engine):
    trt, cudart, plan, info, images, expected = engine()
    backend = TensorRTBackend(plan, info, max_batch=16)
    assert backend.batch_sizes == (1, 2, 4, 8, 16)
    backend.prepare()
    graphs = backend.graphs
    assert sorted(graphs.recorded) == [1, 2, 4, 8, 16] and graphs.fallbacks == {}
    assert [c.shape[0] for c in graphs.contexts.values()] == [16, 8, 4, 2, 1]  # largest first, shape set once
    scratch = {c.device_memory for c in graphs.contexts.values()}
    assert len(scratch) == 1 and None not in scratch  # one activation block shared by every context (>= 10.1)
    direct, launches = trt.direct_runs, cudart.launches
    for b in (1, 3, 5, 16, 7, 2):
        out = backend(images[:b])
        assert out.dtype == np.float32 and out.shape == (b, 4)
        np.testing.assert_array_equal(out, expected[:b])  # padded rows never leak into the answer
    assert cudart.launches - launches == 6 and trt.direct_runs == direct  # replays only, no enqueue
    with pytest.raises(ValueError, match="batch size 17 is outside the engine's range 1..16"):
        backend(np.concatenate([images, images[:1]]))
    with pytest.raises(ValueError, match="expects uint8 images"):
        backend(images.astype(np.float32))
    backend.close()
    assert cudart.graphs == set() and cudart.memory == {}  # graphs destroyed, scratch and buffers freed


@pytest.mark.parametrize("failure", ["cudaStreamBeginCapture", "cudaStreamEndCapture", "cudaGraphInstantiate",
                                     "engine synchronises"])
def test_a_bucket_tensorrt_cannot_capture_falls_back_to_plain_enqueue(engine, failure, caplog):
    trt, cudart, plan, info, images, expected = engine()
    if failure == "engine synchronises":
        trt.capture_breaks = True  # the capture is invalidated: cudaStreamEndCapture answers 901
    else:
        cudart.fail[failure] = 999
    backend = TensorRTBackend(plan, info, max_batch=16)
    with caplog.at_level(logging.WARNING, logger="ganet.serve"):
        backend.prepare()
    graphs = backend.graphs
    assert graphs.recorded == {} and sorted(graphs.fallbacks) == [1, 2, 4, 8, 16]
    reason = next(iter(graphs.fallbacks.values()))
    assert ("901" if failure == "engine synchronises" else failure) in reason, reason
    assert any(r.__dict__.get("event") == "cuda_graph_fallback" for r in caplog.records)
    assert not any(cudart.capturing(s) for s in (0, 7))  # no stream left capturing
    trt.capture_breaks = False
    cudart.fail.clear()
    direct = trt.direct_runs
    for b in (1, 6, 16):
        np.testing.assert_array_equal(backend(images[:b]), expected[:b])
    assert trt.direct_runs - direct == 3 and cudart.launches == 0
    backend.close()
    assert cudart.graphs == set() and cudart.memory == {}


def test_without_cuda_graphs_or_user_managed_memory(engine):
    # TensorRT 10.0: no USER_MANAGED contexts, each bucket context allocates its own; graphs still recorded.
    trt, cudart, plan, info, images, expected = engine("10.0.1")
    backend = TensorRTBackend(plan, info, max_batch=8)
    assert backend.batch_sizes == (1, 2, 4, 8)
    np.testing.assert_array_equal(backend(images[:3]), expected[:3])
    assert sorted(backend.graphs.recorded) == [4] and backend.graphs.contexts[4].device_memory is None
    backend.close()
    # --no-cuda-graphs: the engine's dynamic shapes, one context, nothing padded
    plain = TensorRTBackend(plan, info, cuda_graphs=False)
    assert plain.graphs is None and plain.batch_sizes == ()
    np.testing.assert_array_equal(plain(images[:5]), expected[:5])
    assert cudart.launches == 1  # only the earlier backend's one replay
    plain.close()


def test_stand_in_stream_capture_follows_the_runtime_rules(stand_in):
    """The stand-in's own rules, so that the tests above prove something: recorded work does not run until the
    graph is launched; a sync while capturing fails and invalidates; stream 0 cannot capture."""
    _, cudart = stand_in("10.7.0")
    ran = []
    mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
    assert cudart.cudaStreamBeginCapture(0, mode) == (900,)
    assert cudart.cudaStreamBeginCapture(7, mode) == (0,)
    cudart.enqueue(7, lambda: ran.append(1))
    assert ran == [] and cudart.cudaStreamBeginCapture(7, mode) == (401,)
    err, graph = cudart.cudaStreamEndCapture(7)
    err, graph_exec = cudart.cudaGraphInstantiate(graph, 0)
    assert cudart.cudaGraphLaunch(graph_exec, 7) == (0,) and cudart.cudaGraphLaunch(graph_exec, 7) == (0,)
    assert ran == [1, 1]
    assert cudart.cudaStreamBeginCapture(7, mode) == (0,)
    assert cudart.cudaStreamSynchronize(7) == (900,)
    assert cudart.cudaStreamEndCapture(7) == (901, None)
    assert cudart.cudaStreamEndCapture(7) == (401, None)
