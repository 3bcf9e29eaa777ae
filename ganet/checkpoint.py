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

__all__ = ["CheckpointError", "CheckpointInfo", "FORMAT", "FORMAT_VERSION", "load_checkpoint",
           "read_checkpoint_info", "save_checkpoint"]

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


def _read_header(path: Path) -> dict[str, Any]:
    """Parse and sanity-check a safetensors header: the file must be complete and hold our metadata."""
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
    data_end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + data_end != size:
        raise CheckpointError(path, f"truncated or corrupt: the header describes {8 + header_len + data_end} bytes "
                                    f"but the file has {size}")
    return header


def read_checkpoint_info(path: str | os.PathLike) -> CheckpointInfo:
    """Read and validate a checkpoint's metadata (no torch needed). Raises :class:`CheckpointError`."""
    path = Path(path)
    meta = _read_header(path).get("__metadata__") or {}
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
        info = CheckpointInfo(
            model=meta["model"],
            num_classes=int(meta["num_classes"]),
            labels=tuple(json.loads(meta["labels"])),
            preprocessing=Preprocessing.from_dict(json.loads(meta["preprocessing"])),
            model_kwargs=json.loads(meta.get("model_kwargs", "{}")),
            extra=json.loads(meta.get("extra", "{}")),
            format_version=version,
            path=path,
        )
    except (ValueError, TypeError) as e:
        raise CheckpointError(path, f"invalid metadata: {e}") from None
    if len(info.labels) != info.num_classes:
        raise CheckpointError(path, f"has {len(info.labels)} labels for {info.num_classes} classes")
    return info


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
    """Rebuild the model a checkpoint describes, load its weights (strictly) and return ``(model.eval(), info)``."""
    device = str(device)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ganet.models import create_model

    info = read_checkpoint_info(path)
    try:
        model = create_model(info.model, num_classes=info.num_classes, **info.model_kwargs)
    except (ValueError, TypeError) as e:
        raise CheckpointError(path, f"cannot build its model: {e}") from None
    try:
        state = load_file(str(path), device=device)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(path, f"cannot read its tensors: {e}") from None
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(path, f"weights do not match model {info.model!r}: missing {result.missing_keys[:5]}, "
                                    f"unexpected {result.unexpected_keys[:5]}")
    return model.to(device).eval(), info


def _num_classes(model: nn.Module) -> int:
    n = getattr(model, "num_classes", None)
    if not isinstance(n, int):
        raise ValueError("save_checkpoint: the model has no integer num_classes attribute")
    return n
