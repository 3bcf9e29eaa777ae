"""TensorRT engines: build one from the exported ONNX file, refuse a foreign one before loading it, run it.

Written against the documented TensorRT Python API of 10.x and 11.x (``tensorrt`` is imported lazily, inside the
functions) and cuda-python's runtime bindings for device memory (``cuda.bindings.runtime``, or ``cuda.cudart`` in
older releases). No torch: a serving host needs only ``tensorrt`` and ``cuda-python``.

fp16 takes one of two paths, chosen by the installed major version:

* TensorRT 10: ``BuilderFlag.FP16`` + ``OBEY_PRECISION_CONSTRAINTS``, with every layer made from an fp32-island node
  (``ganet.export.fp16.fp32_island_nodes``: the GA normalisations and softmaxes) pinned to fp32.
* TensorRT 11 (networks are always strongly typed; ``BuilderFlag.FP16`` is gone): the network is parsed from
  ``to_mixed_fp16(model)``, whose Cast nodes already say which tensors are fp16.

TF32 is switched off in both precisions, so the fp32 layers are fp32.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ganet._io import atomic_write_bytes

__all__ = ["TensorRTUnavailableError", "TensorRTBuildError", "EngineMismatchError", "tensorrt_available",
           "build_engine", "current_engine_environment", "engine_mismatches", "check_engine_compatible",
           "TensorRTRunner"]

REBUILD_HINT = "rebuild it with `ganet-export --trt` on this machine"
WORKSPACE_BYTES = 1 << 30


class TensorRTUnavailableError(RuntimeError):
    """TensorRT (or cuda-python) is not importable, or no CUDA GPU is visible."""


class TensorRTBuildError(RuntimeError):
    """The ONNX parser or the builder refused the model; the message lists every parser error with its node."""


class EngineMismatchError(RuntimeError):
    """A serialized engine was built for another TensorRT version or GPU architecture."""


def install_command() -> str:
    """The pip command for TensorRT and cuda-python matching this host's CUDA major version, read from torch where
    it is already imported (never imported here: a serving host may have none); both majors where it is unknown."""
    import sys

    torch = sys.modules.get("torch")
    cuda = getattr(getattr(torch, "version", None), "cuda", None)
    if isinstance(cuda, str) and cuda.split(".")[0].isdecimal():
        major = int(cuda.split(".")[0])
        return f"pip install tensorrt-cu{major} 'cuda-python>={major},<{major + 1}'"
    return ("pip install tensorrt-cu12 'cuda-python>=12,<13' (CUDA 12) or pip install tensorrt-cu13 "
            "'cuda-python>=13,<14' (CUDA 13)")


def install_hint() -> str:
    return f"install it on a host with an NVIDIA GPU: {install_command()}"


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailableError(f"TensorRT is not installed ({e}); {install_hint()}") from None
    return trt


def _import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as e:
            raise TensorRTUnavailableError(f"cuda-python is not installed ({e}); {install_hint()}") from None
    return cudart


def tensorrt_available() -> bool:
    """True when ``tensorrt`` and cuda-python import and a CUDA device is visible."""
    try:
        _import_tensorrt()
        cudart = _import_cudart()
        err, count = cudart.cudaGetDeviceCount()
        return int(err) == 0 and count > 0
    except Exception:
        return False


def _cuda(result):
    """Unwrap a cuda-python ``(err, *values)`` tuple, raising on an error code."""
    err, *values = result
    if int(err) != 0:
        raise RuntimeError(f"CUDA runtime call failed: {err}")
    return values[0] if len(values) == 1 else tuple(values) if values else None


def _version(encoded: int) -> str:
    return f"{encoded // 1000}.{encoded % 1000 // 10}"  # 12040 -> "12.4"


def current_engine_environment() -> dict[str, str]:
    """What a serialized engine is tied to, here: TensorRT version, GPU, compute capability, CUDA, driver."""
    trt = _import_tensorrt()
    cudart = _import_cudart()
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count < 1:
        raise TensorRTUnavailableError(f"no CUDA GPU is visible ({err}); TensorRT engines need one")
    device = _cuda(cudart.cudaGetDevice())
    props = _cuda(cudart.cudaGetDeviceProperties(device))
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    driver = _version(_cuda(cudart.cudaDriverGetVersion()))
    try:  # the NVIDIA driver's own version string, when NVML is installed
        import pynvml

        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else driver
    except Exception:
        driver = f"CUDA driver API {driver}"
    return {"tensorrt_version": trt.__version__, "gpu_name": name.strip("\x00 "),
            "compute_capability": f"{props.major}.{props.minor}",
            "cuda_version": _version(_cuda(cudart.cudaRuntimeGetVersion())), "driver_version": driver}


def _release(version: str) -> tuple[str, ...]:
    return tuple(re.findall(r"\d+", str(version))[:3])  # "10.7.0.post1" -> ("10", "7", "0")


def engine_mismatches(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Why an engine recorded as ``recorded`` cannot run where ``current`` describes; empty when it can.

    A plan is valid only for the TensorRT release (major.minor.patch) and the GPU compute capability it was built
    with. The GPU name, CUDA and driver versions are recorded for the report but do not decide.
    """
    reasons = []
    for key, label in (("tensorrt_version", "TensorRT version"), ("compute_capability", "GPU compute capability")):
        if key not in recorded:
            reasons.append(f"the engine info does not record its {label} (`{key}`)")
            continue
        a, b = recorded[key], current.get(key)
        same = _release(a) == _release(b) if key == "tensorrt_version" else str(a) == str(b)
        if not same:
            reasons.append(f"built with {label} {a}, this machine has {b}")
    return reasons


