"""The one checkpoint format: a single ``.safetensors`` file whose metadata says how to rebuild and feed the model.

Metadata keys (all strings, as safetensors requires; JSON where structured):

=================  ==========================================================================
``format``          ``"ganet.checkpoint"``: tells our files from other safetensors files
``format_version``  integer; a reader refuses versions newer than it knows
``model``           registered model name, e.g. ``"ga_shufflenet_v2_cifar"``
``num_classes``     integer
``labels``          JSON list of ``num_classes`` label names
``preprocessing``   JSON of :class:`ganet.preprocess.Preprocessing`
``model_kwargs``    JSON dict of extra builder arguments (e.g. GA ablation switches)
``extra``           JSON dict of free-form provenance (training run, data set, metrics)
``ganet_version``   the writer's version
=================  ==========================================================================

Reading never unpickles anything. :func:`read_checkpoint_info` parses only the header and needs neither torch nor
torchvision, so a serving host can inspect a checkpoint without them.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ganet._io import FileProblemError, atomic_write_bytes
from ganet.preprocess import Preprocessing

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["CheckpointError", "CheckpointInfo", "FORMAT", "FORMAT_VERSION", "TensorEntry", "load_checkpoint",
           "read_checkpoint_info", "read_tensor_file_header", "save_checkpoint"]

FORMAT = "ganet.checkpoint"
FORMAT_VERSION = 1
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


class CheckpointError(FileProblemError):
    """A checkpoint file that cannot be used; the message names the file and what is wrong with it."""


@dataclass(frozen=True)
class CheckpointInfo:
    """Everything a checkpoint says about its model, without the weights."""

    model: str
    num_classes: int
    labels: tuple[str, ...]
    preprocessing: Preprocessing
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    path: Path | None = None

    def to_metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "format_version": str(self.format_version),
            "model": self.model,
            "num_classes": str(self.num_classes),
            "labels": json.dumps(list(self.labels)),
            "preprocessing": json.dumps(self.preprocessing.to_dict()),
            "model_kwargs": json.dumps(self.model_kwargs),
            "extra": json.dumps(self.extra),
            "ganet_version": _ganet_version(),
        }


def _ganet_version() -> str:
    from ganet import __version__

    return __version__


# safetensors' dtypes: element bytes, and the kind a model's tensor must have to take its values.
_DTYPES: dict[str, tuple[int, str]] = {
    "BOOL": (1, "bool"), "U8": (1, "int"), "I8": (1, "int"), "U16": (2, "int"), "I16": (2, "int"),
    "U32": (4, "int"), "I32": (4, "int"), "U64": (8, "int"), "I64": (8, "int"),
    "F8_E4M3": (1, "float"), "F8_E5M2": (1, "float"), "F16": (2, "float"), "BF16": (2, "float"),
    "F32": (4, "float"), "F64": (8, "float"), "C64": (8, "complex"),
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the file's header describes it."""

    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int]  # [begin, end) in the data section

    @property
    def kind(self) -> str:
        return _DTYPES[self.dtype][1]


def _parse_entry(path: Path, name: str, entry: Any) -> TensorEntry:
    """A header entry, checked the way safetensors checks it before it maps anything."""
    where = f"tensor {name[:80]!r} in the header"
    if not isinstance(entry, dict):
        raise CheckpointError(path, f"corrupt header: {where} is a JSON {type(entry).__name__}, not an object with "
                                    "dtype, shape and data_offsets")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise CheckpointError(path, f"corrupt header: {where} has no {', '.join(missing)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise CheckpointError(path, f"corrupt header: {where} has dtype {str(dtype)[:40]!r}; known dtypes: "
                                    f"{', '.join(_DTYPES)}")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise CheckpointError(path, f"corrupt header: {where} has shape {str(shape)[:80]}; expected a list of "
                                    "non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(path, f"corrupt header: {where} has data_offsets {str(offsets)[:80]}; expected "
                                    "[begin, end] with 0 <= begin <= end")
    numel = 1
    for d in shape:
        numel *= d
    if offsets[1] - offsets[0] != numel * _DTYPES[dtype][0]:
        raise CheckpointError(path, f"corrupt header: {where} is {dtype} {shape} ({numel * _DTYPES[dtype][0]} "
                                    f"bytes) but its data_offsets span {offsets[1] - offsets[0]} bytes")
    return TensorEntry(dtype, tuple(shape), (offsets[0], offsets[1]))


