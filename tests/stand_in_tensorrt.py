"""A CPU stand-in for ``tensorrt`` and cuda-python's runtime, for tests of the TensorRT plumbing where neither exists.

The calls ``ganet.export.tensorrt`` and ``ganet.serve.trt_graphs`` make, with the signatures the TensorRT 10/11
Python docs and cuda-python's runtime bindings give; "device" memory is host memory and the engine runs ONNX
Runtime. Stream capture behaves as the CUDA runtime documents it: work enqueued on a capturing stream is recorded,
not run, until ``cudaStreamEndCapture``; ``cudaGraphLaunch`` runs the recording; synchronising a capturing stream
fails and invalidates the capture (``cudaErrorStreamCaptureUnsupported``, then ``cudaErrorStreamCaptureInvalidated``
from the end call); the legacy default stream (0) cannot capture. ``fail`` injects an error code into a named call.
It proves the plumbing (profile, flags, timing cache, pinned buffers, copies, batch slicing, graph capture and its
fallbacks), not TensorRT: the ``gpu`` tests run the real library. The ``stand_in`` fixture (tests/conftest.py)
installs it.
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


def fake_tensorrt(version: str, cudart=None):
    """``cudart``: the stand-in runtime whose streams the engine's enqueues go to (recorded while capturing)."""
    import json
    from types import SimpleNamespace

    import onnxruntime as ort

    trt = SimpleNamespace(__version__=version, float32="float32", float16="float16", int64="int64", uint8="uint8")
    user_memory = tuple(int(v) for v in version.split(".")[:2]) >= (10, 1)  # USER_MANAGED contexts since 10.1
    if user_memory:
        trt.ExecutionContextAllocationStrategy = SimpleNamespace(STATIC=0, ON_PROFILE_CHANGE=1, USER_MANAGED=2)
    trt.capture_breaks = False  # True: enqueue synchronises its stream, as an engine TensorRT cannot capture does
    trt.direct_runs = 0  # enqueues that ran at once (not recorded in a graph)
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
        def __init__(self, engine, strategy: int = 0) -> None:
            self.engine, self.addresses, self.shape = engine, {}, None
            self.strategy, self.device_memory = strategy, None

        def set_device_memory(self, memory: int, size: int) -> None:
            assert self.strategy == 2 and size >= self.engine.device_memory_size_v2
            self.device_memory = (memory, size)

        def set_input_shape(self, name: str, shape) -> bool:
            self.shape = tuple(shape)
            return self.engine.shapes[0][0] <= self.shape[0] <= self.engine.shapes[2][0]

        def get_tensor_shape(self, name: str):
            return (self.shape[0], self.engine.num_classes)

        def set_tensor_address(self, name: str, ptr: int) -> None:
            self.addresses[name] = ptr

        def execute_async_v3(self, stream_handle: int) -> bool:
            import ctypes

            if self.strategy == 2 and self.device_memory is None:
                return False  # USER_MANAGED without memory: TensorRT refuses to run
            shape, addresses = self.shape, dict(self.addresses)  # what a recording keeps: this call's state

            def run() -> None:
                count = int(np.prod(shape))
                images = np.frombuffer((ctypes.c_uint8 * count).from_address(addresses["image"]), np.uint8)
                logits = self.engine.session.run(None, {"image": images.reshape(shape)})[0].astype(np.float32)
                ctypes.memmove(addresses["logits"], logits.ctypes.data, logits.nbytes)

            if cudart is None:
                run()
                return True
            if trt.capture_breaks:
                cudart.cudaStreamSynchronize(stream_handle)
            if not cudart.capturing(stream_handle):
                trt.direct_runs += 1
            cudart.enqueue(stream_handle, run)
            return True

    class Engine:
        def __init__(self, plan: bytes) -> None:
            record = json.loads(plan)
            self.record, self.shapes = record, record["shapes"]
            self.session = ort.InferenceSession(bytes.fromhex(record["onnx"]), providers=["CPUExecutionProvider"])
            self.num_classes = self.session.get_outputs()[0].shape[1]

        num_io_tensors = 2
        device_memory_size_v2 = 4096
        get_tensor_name = lambda self, i: ["image", "logits"][i]  # noqa: E731
        get_tensor_mode = lambda self, n: "in" if n == "image" else "out"  # noqa: E731
        get_tensor_dtype = lambda self, n: "uint8" if n == "image" else "float32"  # noqa: E731
        get_tensor_profile_shape = lambda self, n, i: self.shapes  # noqa: E731

        def create_execution_context(self, strategy: int = 0) -> Context:
            assert strategy == 0 or user_memory
            self.contexts = getattr(self, "contexts", 0) + 1
            return Context(self, strategy)

    if not user_memory:
        del Engine.device_memory_size_v2
    trt.Builder, trt.OnnxParser = Builder, OnnxParser
    trt.Runtime = type("Runtime", (), {"__init__": lambda self, logger: None,
                                       "deserialize_cuda_engine": lambda self, plan: Engine(plan)})
    return trt


