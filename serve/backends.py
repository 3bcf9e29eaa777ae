"""Inference backends: uint8 images (B, 3, S, S) in, float32 logits (B, num_classes) out.

The ONNX Runtime backend imports neither torch nor torchvision; the TensorRT one lives in ``trt_backend.py``.
``load_backend`` resolves ``--backend auto`` (tensorrt > onnxruntime > torch) and says why it chose what it chose.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ganet.preprocess import Preprocessing
from ganet.system import usable_cpus

__all__ = ["Backend", "ModelSpec", "BackendError", "OnnxRuntimeBackend", "TorchBackend", "load_backend",
           "choose_backend", "TORCH_PRECISIONS"]

log = logging.getLogger("ganet.serve")

TORCH_PRECISIONS = ("fp16", "bf16")  # --precision values only the torch backend runs (a converted copy of the model)


class BackendError(RuntimeError):
    """The requested backend cannot serve this model on this host (message says why and what to do)."""


@dataclass(frozen=True)
class ModelSpec:
    """What the HTTP layer needs to know about the served model."""

    name: str
    labels: tuple[str, ...]
    preprocessing: Preprocessing
    max_batch: int

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        s = self.preprocessing.input_size
        return (3, s, s)


class Backend(Protocol):
    name: str  # "onnxruntime", "tensorrt", "torch"
    device: str  # "cpu", "cuda", "CUDAExecutionProvider", ...

    def __call__(self, images: np.ndarray) -> np.ndarray: ...  # (B, 3, S, S) uint8 -> (B, C) float32

    def close(self) -> None: ...


def _threads(n: int) -> int:
    """0: half the cores, at least 1; the other half decode images and serve HTTP. GA-ShuffleNetV2 at 224 gains
    little from intra-op threads: on 2 cores ganet-serve costs 10.2-10.4 CPU ms per image with 1 thread, 10.8-13.4
    with 2 (benchmarks/bench_serve.py)."""
    return n if n > 0 else max(1, usable_cpus() // 2)


class _Bucketed:
    """``runner``: a ``ganet.buckets.BucketedRunner`` of CUDA graphs, or None (no graphs)."""

    runner = None

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """The batch sizes recorded as CUDA graphs (empty without graphs)."""
        return self.runner.sizes if self.runner is not None else ()

    def prepare(self) -> None:
        """Record every batch size's CUDA graph now (largest first), not on the first request of that size."""
        if self.runner is not None:
            self.runner.capture_all()