def read_tensor_file_header(path: str | os.PathLike) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and check a safetensors file's header without torch: ``(tensors by name, metadata)``.

    Everything safetensors would refuse (and what would make a loader fail later with a traceback) is refused here
    with a :class:`CheckpointError` naming the file: a short or truncated file, a header that is not a JSON object
    (or nests too deep to parse), an entry that is not an object or lacks ``dtype``/``shape``/``data_offsets``, an
    unknown dtype, offsets that disagree with the shape, that overlap or leave gaps, or a data section whose size
    differs from the file's.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "no such file")
    if not path.is_file():
        raise CheckpointError(path, "not a file")
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(path, f"truncated or not a checkpoint: {size} bytes, too short for a safetensors "
                                        "header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(path, f"truncated or not a safetensors file: the header claims {header_len} bytes "
                                        f"but the file has {size}")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(path, "not a safetensors file (its header is not a JSON object)") from None
    except RecursionError:
        raise CheckpointError(path, "corrupt header: JSON nested too deep to parse") from None
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(path, "corrupt header: __metadata__ must be an object of strings")
    tensors = {name: _parse_entry(path, name, entry) for name, entry in header.items()}
    data_end = 0
    for name, t in sorted(tensors.items(), key=lambda item: item[1].offsets):
        if t.offsets[0] != data_end:  # safetensors' own rule: the tensors tile the data section in order
            raise CheckpointError(path, f"corrupt header: tensor {name[:80]!r} starts at byte {t.offsets[0]} of the "
                                        f"data, expected {data_end} (tensors overlap or leave a gap)")
        data_end = t.offsets[1]
    if 8 + header_len + data_end != size:
        raise CheckpointError(path, f"truncated or corrupt: the header describes {8 + header_len + data_end} bytes "
                                    f"but the file has {size}")
    return tensors, meta


