"""A CPU stand-in for ``tensorrt`` and cuda-python's runtime, for tests of the TensorRT plumbing where neither exists.

The calls ``ganet.export.tensorrt`` makes, with the signatures the TensorRT 10/11 Python docs give; "device" memory
is host memory and the engine runs ONNX Runtime. It proves the plumbing (profile, flags, timing cache, pinned
buffers, copies, batch slicing), not TensorRT: the ``gpu`` tests run the real library. The ``stand_in`` fixture
(tests/conftest.py) installs it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx


class FakeTensor:
    def __init__(self, name: str, dtype: str) -> None:
        self.name, self.dtype = name, dtype


class FakeLayer:
    def __init__(self, name: str, outputs: list[tuple[str, str]]) -> None:
        self.name, self._outputs = name, [FakeTensor(*o) for o in outputs]
        self.precision, self.output_types = None, {}

    num_outputs = property(lambda self: len(self._outputs))

    def get_output(self, i: int) -> FakeTensor:
        return self._outputs[i]

    def set_output_type(self, i: int, dtype: str) -> None:
        self.output_types[i] = dtype


class FakeCache:
    def __init__(self, data: bytes) -> None:
        import json

        self.entries = set(json.loads(data)) if data else set()

    def combine(self, other: "FakeCache", ignore_mismatch: bool) -> bool:
        self.entries |= other.entries
        return True

    def serialize(self) -> bytes:
        import json

        return json.dumps(sorted(self.entries)).encode()


def fake_tensorrt(version: str):
    import json
    from types import SimpleNamespace

    import onnxruntime as ort

    trt = SimpleNamespace(__version__=version, float32="float32", float16="float16", int64="int64", uint8="uint8")
    trt.nptype = lambda dtype: {"float32": np.float32, "float16": np.float16, "uint8": np.uint8}[dtype]
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=2: None})
    trt.TensorIOMode = SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=0)
    flags = ["TF32"] + (["FP16", "OBEY_PRECISION_CONSTRAINTS"] if version.startswith("10.") else [])
    trt.BuilderFlag = SimpleNamespace(**{f: f for f in flags})  # 11.x: no FP16 flag at all
    trt.MemoryPoolType = SimpleNamespace(WORKSPACE="workspace")
    trt.parsed = []  # which ONNX files the parser read

    class Network:
        def __init__(self, flags: int) -> None:
            self.flags, self.layers, self.inputs = flags, [], []

        num_inputs = property(lambda self: len(self.inputs))
        num_layers = property(lambda self: len(self.layers))
        get_input = lambda self, i: self.inputs[i]  # noqa: E731
        get_layer = lambda self, i: self.layers[i]  # noqa: E731

    class OnnxParser:
        def __init__(self, network: Network, logger) -> None:
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path: str) -> bool:
            model = onnx.load(path)
            trt.parsed.append(path)
            image = model.graph.input[0]
            dims = [d.dim_value or -1 for d in image.type.tensor_type.shape.dim]
            self.network.inputs.append(SimpleNamespace(name=image.name, shape=tuple(dims)))
            self.network.layers = [FakeLayer(n.name, [(o, "float32") for o in n.output]) for n in model.graph.node]
            self.network.onnx_path = path
            return True

    class Config:
        def __init__(self) -> None:
            self.flags, self.profiles, self.cache = {"TF32"}, [], None

        def set_memory_pool_limit(self, pool, size: int) -> None:
            self.workspace = size

        set_flag = lambda self, f: self.flags.add(f)  # noqa: E731
        clear_flag = lambda self, f: self.flags.discard(f)  # noqa: E731
        create_timing_cache = lambda self, data: FakeCache(data)  # noqa: E731
        add_optimization_profile = lambda self, p: self.profiles.append(p)  # noqa: E731
        get_timing_cache = lambda self: self.cache  # noqa: E731

        def set_timing_cache(self, cache: FakeCache, ignore_mismatch: bool) -> bool:
            self.cache = cache
            return True

    class Profile:
        def set_shape(self, name: str, lo, opt, hi) -> None:
            self.name, self.shapes = name, (tuple(lo), tuple(opt), tuple(hi))

    class Builder:
        def __init__(self, logger) -> None:
            pass

        create_network = lambda self, flags: Network(flags)  # noqa: E731
        create_builder_config = lambda self: Config()  # noqa: E731
        create_optimization_profile = lambda self: Profile()  # noqa: E731

        def build_serialized_network(self, network: Network, config: Config) -> bytes:
            if config.cache is not None:
                config.cache.entries.add(Path(network.onnx_path).name)
            (profile,) = config.profiles
            return json.dumps({"onnx": Path(network.onnx_path).read_bytes().hex(), "shapes": profile.shapes,
                               "input": profile.name, "flags": sorted(config.flags),
                               "fp32_layers": sum(layer.precision == "float32" for layer in network.layers)}).encode()

    class Context:
        def __init__(self, engine) -> None:
            self.engine, self.addresses, self.shape = engine, {}, None

        def set_input_shape(self, name: str, shape) -> bool:
            self.shape = tuple(shape)
            return self.engine.shapes[0][0] <= self.shape[0] <= self.engine.shapes[2][0]

        def get_tensor_shape(self, name: str):
            return (self.shape[0], self.engine.num_classes)

        def set_tensor_address(self, name: str, ptr: int) -> None:
            self.addresses[name] = ptr

        def execute_async_v3(self, stream_handle: int) -> bool:
            import ctypes

            count = int(np.prod(self.shape))
            images = np.frombuffer((ctypes.c_uint8 * count).from_address(self.addresses["image"]), np.uint8)
            logits = self.engine.session.run(None, {"image": images.reshape(self.shape)})[0].astype(np.float32)
            ctypes.memmove(self.addresses["logits"], logits.ctypes.data, logits.nbytes)
            return True

    class Engine:
        def __init__(self, plan: bytes) -> None:
            record = json.loads(plan)
            self.record, self.shapes = record, record["shapes"]
            self.session = ort.InferenceSession(bytes.fromhex(record["onnx"]), providers=["CPUExecutionProvider"])
            self.num_classes = self.session.get_outputs()[0].shape[1]

        num_io_tensors = 2
        get_tensor_name = lambda self, i: ["image", "logits"][i]  # noqa: E731
        get_tensor_mode = lambda self, n: "in" if n == "image" else "out"  # noqa: E731
        get_tensor_dtype = lambda self, n: "uint8" if n == "image" else "float32"  # noqa: E731
        get_tensor_profile_shape = lambda self, n, i: self.shapes  # noqa: E731
        create_execution_context = lambda self: Context(self)  # noqa: E731

    trt.Builder, trt.OnnxParser = Builder, OnnxParser
    trt.Runtime = type("Runtime", (), {"__init__": lambda self, logger: None,
                                       "deserialize_cuda_engine": lambda self, plan: Engine(plan)})
    return trt


def fake_cudart():
    import ctypes
    from types import SimpleNamespace

    memory: dict[int, ctypes.Array] = {}

    def alloc(nbytes: int):
        buffer = ctypes.create_string_buffer(nbytes)
        memory[ctypes.addressof(buffer)] = buffer
        return 0, ctypes.addressof(buffer)

    def free(ptr: int):
        memory.pop(int(ptr))
        return (0,)

    def copy(dst: int, src: int, count: int, kind, stream):
        ctypes.memmove(int(dst), int(src), count)
        return (0,)

    class Stream(int):
        pass

    return SimpleNamespace(
        memory=memory, cudaMalloc=alloc, cudaMallocHost=alloc, cudaFree=free, cudaFreeHost=free,
        cudaMemcpyAsync=copy, cudaStreamCreate=lambda: (0, Stream(7)), cudaStreamSynchronize=lambda s: (0,),
        cudaStreamDestroy=lambda s: (0,), cudaGetDeviceCount=lambda: (0, 1), cudaGetDevice=lambda: (0, 0),
        cudaGetDeviceProperties=lambda d: (0, SimpleNamespace(name=b"Stand-in GPU\x00", major=8, minor=9)),
        cudaRuntimeGetVersion=lambda: (0, 12040), cudaDriverGetVersion=lambda: (0, 12060),
        cudaMemcpyKind=SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2))
