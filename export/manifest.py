"""``manifest.json``: what an export directory holds and the exact contract of its models. Torch- and onnx-free.

Serving reads the input contract, preprocessing, labels and artifacts from here; ``ganet-export --verify`` re-hashes
every file listed under ``files``. Layout (``format_version`` 1)::

    {"format": "ganet.export", "format_version": 1, "created": ISO-8601 UTC,
     "model": "ga_shufflenet_v2_cifar", "num_classes": 10, "labels": [...], "max_batch": 32,
     "checkpoint": {"path": absolute path, "sha256": ..., "bytes": ...},
     "input": {"name": "image", "dtype": "uint8", "shape": ["batch", 3, S, S], "dynamic_axes": {"0": "batch"},
               "layout": "NCHW", "color": "RGB", "value_range": [0, 255]},
     "output": {"name": "logits", "dtype": "float32", "shape": ["batch", num_classes], "dynamic_axes": {"0": "batch"}},
     "preprocessing": Preprocessing.to_dict() (geometry before the graph; the graph normalises),
     "onnx": {"opset", "ir_version", "exporter", "dynamo", "export_batch", "simplified"},
     "versions": {"torch", "onnx", "onnxruntime", "tensorrt" (or null), "ganet", "python"},
     "artifacts": [{"kind": "onnx" | "onnx_fused" | "onnx_int8" | "tensorrt", "file", "precision", ...}],  # tensorrt: + the
                                                   # engine info of ganet.export.tensorrt.build_engine
     "parity": {kind: results}, "speed": {...}, "triton": {...} or null,
     "files": {relative path: {"sha256", "bytes"}}}   # every file except manifest.json itself
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ganet._io import FileProblemError
from ganet.preprocess import Preprocessing

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST_FILE", "ARTIFACT_KINDS", "DEFAULT_OPSET", "ManifestError",
           "TensorSpec", "Artifact", "FileEntry", "Manifest", "load_manifest", "sha256_file", "hash_directory"]

FORMAT = "ganet.export"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
ARTIFACT_KINDS = ("onnx", "onnx_fused", "onnx_int8", "tensorrt")
# Opset 18: ReduceMean takes its axes as an input, parsed by TensorRT >= 8.6 and every ONNX Runtime since 1.14.
# (Here, torch-free, so that ganet-export --help answers without importing the exporter.)
DEFAULT_OPSET = 18


class ManifestError(FileProblemError):
    """An export directory whose manifest is missing, corrupt or newer than this ganet reads."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. ``shape`` holds ints and symbolic names (``"batch"``)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    dynamic_axes: dict[int, str]
    layout: str | None = None
    color: str | None = None
    value_range: tuple[float, float] | None = None


@dataclass(frozen=True)
class Artifact:
    kind: str  # one of ARTIFACT_KINDS
    file: str  # relative to the export directory
    precision: str  # "fp32", "fp16", "int8"
    info: dict[str, Any] = field(default_factory=dict)  # the entry less kind/file: precision, engine info, ...


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated ``manifest.json``; ``raw`` keeps every key, including ones this reader does not type."""

    directory: Path
    format_version: int
    model: str
    num_classes: int
    labels: tuple[str, ...]
    preprocessing: Preprocessing
    input: TensorSpec
    output: TensorSpec
    max_batch: int
    artifacts: tuple[Artifact, ...]
    files: dict[str, FileEntry]
    checkpoint: dict[str, Any]
    onnx: dict[str, Any]
    versions: dict[str, Any]
    parity: dict[str, Any]
    raw: dict[str, Any]

    def artifact(self, kind: str) -> Artifact | None:
        """The artifact of ``kind`` (``"onnx"``, ``"onnx_fused"``, ``"onnx_int8"``, ``"tensorrt"``), or None if it was
        not exported."""
        return next((a for a in self.artifacts if a.kind == kind), None)

    def path(self, artifact: Artifact) -> Path:
        return self.directory / artifact.file


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_directory(directory: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``{relative posix path: {"sha256", "bytes"}}`` for every file under ``directory`` except the manifest."""
    directory = Path(directory)
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel != MANIFEST_FILE:
            files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return files