def _info_from_metadata(path: Path, meta: dict[str, str]) -> CheckpointInfo:
    if meta.get("format") != FORMAT:
        raise CheckpointError(path, f"not a ganet checkpoint (a safetensors file without format={FORMAT!r} "
                                    "metadata; write checkpoints with ganet.save_checkpoint)")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise CheckpointError(path, f"invalid format_version {meta.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise CheckpointError(path, f"written by a newer ganet (checkpoint format {version}; this ganet "
                                    f"{_ganet_version()} reads up to {FORMAT_VERSION}): upgrade ganet")
    missing = [k for k in ("model", "num_classes", "labels", "preprocessing") if k not in meta]
    if missing:
        raise CheckpointError(path, f"metadata is missing {', '.join(missing)}")
    try:
        labels = json.loads(meta["labels"])
        model_kwargs, extra = json.loads(meta.get("model_kwargs", "{}")), json.loads(meta.get("extra", "{}"))
        if not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
            raise ValueError("labels must be a JSON list of strings")
        if not (isinstance(model_kwargs, dict) and isinstance(extra, dict)):
            raise ValueError("model_kwargs and extra must be JSON objects")
        preprocessing = json.loads(meta["preprocessing"])
        if not isinstance(preprocessing, dict):
            raise ValueError("preprocessing must be a JSON object")
        info = CheckpointInfo(
            model=meta["model"],
            num_classes=int(meta["num_classes"]),
            labels=tuple(labels),
            preprocessing=Preprocessing.from_dict(preprocessing),
            model_kwargs=model_kwargs,
            extra=extra,
            format_version=version,
            path=path,
        )
    except (ValueError, TypeError) as e:
        raise CheckpointError(path, f"invalid metadata: {e}") from None
    except RecursionError:
        raise CheckpointError(path, "invalid metadata: JSON nested too deep to parse") from None
    if info.num_classes < 1:
        raise CheckpointError(path, f"invalid metadata: num_classes must be >= 1, got {info.num_classes}")
    if len(info.labels) != info.num_classes:
        raise CheckpointError(path, f"has {len(info.labels)} labels for {info.num_classes} classes")
    return info


def read_checkpoint_info(path: str | os.PathLike) -> CheckpointInfo:
    """Read and validate a checkpoint's metadata (no torch needed). Raises :class:`CheckpointError`."""
    path = Path(path)
    return _info_from_metadata(path, read_tensor_file_header(path)[1])


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    model_name: str,
    labels: list[str] | tuple[str, ...] | None = None,
    preprocessing: Preprocessing | None = None,
    model_kwargs: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model``'s weights and metadata to ``path`` atomically (temp file, fsync, rename).

    ``labels`` default to ``"0" .. "N-1"``; ``preprocessing`` to the model's standard definition.
    """
    from safetensors.torch import save

    from ganet.models import model_info

    info_model = model_info(model_name)  # raises ValueError for an unknown name
    num_classes = _num_classes(model)
    labels = tuple(str(i) for i in range(num_classes)) if labels is None else tuple(str(x) for x in labels)
    if len(labels) != num_classes:
        raise ValueError(f"save_checkpoint: {len(labels)} labels for a model with {num_classes} classes")
    info = CheckpointInfo(
        model=model_name,
        num_classes=num_classes,
        labels=labels,
        preprocessing=preprocessing or info_model.default_preprocessing(),
        model_kwargs=dict(model_kwargs or {}),
        extra=dict(extra or {}),
    )
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return atomic_write_bytes(path, save(tensors, metadata=info.to_metadata()))


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, CheckpointInfo]:
    """Rebuild the model a checkpoint describes, load its weights (strictly) and return ``(model.eval(), info)``.

    Before any tensor is read, the header's names, shapes and dtypes are checked against the architecture the
    metadata names, and its input size against the one that architecture is built for: a file that does not fit
    is refused with a :class:`CheckpointError` in well under a second, whatever it would cost to run.
    """
    device = str(device)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ganet.models import create_model, model_info

    path = Path(path)
    tensors, meta = read_tensor_file_header(path)
    info = _info_from_metadata(path, meta)
    try:
        problem = model_info(info.model).input_size_problem(info.preprocessing.input_size)
        model = create_model(info.model, num_classes=info.num_classes, **info.model_kwargs)
    except (ValueError, TypeError) as e:
        raise CheckpointError(path, f"cannot build its model: {e}") from None
    if problem:
        raise CheckpointError(path, f"its metadata does not fit together: {problem}")
    _check_tensors_fit(path, info.model, model, tensors)
    try:
        state = load_file(str(path), device=device)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(path, f"cannot read its tensors: {e}") from None
    model.load_state_dict(state, strict=True)  # names, shapes and dtype kinds were checked above
    return model.to(device).eval(), info


def _tensor_kind(t: torch.Tensor) -> str:
    import torch

    return ("bool" if t.dtype == torch.bool else "complex" if t.is_complex()
            else "float" if t.is_floating_point() else "int")


def _check_tensors_fit(path: Path, model_name: str, model: nn.Module, tensors: dict[str, TensorEntry]) -> None:
    """Every tensor of ``model`` in the file, with its shape and a dtype of its kind, and nothing else."""
    mine = model.state_dict()
    missing = [k for k in mine if k not in tensors]
    unexpected = [k for k in tensors if k not in mine]
    wrong = [f"{k} is {tensors[k].dtype} {list(tensors[k].shape)}, the model's is "
             f"{str(v.dtype).removeprefix('torch.')} {list(v.shape)}"
             for k, v in mine.items() if k in tensors
             and (tensors[k].shape != tuple(v.shape) or tensors[k].kind != _tensor_kind(v))]
    if not (missing or unexpected or wrong):
        return
    parts = [f"{label} ({len(names)}): {', '.join(n[:80] for n in names[:3])}{', ...' if len(names) > 3 else ''}"
             for label, names in (("missing", missing), ("unexpected", unexpected), ("mismatched", wrong)) if names]
    raise CheckpointError(path, f"weights do not match model {model_name!r}, which its metadata names: "
                                + "; ".join(parts))


def _num_classes(model: nn.Module) -> int:
    n = getattr(model, "num_classes", None)
    if not isinstance(n, int):
        raise ValueError("save_checkpoint: the model has no integer num_classes attribute")
    return n