def check_engine_compatible(engine_info: dict[str, Any], current: dict[str, Any] | None = None) -> None:
    """Raise ``EngineMismatchError`` (before anything is deserialised) if the engine was built elsewhere."""
    current = current_engine_environment() if current is None else current
    reasons = engine_mismatches(engine_info, current)
    if reasons:
        gpu = engine_info.get("gpu_name", "an unknown GPU")
        raise EngineMismatchError(f"this TensorRT engine was built for {gpu} and cannot run here: "
                                  f"{'; '.join(reasons)}; {REBUILD_HINT}.")


# --- build ---------------------------------------------------------------------------------------------------------

def _parse(trt, builder, logger, onnx_path: Path, strongly_typed: bool):
    flags = 0
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)  # ignored (always on) in 11.x
    network = builder.create_network(flags)  # explicit batch is the only mode since 10.0
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = []
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            node = getattr(e, "node_name", lambda: "")() or f"#{e.node()}"
            op = getattr(e, "node_operator", lambda: "")()
            errors.append(f"  node {node}{f' ({op})' if op else ''}: {e.desc()}")
        raise TensorRTBuildError(f"TensorRT's ONNX parser rejected {onnx_path} ({parser.num_errors} errors):\n"
                                 + "\n".join(errors))
    return network, parser


def _pin_fp32(trt, network, node_names: set[str], tensor_names: set[str],
              all_node_names: frozenset[str] = frozenset()) -> int:
    """TensorRT 10, FP16 flag: run the layers made from the fp32-island ONNX nodes in fp32. Returns the count.

    The ONNX parser names a node's layers after the node (``name``, then ``name_1``, ... when it needs several) and
    names the node's output tensors after the ONNX outputs; a layer matching either is pinned. A layer named
    exactly like another ONNX node (``node_mul_2`` is not a second layer of ``node_mul``) is that node's.
    """
    floats = {trt.float32, trt.float16}
    suffixed = re.compile(r"^(.*)_\d+$")
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        base = None if layer.name in all_node_names else suffixed.match(layer.name)
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        hit = (layer.name in node_names or (base is not None and base.group(1) in node_names)
               or any(t.name in tensor_names for t in outputs))
        if not hit or not outputs or any(t.dtype not in floats for t in outputs):
            continue  # shape and index layers keep their integer types
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        pinned += 1
    return pinned


def _load_timing_cache(config, path: Path | None):
    data = path.read_bytes() if path is not None and path.is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, False):  # ignore_mismatch=False: a cache from another GPU is not used
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    return cache


def _save_timing_cache(config, path: Path) -> None:
    cache = config.get_timing_cache()
    if path.is_file():  # another build may have saved since we loaded: merge its entries in, then replace
        other = config.create_timing_cache(path.read_bytes())
        cache.combine(other, False)
    atomic_write_bytes(path, bytes(cache.serialize()))