class OnnxRuntimeBackend(_Bucketed):
    """An ONNX Runtime session on the CUDA execution provider when onnxruntime-gpu offers it, else the CPU."""

    name = "onnxruntime"

    def __init__(self, onnx_path: str | os.PathLike, intra_op_threads: int = 0, prefer_cuda: bool = True,
                 fused_path: str | os.PathLike | None = None, cuda_graphs: bool = False, max_batch: int = 32) -> None:
        """``fused_path``: the export's ``model.fused.onnx``, run instead of ``onnx_path`` on the CPU when the fused
        GA kernel builds and loads here (it is a CPU kernel: the CUDA execution provider keeps the standard graph).
        ``cuda_graphs``: the CUDA execution provider records one CUDA graph per batch bucket up to ``max_batch``
        (IO binding, ``ganet.serve.ort_graphs``); needs onnxruntime-gpu."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # one chain of convolutions: nothing to overlap
        opts.intra_op_num_threads = _threads(intra_op_threads)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # errors only
        # Idle pool threads must not spin: they would take the cores the decode pool and the event loop need
        # (bench_serve.py, 2 cores, 2 threads: 16-18 -> 11-13 CPU ms per image served).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        available = ort.get_available_providers()
        providers = ["CPUExecutionProvider"]
        if prefer_cuda and "CUDAExecutionProvider" in available:
            providers.insert(0, "CUDAExecutionProvider")
        if cuda_graphs:
            if "CUDAExecutionProvider" not in available:
                raise BackendError(f"--cuda-graphs with ONNX Runtime needs its CUDA execution provider (pip install "
                                   f"onnxruntime-gpu, and a GPU); this onnxruntime offers {', '.join(available)}")
            from ganet.serve.ort_graphs import cuda_graph_providers

            providers = cuda_graph_providers()
        self.graph = "standard"
        if fused_path is not None and providers == ["CPUExecutionProvider"]:
            from ganet.kernels import KernelUnavailable, register_kernels

            try:
                library = register_kernels(opts)
                onnx_path, self.graph = fused_path, "fused"
                log.info("fused GA kernel", extra={"event": "graph", "graph": "fused", "library": str(library)})
            except KernelUnavailable as e:
                log.warning("fused GA kernel unavailable, serving the standard graph: %s", e,
                            extra={"event": "graph", "graph": "standard", "reason": str(e)})
        self.session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=providers)
        self.device = self.session.get_providers()[0]
        if self.device == "CUDAExecutionProvider":
            from ganet.serve.gpu_memory import nvml_device_memory

            used = nvml_device_memory(0)  # the CUDA EP's default device
            if used is not None:
                self.gpu_memory_bytes = used  # read by the /metrics gauge, as the other backends' method is
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.runner = None  # a BucketedRunner over IO-bound CUDA graphs, or None: dynamic batch, session.run
        if cuda_graphs:
            from ganet.buckets import BucketedRunner, bucket_sizes
            from ganet.serve.ort_graphs import IOBindingCapture

            capture = IOBindingCapture(self.session, "cuda", cuda_graph=True)
            self.runner = BucketedRunner(capture, bucket_sizes(max_batch), capture.sample_shape)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if self.runner is not None:
            return self.runner(images)
        (logits,) = self.session.run([self.output_name], {self.input_name: images})
        return np.asarray(logits, dtype=np.float32)

    def close(self) -> None:
        self.session = self.runner = None


class TorchBackend(_Bucketed):
    """The PyTorch model from a checkpoint, normalising inside exactly as the exported graph does.

    On CUDA: channels_last, ``precision`` fp32 (TF32 off), fp16 or bf16 (a converted copy, see
    ``ganet.serve.torch_graphs``), and with ``cuda_graphs`` the forward recorded once per batch bucket
    (``ganet.buckets.bucket_sizes(max_batch)``) and replayed, each batch padded up to its bucket. On the CPU: eager, as
    before (padding would only cost work there)."""

    name = "torch"

    def __init__(self, checkpoint: str | os.PathLike, device: str | None = None, intra_op_threads: int = 0, *,
                 precision: str = "fp32", cuda_graphs: bool = True, max_batch: int = 32) -> None:
        import torch

        from ganet.checkpoint import load_checkpoint
        from ganet.serve.torch_graphs import TorchForward

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        on_cuda = self.device.startswith("cuda")
        if not on_cuda:
            torch.set_num_threads(_threads(intra_op_threads))
        else:
            # fp32 means fp32: with cuDNN's default TF32 convolutions, logits of ~17 landed 0.10 from ONNX Runtime's
            # on an H100 (3e-5 without; tests/test_serve_gpu.py).
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        self.model, self.info = load_checkpoint(checkpoint, self.device)
        self.precision = precision
        self.forward = TorchForward(self.model, self.info.preprocessing, self.device, precision, channels_last=on_cuda)
        self.runner = None  # a BucketedRunner over CUDA graphs, or None: eager
        if on_cuda and cuda_graphs:
            from ganet.buckets import BucketedRunner, bucket_sizes
            from ganet.serve.torch_graphs import CudaGraphCapture

            shape = (3, self.info.preprocessing.input_size, self.info.preprocessing.input_size)
            capture = CudaGraphCapture(self.forward, max_batch, shape, self.device)
            self.runner = BucketedRunner(capture, bucket_sizes(max_batch), shape, host_buffer=capture.host_buffer)
        self._torch = torch

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if self.runner is not None:
            return self.runner(images)
        x = self._torch.from_numpy(images).to(self.device)  # (B, 3, S, S) uint8
        return self.forward(x).cpu().numpy()

    def gpu_memory_bytes(self) -> float:
        return float(self._torch.cuda.memory_allocated()) if self.device.startswith("cuda") else 0.0

    def close(self) -> None:
        self.model = self.forward = self.runner = None


def _is_checkpoint(path: Path) -> bool:
    return path.is_file() and path.suffix == ".safetensors"


def choose_backend(model: Path, requested: str, precision: str = "fp32",
                   engine_cache: Path | None = None) -> tuple[str, str]:
    """``(backend, reason)`` for ``--backend requested`` (``auto`` resolves to the fastest usable one)."""
    if requested != "auto":
        return requested, "requested"
    if precision == "int8":
        return "onnxruntime", "--precision int8: the export's INT8 model runs on ONNX Runtime"
    if precision in TORCH_PRECISIONS:
        return "torch", f"--precision {precision}: the torch backend converts the checkpoint's model"
    if _is_checkpoint(model):
        return "torch", "MODEL is a checkpoint, which only the torch backend reads"
    from ganet.export.manifest import load_manifest

    manifest = load_manifest(model)
    reasons = []
    if manifest.artifact("tensorrt") is None:
        if engine_cache is not None:
            from ganet.export.tensorrt import tensorrt_available

            if tensorrt_available():
                return "tensorrt", (f"no TensorRT engine in the export; the engine cache {engine_cache} has or "
                                    "builds one")
        reasons.append("no TensorRT engine in the export")
    else:
        from ganet.export.tensorrt import tensorrt_available

        if tensorrt_available():
            return "tensorrt", "TensorRT engine present, tensorrt importable and a CUDA GPU visible"
        reasons.append("TensorRT engine present but tensorrt/cuda-python or a GPU is missing")
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
        where = "CUDA execution provider" if "CUDAExecutionProvider" in providers else "CPU execution provider"
        return "onnxruntime", "; ".join(reasons + [f"onnxruntime importable ({where})"])
    except ImportError:
        reasons.append("onnxruntime is not installed")
    return "torch", "; ".join(reasons)


def load_backend(model: str | os.PathLike, requested: str = "auto", *, intra_op_threads: int = 0,
                 device: str | None = None, max_batch: int | None = None, name: str | None = None,
                 precision: str = "fp32", fused_kernels: bool = True,
                 engine_cache: str | os.PathLike | None = None, cuda_graphs: bool | None = None
                 ) -> tuple[Backend, ModelSpec]:
    """Load MODEL (an export directory, or a checkpoint for torch) with the requested backend and precision.
    ``engine_cache``: TensorRT builds (or reuses) an engine there when the export has none for this host.
    ``cuda_graphs``: None -- on for torch on CUDA and for TensorRT, off for ONNX Runtime; True/False forces it."""
    model = Path(model)
    engine_cache = Path(engine_cache) if engine_cache is not None else None
    backend, reason = choose_backend(model, requested, precision, engine_cache)
    if precision == "int8" and backend != "onnxruntime":
        raise BackendError(f"--precision int8 runs the export's INT8 ONNX model on ONNX Runtime, not on the "
                           f"{backend} backend: use --backend onnxruntime (or auto)")
    if precision in TORCH_PRECISIONS and backend != "torch":
        raise BackendError(f"--precision {precision} converts the checkpoint's model in the torch backend, not the "
                           f"{backend} backend (a TensorRT engine's precision is chosen at export: ganet-export "
                           f"--trt --fp16): use --backend torch (or auto)")
    log.info("backend %s: %s", backend, reason, extra={"event": "backend", "backend": backend, "reason": reason})
    if backend == "torch":
        checkpoint = model
        if not _is_checkpoint(model):
            from ganet.export.manifest import load_manifest

            checkpoint = Path(load_manifest(model).checkpoint.get("path", ""))
            if not checkpoint.is_file():
                raise BackendError(f"the torch backend needs a checkpoint; {model}'s manifest records "
                                   f"{str(checkpoint)!r}, which does not exist: pass the .safetensors file instead")
        runner = TorchBackend(checkpoint, device, intra_op_threads, precision=precision,
                              cuda_graphs=cuda_graphs is not False, max_batch=max_batch or 32)
        info = runner.info
        spec = ModelSpec(name or info.model, info.labels, info.preprocessing, max_batch or 32)
        return runner, spec
    if _is_checkpoint(model):
        raise BackendError(f"--backend {backend} serves an export directory, not a checkpoint: run "
                           f"`ganet-export {model} --output DIR` first, or use --backend torch")
    from ganet.export.manifest import load_manifest

    manifest = load_manifest(model)
    limit = manifest.max_batch
    if max_batch is not None and max_batch > limit:
        raise BackendError(f"--max-batch {max_batch} exceeds the export's max_batch {limit} (re-export with "
                           f"--max-batch {max_batch})")
    spec = ModelSpec(name or manifest.model, manifest.labels, manifest.preprocessing, max_batch or limit)
    if backend == "onnxruntime":
        artifact = manifest.artifact("onnx_int8" if precision == "int8" else "onnx")
        if artifact is None:
            raise BackendError(f"{model} holds no INT8 model: re-export with `ganet-export CHECKPOINT --int8`")
        fused = manifest.artifact("onnx_fused") if precision == "fp32" and fused_kernels else None
        return OnnxRuntimeBackend(manifest.path(artifact), intra_op_threads,
                                  fused_path=manifest.path(fused) if fused else None,
                                  cuda_graphs=bool(cuda_graphs), max_batch=spec.max_batch), spec
    if backend == "tensorrt":
        from ganet.serve.trt_backend import TensorRTBackend

        if engine_cache is not None:
            from ganet.serve.engine_cache import engine_for_host

            engine = engine_for_host(manifest, engine_cache)  # the export's own plan when it fits this host
            return TensorRTBackend(engine.plan, engine.info, cuda_graphs=cuda_graphs is not False,
                                   max_batch=spec.max_batch), spec
        artifact = manifest.artifact("tensorrt")
        if artifact is None:
            raise BackendError(f"{model} holds no TensorRT engine: re-export with `ganet-export --trt` on a GPU host, "
                               f"or give --engine-cache DIR to build one here")
        return TensorRTBackend(manifest.path(artifact), artifact.info, cuda_graphs=cuda_graphs is not False,
                               max_batch=spec.max_batch), spec
    raise BackendError(f"unknown backend {backend!r}; expected auto, tensorrt, onnxruntime or torch")