def _spec(d: Any, where: str, path: Path) -> TensorSpec:
    try:
        value_range = d.get("value_range")
        return TensorSpec(
            name=str(d["name"]), dtype=str(d["dtype"]),
            shape=tuple(v if isinstance(v, str) else int(v) for v in d["shape"]),
            dynamic_axes={int(k): str(v) for k, v in d.get("dynamic_axes", {}).items()},
            layout=d.get("layout"), color=d.get("color"),
            value_range=None if value_range is None else (float(value_range[0]), float(value_range[1])),
        )
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise ManifestError(path, f"invalid {where!r} entry ({type(e).__name__}: {e}); expected name, dtype, shape, "
                                  "dynamic_axes") from None


def load_manifest(directory: str | os.PathLike) -> Manifest:
    """Read and validate ``DIRECTORY/manifest.json``. Raises :class:`ManifestError` naming what is wrong."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise ManifestError(directory, "no such export directory (create one with `ganet-export CHECKPOINT "
                                       "--output DIR`)")
    if not path.is_file():
        raise ManifestError(path, "missing: not a ganet export directory (create one with `ganet-export`)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ManifestError(path, f"corrupt: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ManifestError(path, f"not a ganet export manifest (expected \"format\": {FORMAT!r})")
    version = raw.get("format_version")
    if not isinstance(version, int):
        raise ManifestError(path, f"invalid format_version {version!r}; expected an integer")
    if version > FORMAT_VERSION:
        raise ManifestError(path, f"written by a newer ganet (manifest format {version}; this ganet reads up to "
                                  f"{FORMAT_VERSION}): upgrade ganet")
    required = ("model", "num_classes", "labels", "preprocessing", "input", "output", "max_batch", "artifacts",
                "files")
    missing = [k for k in required if k not in raw]
    if missing:
        raise ManifestError(path, f"missing keys {missing}")
    try:
        artifacts = tuple(
            Artifact(kind=str(a["kind"]), file=str(a["file"]), precision=str(a["precision"]),
                     info={k: v for k, v in a.items() if k not in ("kind", "file")})
            for a in raw["artifacts"])
        files = {str(k): FileEntry(str(v["sha256"]), int(v["bytes"])) for k, v in raw["files"].items()}
        manifest = Manifest(
            directory=directory, format_version=version, model=str(raw["model"]),
            num_classes=int(raw["num_classes"]), labels=tuple(str(x) for x in raw["labels"]),
            preprocessing=Preprocessing.from_dict(raw["preprocessing"]),
            input=_spec(raw["input"], "input", path), output=_spec(raw["output"], "output", path),
            max_batch=int(raw["max_batch"]), artifacts=artifacts, files=files,
            checkpoint=dict(raw.get("checkpoint") or {}), onnx=dict(raw.get("onnx") or {}),
            versions=dict(raw.get("versions") or {}), parity=dict(raw.get("parity") or {}), raw=raw,
        )
    except ManifestError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ManifestError(path, f"invalid entry ({type(e).__name__}: {e})") from None
    problems = []
    if len(manifest.labels) != manifest.num_classes:
        problems.append(f"{len(manifest.labels)} labels for num_classes={manifest.num_classes}")
    if manifest.max_batch < 1:
        problems.append(f"max_batch must be >= 1, got {manifest.max_batch}")
    for a in artifacts:
        if a.kind not in ARTIFACT_KINDS:
            problems.append(f"unknown artifact kind {a.kind!r} (expected one of {ARTIFACT_KINDS})")
        if a.file not in files:
            problems.append(f"artifact {a.file!r} is not listed under 'files'")
    if not any(a.kind == "onnx" for a in artifacts):
        problems.append("no 'onnx' artifact")
    if problems:
        raise ManifestError(path, "; ".join(problems))
    return manifest