def build_engine(onnx_path: str | os.PathLike, plan_path: str | os.PathLike, *, max_batch: int, opt_batch: int,
                 fp16: bool, timing_cache: Path | None = None,
                 workspace_bytes: int = WORKSPACE_BYTES) -> dict[str, Any]:
    """Parse ``onnx_path``, build an engine for batch 1..``max_batch`` (tuned at ``opt_batch``), write it once.

    The ONNX model must have one (B, 3, S, S) input with a dynamic batch axis. ``timing_cache`` is loaded if it
    exists, merged with whatever the build measured and saved atomically (reuse it across builds on the same GPU).
    Returns the engine info to record in the manifest: tensorrt_version, gpu_name, compute_capability,
    cuda_version, driver_version, precision, fp16_mode, fp32_island_nodes (fp16: how many ONNX nodes were kept in
    fp32; 0 for a model without GA blocks), max_batch, opt_batch, input_name, input_shape, tf32.
    """
    trt = _import_tensorrt()
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not 1 <= opt_batch <= max_batch:
        raise ValueError(f"build_engine: need 1 <= opt_batch <= max_batch, got opt_batch={opt_batch}, "
                         f"max_batch={max_batch}")
    if not onnx_path.is_file():
        raise FileNotFoundError(f"build_engine: no ONNX file at {onnx_path}")
    env = current_engine_environment()
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    major = int(_release(trt.__version__)[0])
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: parity is checked at 1e-3

    import onnx

    from ganet.export.fp16 import fp32_island_nodes, to_mixed_fp16

    with tempfile.TemporaryDirectory(prefix=".ganet-trt-", dir=plan_path.parent) as tmp:
        fp16_mode, islands = None, None
        if fp16:
            model = onnx.load(str(onnx_path))
            islands = fp32_island_nodes(model)  # empty for a model without GA blocks
        if fp16 and major >= 11:
            fp16_mode = "strongly-typed mixed ONNX (to_mixed_fp16)"
            mixed = Path(tmp) / "model.mixed_fp16.onnx"
            onnx.save(to_mixed_fp16(model), str(mixed))
            network, _parser = _parse(trt, builder, logger, mixed, strongly_typed=True)
        else:
            network, _parser = _parse(trt, builder, logger, onnx_path, strongly_typed=major >= 11)
            if fp16:
                config.set_flag(trt.BuilderFlag.FP16)
                config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
                names = set(islands)
                tensors = {o for n in model.graph.node if n.name in names for o in n.output}
                every = frozenset(n.name for n in model.graph.node)
                pinned = _pin_fp32(trt, network, names, tensors, every)
                fp16_mode = f"BuilderFlag.FP16 + layer precisions ({pinned} layers pinned to fp32)"

        if network.num_inputs != 1:
            raise TensorRTBuildError(f"expected one network input, found {network.num_inputs}")
        image = network.get_input(0)
        shape = tuple(image.shape)
        if len(shape) != 4 or any(d < 0 for d in shape[1:]):
            raise TensorRTBuildError(f"expected input {image.name!r} of shape (batch, C, H, W) with static C, H, W; "
                                     f"the ONNX file declares {shape}")
        profile = builder.create_optimization_profile()
        per_sample = shape[1:]
        profile.set_shape(image.name, (1, *per_sample), (opt_batch, *per_sample), (max_batch, *per_sample))
        config.add_optimization_profile(profile)
        if timing_cache is not None:
            _load_timing_cache(config, Path(timing_cache))

        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise TensorRTBuildError(f"TensorRT could not build an engine from {onnx_path}; see the log above")
        if timing_cache is not None:
            _save_timing_cache(config, Path(timing_cache))
    atomic_write_bytes(plan_path, bytes(plan))
    return {**env, "precision": "fp16" if fp16 else "fp32", "fp16_mode": fp16_mode,
            "fp32_island_nodes": None if islands is None else len(islands), "tf32": False,
            "max_batch": max_batch, "opt_batch": opt_batch, "input_name": image.name,
            "input_shape": ["batch", *per_sample]}


# --- run -----------------------------------------------------------------------------------------------------------

