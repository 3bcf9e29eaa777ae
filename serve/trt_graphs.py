"""TensorRT's enqueue recorded in a CUDA graph per batch bucket: ``capture(n)`` for ``ganet.buckets.BucketedRunner``.

A graph fixes the input shape, the tensor addresses and the execution context it was recorded with, so each bucket
gets an execution context of its own with its shape set once (switching one context's shape between replays would
leave TensorRT's shape-dependent state out of step with the recorded kernels). All contexts read the runner's one
device input and write its one device output (prefixes of the max-batch buffers), on the runner's stream; where
TensorRT lets the application own the activation memory (``ExecutionContextAllocationStrategy.USER_MANAGED``,
TensorRT >= 10.1) they share one scratch block, which is safe because buckets never run at the same time.

Recording follows TensorRT's documented recipe: set the shape, ``execute_async_v3`` once outside the capture (the
first enqueue after a shape change does set-up work that must not be recorded), then ``cudaStreamBeginCapture`` ->
``execute_async_v3`` -> ``cudaStreamEndCapture`` -> ``cudaGraphInstantiate``, and ``cudaGraphLaunch`` for each
batch. Engines TensorRT cannot capture (a layer that synchronises, data-dependent shapes, ...) end the capture with
an error; that bucket then keeps plain ``execute_async_v3``, and the log says why. The copies stay outside the
graph. Tested here with the stand-in (tests/stand_in_tensorrt.py); the real library only on a GPU host.
"""
from __future__ import annotations

import logging

import numpy as np

from ganet.buckets import BucketedRunner, Replay
from ganet.export.tensorrt import TensorRTRunner
from ganet.export.tensorrt import _cuda as check

__all__ = ["TensorRTGraphs"]

log = logging.getLogger("ganet.serve")


class TensorRTGraphs:
    """``graphs(images)`` -> logits through per-bucket contexts of ``runner``'s engine, each enqueue replayed from a
    CUDA graph where TensorRT could be captured (``graphs.recorded``), else enqueued (``graphs.fallbacks``: why)."""

    def __init__(self, runner: TensorRTRunner, sizes: tuple[int, ...]) -> None:
        self.runner, self.cudart, self.trt = runner, runner.cudart, runner.trt
        sizes = tuple(s for s in sizes if runner.min_batch <= s <= runner.max_batch)
        if not sizes:
            raise ValueError(f"no batch bucket inside the engine's range {runner.min_batch}..{runner.max_batch}")
        self.contexts: dict[int, object] = {}
        self.recorded: dict[int, object] = {}  # batch size -> cudaGraphExec_t
        self.fallbacks: dict[int, str] = {}  # batch size -> why it runs without a graph
        self._graphs: list[object] = []  # cudaGraph_t, destroyed at close
        self._scratch: tuple[int, int] | None = None  # (device pointer, bytes) shared by every context
        self.bucketed = BucketedRunner(self._capture, sizes, runner.sample_shape, runner.input_dtype,
                                       host_buffer=lambda shape, dtype: runner.host_in)

    @property
    def sizes(self) -> tuple[int, ...]:
        return self.bucketed.sizes

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.runner.check(images)
        return self.bucketed(images)

    def _context(self, n: int):
        engine, runner = self.runner.engine, self.runner
        strategy = getattr(self.trt, "ExecutionContextAllocationStrategy", None)
        if strategy is not None and hasattr(engine, "device_memory_size_v2"):
            context = engine.create_execution_context(strategy.USER_MANAGED)
            if self._scratch is None:
                size = int(engine.device_memory_size_v2)
                self._scratch = (int(check(self.cudart.cudaMalloc(max(size, 1)))), size)
            context.set_device_memory(*self._scratch)
        else:  # TensorRT 10.0: each context allocates its own
            context = engine.create_execution_context()
        if context is None:
            raise RuntimeError(f"TensorRT could not create an execution context for batch size {n}")
        if not context.set_input_shape(runner.input_name, (n, *runner.sample_shape)):
            raise RuntimeError(f"TensorRT refused input shape {(n, *runner.sample_shape)}")
        context.set_tensor_address(runner.input_name, runner.dev_in)
        context.set_tensor_address(runner.output_name, runner.dev_out)
        self.contexts[n] = context
        return context

    def _record(self, context, n: int):
        """The instantiated graph of one enqueue on ``context``, or None (the reason in ``fallbacks[n]``)."""
        cudart, stream = self.cudart, self.runner.stream
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        (err,) = cudart.cudaStreamBeginCapture(stream, mode)
        if int(err) != 0:
            return self._fall_back(n, f"cudaStreamBeginCapture failed: {err}")
        enqueued = context.execute_async_v3(int(stream))
        err, graph = cudart.cudaStreamEndCapture(stream)  # always ended: the stream is unusable while capturing
        if int(err) != 0 or not enqueued or graph is None:
            if graph is not None and int(err) == 0:
                cudart.cudaGraphDestroy(graph)
            why = "execute_async_v3 failed while capturing" if not enqueued else f"cudaStreamEndCapture: {err}"
            return self._fall_back(n, why)
        self._graphs.append(graph)
        err, graph_exec = cudart.cudaGraphInstantiate(graph, 0)
        if int(err) != 0:
            return self._fall_back(n, f"cudaGraphInstantiate failed: {err}")
        self.recorded[n] = graph_exec
        return graph_exec

    def _fall_back(self, n: int, why: str) -> None:
        if hasattr(self.cudart, "cudaGetLastError"):
            self.cudart.cudaGetLastError()  # clear the (non-sticky) capture error
        self.fallbacks[n] = why
        log.warning("TensorRT batch size %d runs without a CUDA graph: %s", n, why,
                    extra={"event": "cuda_graph_fallback", "batch_size": n, "reason": why})
        return None

    def _capture(self, n: int) -> Replay:
        runner, cudart = self.runner, self.cudart
        context = self._context(n)
        stream = runner.stream
        if not context.execute_async_v3(int(stream)):  # TensorRT's set-up for this shape, outside any graph
            raise RuntimeError(f"TensorRT execute_async_v3 failed at batch size {n}; see the TensorRT log")
        check(cudart.cudaStreamSynchronize(stream))
        graph_exec = self._record(context, n)
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        host_in, host_out = runner.host_in[:n], runner.host_out[:n]

        def replay(rows: np.ndarray) -> np.ndarray:
            check(cudart.cudaMemcpyAsync(runner.dev_in, host_in.ctypes.data, host_in.nbytes, h2d, stream))
            if graph_exec is not None:
                check(cudart.cudaGraphLaunch(graph_exec, stream))
            elif not context.execute_async_v3(int(stream)):
                raise RuntimeError("TensorRT execute_async_v3 failed; see the TensorRT log")
            check(cudart.cudaMemcpyAsync(host_out.ctypes.data, runner.dev_out, host_out.nbytes, d2h, stream))
            check(cudart.cudaStreamSynchronize(stream))
            return host_out
        return replay

    def close(self) -> None:
        """Destroy the graphs and free the shared scratch memory (the runner frees its own buffers)."""
        cudart = self.cudart
        for graph_exec in self.recorded.values():
            cudart.cudaGraphExecDestroy(graph_exec)
        for graph in self._graphs:
            cudart.cudaGraphDestroy(graph)
        self.recorded, self._graphs, self.contexts = {}, [], {}
        if self._scratch is not None:
            cudart.cudaFree(self._scratch[0])
            self._scratch = None