def fake_cudart():
    import ctypes
    from types import SimpleNamespace

    memory: dict[int, ctypes.Array] = {}
    capturing: dict[int, dict] = {}  # stream -> {"ops": [...], "invalidated": bool}
    graphs: set[int] = set()  # live cudaGraph_t / cudaGraphExec_t handles (ids of their op lists)
    UNSUPPORTED, INVALIDATED, ILLEGAL_STATE = 900, 901, 401  # cudaErrorStreamCapture..., cudaErrorIllegalState
    rt = SimpleNamespace(memory=memory, graphs=graphs, fail={}, launches=0)  # fail: call name -> error code

    def error(name: str) -> int:
        return rt.fail.get(name, 0)

    def alloc(nbytes: int):
        buffer = ctypes.create_string_buffer(nbytes)
        memory[ctypes.addressof(buffer)] = buffer
        return 0, ctypes.addressof(buffer)

    def free(ptr: int):
        memory.pop(int(ptr))
        return (0,)

    def enqueue(stream, op) -> None:
        """Run ``op`` now, or record it when ``stream`` is capturing (how the stand-in engine enqueues too)."""
        if int(stream) in capturing:
            capturing[int(stream)]["ops"].append(op)
        else:
            op()

    def copy(dst: int, src: int, count: int, kind, stream):
        enqueue(stream, lambda: ctypes.memmove(int(dst), int(src), count))
        return (0,)

    def synchronize(stream):
        if int(stream) in capturing:  # not allowed while capturing: fails, and the capture is invalidated
            capturing[int(stream)]["invalidated"] = True
            return (UNSUPPORTED,)
        return (0,)

    def begin_capture(stream, mode):
        if error("cudaStreamBeginCapture"):
            return (error("cudaStreamBeginCapture"),)
        if int(stream) == 0 or int(stream) in capturing:
            return (UNSUPPORTED if int(stream) == 0 else ILLEGAL_STATE,)
        capturing[int(stream)] = {"ops": [], "invalidated": False}
        return (0,)

    def end_capture(stream):
        if int(stream) not in capturing:
            return ILLEGAL_STATE, None
        capture = capturing.pop(int(stream))
        if capture["invalidated"] or error("cudaStreamEndCapture"):
            return error("cudaStreamEndCapture") or INVALIDATED, None
        ops = list(capture["ops"])
        graphs.add(id(ops))
        return 0, ops

    def instantiate(graph, flags):
        if error("cudaGraphInstantiate"):
            return error("cudaGraphInstantiate"), None
        graph_exec = list(graph)
        graphs.add(id(graph_exec))
        return 0, graph_exec

    def launch(graph_exec, stream):
        assert id(graph_exec) in graphs, "launch of a destroyed graph"
        rt.launches += 1
        for op in graph_exec:
            enqueue(stream, op)
        return (0,)

    def destroy(graph):
        graphs.remove(id(graph))
        return (0,)

    class Stream(int):
        pass

    for name, value in dict(
            cudaMalloc=alloc, cudaMallocHost=alloc, cudaFree=free, cudaFreeHost=free,
            cudaMemcpyAsync=copy, cudaStreamCreate=lambda: (0, Stream(7)), cudaStreamSynchronize=synchronize,
            cudaStreamDestroy=lambda s: (0,), cudaGetDeviceCount=lambda: (0, 1), cudaGetDevice=lambda: (0, 0),
            cudaGetDeviceProperties=lambda d: (0, SimpleNamespace(name=b"Stand-in GPU\x00", major=8, minor=9)),
            cudaRuntimeGetVersion=lambda: (0, 12040), cudaDriverGetVersion=lambda: (0, 12060),
            cudaMemcpyKind=SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2),
            cudaStreamCaptureMode=SimpleNamespace(cudaStreamCaptureModeGlobal=0, cudaStreamCaptureModeThreadLocal=1,
                                                  cudaStreamCaptureModeRelaxed=2),
            cudaStreamBeginCapture=begin_capture, cudaStreamEndCapture=end_capture,
            cudaGraphInstantiate=instantiate, cudaGraphLaunch=launch, cudaGraphExecDestroy=destroy,
            cudaGraphDestroy=destroy, cudaGetLastError=lambda: (0,), cudaMemGetInfo=lambda: (0, 1 << 30, 1 << 34),
            enqueue=enqueue, capturing=lambda stream: int(stream) in capturing).items():
        setattr(rt, name, value)
    return rt
