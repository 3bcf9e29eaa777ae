"""A Triton Inference Server model repository for an exported model: the path past one serving process.

Layout (Triton's model repository convention)::

    <repo>/<model>/config.pbtxt
    <repo>/<model>/1/model.onnx      (platform onnxruntime_onnx)   or   1/model.plan   (platform tensorrt_plan)
    <repo>/<model>/labels.txt        (the output's label_filename: one label per line, in logit order)

``config.pbtxt`` is protobuf text of Triton's ``ModelConfig`` (``model_config.proto``; the tests parse it with the
copy ``tritonclient[grpc]`` ships). The model directory is assembled beside its final place and renamed into it,
so a reader sees the old version or the new one, never half of one.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from ganet._io import atomic_write_bytes

__all__ = ["PLATFORMS", "render_config_pbtxt", "write_triton_repository", "default_preferred_batch_sizes"]

PLATFORMS = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan"}
LABELS_FILE = "labels.txt"
_DTYPES = {"uint8": "TYPE_UINT8", "int8": "TYPE_INT8", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
           "float16": "TYPE_FP16", "float32": "TYPE_FP32", "bfloat16": "TYPE_BF16", "bool": "TYPE_BOOL"}
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
# ONNX Runtime backend parameters (triton-inference-server/onnxruntime_backend README, "Model Config Options").
# Threads 0 = ORT's default (one per physical core); sequential execution suits this chain-shaped CNN.
_ORT_PARAMETERS = {"intra_op_thread_count": "0", "inter_op_thread_count": "0", "execution_mode": "0",
                   "enable_mem_arena": "1", "enable_mem_pattern": "1"}


def default_preferred_batch_sizes(max_batch: int) -> list[int]:
    """Powers of two from 4 up to ``max_batch``, and ``max_batch`` itself."""
    sizes = {b for b in (4, 8, 16, 32, 64, 128, 256) if b <= max_batch} | {max_batch}
    return sorted(sizes)


def _dtype(name: str) -> str:
    key = name.lower().removeprefix("type_")
    aliases = {"fp16": "float16", "fp32": "float32", "bf16": "bfloat16", "float": "float32", "half": "float16"}
    key = aliases.get(key, key)
    if key not in _DTYPES:
        raise ValueError(f"unsupported tensor dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[key]


def _check_dims(dims: list[int]) -> list[int]:
    if not dims or any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in dims):
        raise ValueError(f"input_dims must be the per-sample shape without the batch axis, positive integers "
                         f"(e.g. [3, 224, 224]), got {dims!r}")
    return list(dims)


def render_config_pbtxt(*, model_name: str, platform: str, input_name: str, input_dtype: str, input_dims: list[int],
                        output_name: str, num_classes: int, max_batch: int,
                        preferred_batch_sizes: list[int] | None = None, max_queue_delay_us: int = 100,
                        instance_count: int = 1, instance_kind: str | None = None,
                        label_filename: str = LABELS_FILE) -> str:
    """The ``config.pbtxt`` text. Dims exclude the batch axis (Triton adds it when ``max_batch_size`` > 0).

    Dynamic batching gathers requests up to ``max_batch`` and waits at most ``max_queue_delay_us`` for a preferred
    size. Instances: ``KIND_GPU`` for a TensorRT plan (it only runs on a GPU), ``KIND_AUTO`` for ONNX (GPU if
    there is one, else CPU).
    """
    if platform not in PLATFORMS:
        raise ValueError(f"unknown Triton platform {platform!r}; expected one of {sorted(PLATFORMS)}")
    if not _NAME.match(model_name):
        raise ValueError(f"model_name {model_name!r} must be a plain directory name (letters, digits, '_', '.', '-')")
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    sizes = default_preferred_batch_sizes(max_batch) if preferred_batch_sizes is None else list(preferred_batch_sizes)
    if not sizes or any(not 1 <= s <= max_batch for s in sizes):
        raise ValueError(f"preferred_batch_sizes must lie in 1..{max_batch}, got {sizes}")
    kind = instance_kind or ("KIND_GPU" if platform == "tensorrt_plan" else "KIND_AUTO")
    if kind not in ("KIND_AUTO", "KIND_GPU", "KIND_CPU"):
        raise ValueError(f"instance_kind must be KIND_AUTO, KIND_GPU or KIND_CPU, got {kind!r}")
    if platform == "tensorrt_plan" and kind == "KIND_CPU":
        raise ValueError("a TensorRT plan cannot run on KIND_CPU instances")

    dims = ", ".join(str(d) for d in _check_dims(input_dims))
    lines = [
        f'name: "{model_name}"',
        f'platform: "{platform}"',
        f"max_batch_size: {max_batch}",
        "input [",
        "  {",
        f'    name: "{input_name}"',
        f"    data_type: {_dtype(input_dtype)}",
        f"    dims: [ {dims} ]",
        "  }",
        "]",
        "output [",
        "  {",
        f'    name: "{output_name}"',
        "    data_type: TYPE_FP32",
        f"    dims: [ {num_classes} ]",
        f'    label_filename: "{label_filename}"',
        "  }",
        "]",
        "dynamic_batching {",
        f"  preferred_batch_size: [ {', '.join(str(s) for s in sizes)} ]",
        f"  max_queue_delay_microseconds: {max_queue_delay_us}",
        "}",
        "instance_group [",
        "  {",
        f"    count: {instance_count}",
        f"    kind: {kind}",
        "  }",
        "]",
    ]
    if platform == "onnxruntime_onnx":
        lines += ["optimization {", "  graph { level: 1 }", "}"]  # ORT basic + extended graph optimizations
        for key, value in _ORT_PARAMETERS.items():
            lines.append(f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}')
    return "\n".join(lines) + "\n"


def _external_data_files(model_file: Path) -> list[Path]:
    """Files an ONNX model keeps its weights in (external data), which must travel with it."""
    import onnx

    model = onnx.load(str(model_file), load_external_data=False)
    files = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next(e.value for e in tensor.external_data if e.key == "location")
            files.add(model_file.parent / location)
    return sorted(files)


def write_triton_repository(repo_dir: Path, *, model_name: str, model_file: Path, platform: str, input_name: str,
                            input_dtype: str, input_dims: list[int], output_name: str, num_classes: int,
                            labels: list[str], max_batch: int, **config_options) -> Path:
    """Write ``<repo_dir>/<model_name>/`` (config, version 1 model file, labels); returns that model directory.

    ``input_dims`` is the per-sample shape without the batch axis, e.g. ``[3, 224, 224]``. An existing model
    directory of the same name is replaced as a whole. ``config_options`` go to ``render_config_pbtxt``
    (``preferred_batch_sizes``, ``max_queue_delay_us``, ``instance_count``, ``instance_kind``).
    """
    repo_dir, model_file = Path(repo_dir), Path(model_file)
    if not model_file.is_file():
        raise FileNotFoundError(f"write_triton_repository: no model file at {model_file}")
    expected_suffix = {"onnxruntime_onnx": (".onnx",), "tensorrt_plan": (".plan", ".engine")}.get(platform, ())
    if expected_suffix and model_file.suffix not in expected_suffix:
        raise ValueError(f"platform {platform!r} expects a {' or '.join(expected_suffix)} file, got {model_file.name}")
    if len(labels) != num_classes or any(not isinstance(label, str) or "\n" in label for label in labels):
        raise ValueError(f"labels must be {num_classes} single-line strings (one per class), got {len(labels)}")
    config = render_config_pbtxt(model_name=model_name, platform=platform, input_name=input_name,
                                 input_dtype=input_dtype, input_dims=input_dims, output_name=output_name,
                                 num_classes=num_classes, max_batch=max_batch, **config_options)

    repo_dir.mkdir(parents=True, exist_ok=True)
    final = repo_dir / model_name
    staging = Path(tempfile.mkdtemp(prefix=f".{model_name}.", dir=repo_dir))
    os.chmod(staging, 0o755)  # mkdtemp makes it private; the server may run as another user
    try:
        atomic_write_bytes(staging / "config.pbtxt", config.encode())
        atomic_write_bytes(staging / LABELS_FILE, ("\n".join(labels) + "\n").encode())
        version_dir = staging / "1"
        atomic_write_bytes(version_dir / PLATFORMS[platform], model_file.read_bytes())
        if platform == "onnxruntime_onnx":
            for data_file in _external_data_files(model_file):
                atomic_write_bytes(version_dir / data_file.relative_to(model_file.parent), data_file.read_bytes())
        old = None
        if final.exists():
            old = repo_dir / f".{model_name}.old.{os.getpid()}"
            os.replace(final, old)
        os.replace(staging, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final
