"""ONNX Runtime with IO binding at fixed batch sizes: ``capture(n)`` for ``ganet.buckets.BucketedRunner``.

Each bucket gets its own input and output ``OrtValue`` (on the session's device) bound once, so their addresses
never change. On the CUDA execution provider created with ``enable_cuda_graph``, each bucket's runs carry their
own ``gpu_graph_id`` (a run option, ids from 1): ONNX Runtime records one CUDA graph per id on an early run and
replays it after. On the CPU execution provider the same code runs without graphs (what the tests exercise here:
``onnxruntime-gpu`` is not installed on this workplace's machines).
"""
from __future__ import annotations

import itertools
import logging

import numpy as np

from ganet.buckets import Replay

__all__ = ["cuda_graph_providers", "IOBindingCapture"]

log = logging.getLogger("ganet.serve")

RUNS_AT_CAPTURE = 2  # ONNX Runtime runs a graph id normally once before it records it; both happen at capture


def cuda_graph_providers() -> list:
    """The providers list that turns on CUDA graphs in ONNX Runtime's CUDA execution provider."""
    return [("CUDAExecutionProvider", {"enable_cuda_graph": "1"}), "CPUExecutionProvider"]


class IOBindingCapture:
    """``capture(n)``: an IO binding of fixed (n, *sample) input and (n, num_classes) output buffers on
    ``device`` ("cuda" or "cpu"); with ``cuda_graph``, runs tagged with a graph id of their own."""

    def __init__(self, session, device: str, cuda_graph: bool) -> None:
        import onnxruntime as ort

        self._ort, self.session, self.device, self.cuda_graph = ort, session, device, cuda_graph
        (inp,), (out,) = session.get_inputs(), session.get_outputs()
        self.input_name, self.output_name = inp.name, out.name
        self.sample_shape = tuple(int(d) for d in inp.shape[1:])
        self.num_classes = int(out.shape[1])
        self._ids = itertools.count(1)  # ONNX Runtime reserves 0 and -1
        self.graph_ids: dict[int, int] = {}  # batch size -> gpu_graph_id

    def __call__(self, n: int) -> Replay:
        ort = self._ort
        inp = ort.OrtValue.ortvalue_from_shape_and_type((n, *self.sample_shape), np.uint8, self.device, 0)
        out = ort.OrtValue.ortvalue_from_shape_and_type((n, self.num_classes), np.float32, self.device, 0)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input_name, inp)
        binding.bind_ortvalue_output(self.output_name, out)
        options = ort.RunOptions()
        if self.cuda_graph:
            self.graph_ids[n] = next(self._ids)
            options.add_run_config_entry("gpu_graph_id", str(self.graph_ids[n]))
        session = self.session

        def replay(rows: np.ndarray) -> np.ndarray:
            inp.update_inplace(rows)  # host -> the bound buffer (a copy to the GPU, or into CPU memory)
            session.run_with_iobinding(binding, options)
            return out.numpy()

        zeros = np.zeros((n, *self.sample_shape), np.uint8)
        for _ in range(RUNS_AT_CAPTURE):
            replay(zeros)
        return replay