class TensorRTRunner:
    """A deserialised engine with one execution context, pinned host buffers and one CUDA stream.

    ``runner(images)`` takes uint8 images (B, 3, S, S), 1 <= B <= the engine's max batch, and returns float32
    logits (B, num_classes). Not thread-safe: give each serving worker its own runner. ``host_in``/``host_out``
    (page-locked, max batch rows), ``dev_in``/``dev_out`` (device pointers) and ``stream`` are what
    ``ganet.serve.trt_graphs`` records its CUDA graphs around.
    """

    def __init__(self, plan_path: str | os.PathLike, engine_info: dict[str, Any]) -> None:
        check_engine_compatible(engine_info)  # before deserialising: a foreign plan can crash the process
        trt = _import_tensorrt()
        self.cudart = cudart = _import_cudart()
        self.trt = trt
        self._buffers: list[tuple[str, int]] = []  # (kind, pointer) to free
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialise {plan_path}; {REBUILD_HINT}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise RuntimeError(f"expected an engine with one input and one output, got {inputs} -> {outputs}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        min_shape, _, max_shape = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.min_batch, self.max_batch = int(min_shape[0]), int(max_shape[0])
        self.sample_shape = tuple(int(d) for d in max_shape[1:])  # (3, S, S)
        self.input_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.input_name)))
        self.output_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.output_name)))
        self.context.set_input_shape(self.input_name, tuple(max_shape))
        self.num_classes = int(self.context.get_tensor_shape(self.output_name)[1])

        self.stream = _cuda(cudart.cudaStreamCreate())
        self.host_in = self._pinned((self.max_batch, *self.sample_shape), self.input_dtype)
        self.host_out = self._pinned((self.max_batch, self.num_classes), self.output_dtype)
        self.dev_in = self._device(self.host_in.nbytes)
        self.dev_out = self._device(self.host_out.nbytes)
        self.context.set_tensor_address(self.input_name, self.dev_in)
        self.context.set_tensor_address(self.output_name, self.dev_out)

    def _pinned(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A NumPy array in page-locked host memory, so that the async copies really are asynchronous."""
        import ctypes

        nbytes = int(np.prod(shape)) * dtype.itemsize
        ptr = _cuda(self.cudart.cudaMallocHost(nbytes))
        self._buffers.append(("host", ptr))
        raw = (ctypes.c_byte * nbytes).from_address(int(ptr))
        return np.frombuffer(raw, dtype=dtype).reshape(shape)

    def _device(self, nbytes: int) -> int:
        ptr = _cuda(self.cudart.cudaMalloc(nbytes))
        self._buffers.append(("device", ptr))
        return int(ptr)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.check(images)
        batch = images.shape[0]
        cudart = self.cudart
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        np.copyto(self.host_in[:batch], images)
        in_bytes, out_bytes = self.host_in[:batch].nbytes, self.host_out[:batch].nbytes
        _cuda(cudart.cudaMemcpyAsync(self.dev_in, self.host_in.ctypes.data, in_bytes, h2d, self.stream))
        if not self.context.set_input_shape(self.input_name, (batch, *self.sample_shape)):
            raise RuntimeError(f"TensorRT refused input shape {(batch, *self.sample_shape)}")
        if not self.context.execute_async_v3(int(self.stream)):
            raise RuntimeError("TensorRT execute_async_v3 failed; see the TensorRT log")
        _cuda(cudart.cudaMemcpyAsync(self.host_out.ctypes.data, self.dev_out, out_bytes, d2h, self.stream))
        _cuda(cudart.cudaStreamSynchronize(self.stream))
        return self.host_out[:batch].astype(np.float32, copy=True)

    def check(self, images: np.ndarray) -> None:
        """Raise ValueError unless ``images`` is what the engine takes: (B, 3, S, S) of its dtype, B in its range."""
        if not isinstance(images, np.ndarray):
            raise ValueError(f"TensorRTRunner expects a numpy array, got {type(images).__name__}")
        if images.dtype != self.input_dtype:
            raise ValueError(f"TensorRTRunner expects {self.input_dtype} images, got {images.dtype}")
        if images.ndim != 4 or tuple(images.shape[1:]) != self.sample_shape:
            raise ValueError(f"TensorRTRunner expects images of shape (B, {', '.join(map(str, self.sample_shape))})"
                             f", got {tuple(images.shape)}")
        batch = images.shape[0]
        if not self.min_batch <= batch <= self.max_batch:
            raise ValueError(f"batch size {batch} is outside the engine's range {self.min_batch}..{self.max_batch}")

    def close(self) -> None:
        """Free the CUDA buffers and the stream (also done when the runner is garbage-collected)."""
        cudart = getattr(self, "cudart", None)
        if cudart is None:
            return
        for kind, ptr in self._buffers:
            cudart.cudaFreeHost(ptr) if kind == "host" else cudart.cudaFree(ptr)
        self._buffers = []
        if getattr(self, "stream", None) is not None:
            cudart.cudaStreamDestroy(self.stream)
            self.stream = None

    def __enter__(self) -> TensorRTRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
