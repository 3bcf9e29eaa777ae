"""What ``ganet-serve`` checks before it turns ready, so that a model that would answer wrongly never answers.

1. Integrity: the SHA-256 and size of every file it is about to load, against the export's ``manifest.json``
   (``ganet.export.verify.file_problem``, the check ``ganet-export --verify`` makes), before any of them is
   parsed. A flipped byte in ``model.fused.onnx`` is refused, not served with logits off by 2e32. Cost: one read
   of each file (tens of milliseconds for a 224x224 ShuffleNet export; measured in the start-up log,
   ``"event": "integrity"``). ``--skip-verify`` skips it, for people who know why.
2. Contract: the graph's declared input and output against the manifest (``input_size``, labels), then one image
   through each loaded instance, whose output must have one logit per label.

Every failure raises :class:`StartupError`: one line that names the file and the problem, which the CLI prints
and exits 2 with.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from ganet.serve.backends import Backend, ModelSpec, choose_backend
from ganet.serve.settings import ServeSettings

__all__ = ["StartupError", "verify_integrity", "check_contract", "files_to_load"]

log = logging.getLogger("ganet.serve")


class StartupError(RuntimeError):
    """The model cannot be served: ``str(e)`` is one line naming the file and the problem."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()


def files_to_load(s: ServeSettings) -> tuple[list[str], str]:
    """The export's files (relative paths) that serving ``s.model`` with its backend will read, and the backend."""
    from ganet.export.manifest import load_manifest

    backend, _ = choose_backend(Path(s.model), s.backend, s.precision)
    manifest = load_manifest(s.model)
    kinds = {"onnxruntime": ["onnx_int8"] if s.precision == "int8" else
             (["onnx", "onnx_fused"] if s.fused_kernels else ["onnx"]),
             "tensorrt": ["tensorrt"], "torch": []}.get(backend, [])
    return [a.file for kind in kinds if (a := manifest.artifact(kind)) is not None], backend


def verify_integrity(s: ServeSettings) -> dict:
    """Hash every file the service will load against the manifest; StartupError naming the first that differs.
    Returns what was checked (for the log)."""
    model = Path(s.model)
    if model.is_file():  # a checkpoint: no manifest to check against (load_checkpoint validates its header)
        return {"files": [], "why": "a checkpoint has no manifest; its safetensors header is validated on load"}
    from ganet.export.manifest import load_manifest, sha256_file
    from ganet.export.verify import file_problem

    start = time.perf_counter()
    manifest = load_manifest(model)
    files, backend = files_to_load(s)
    nbytes = 0
    for rel in files:
        if (problem := file_problem(manifest, rel)) is not None:
            raise StartupError(f"{model / rel}: {problem}: the file changed since the export; re-export it, or "
                               "start with --skip-verify if you know why it differs")
        nbytes += manifest.files[rel].bytes
    if backend == "torch":  # an export served by the torch backend loads the checkpoint it records
        ckpt = Path(manifest.checkpoint.get("path", ""))
        if ckpt.is_file() and manifest.checkpoint.get("sha256") not in (None, sha256_file(ckpt)):
            raise StartupError(f"{ckpt}: sha256 differs from the one {model / 'manifest.json'} records: the "
                               "checkpoint changed since the export")
        files.append(str(ckpt))
    return {"files": files, "bytes": nbytes, "ms": round((time.perf_counter() - start) * 1e3, 2)}


def check_contract(backends: list[Backend], spec: ModelSpec, model: Path) -> None:
    """The graph takes (B, 3, S, S) with S the manifest's input_size and gives one logit per label; checked on the
    declared shapes (ONNX Runtime) and by running one image through every instance."""
    s, classes = spec.preprocessing.input_size, spec.num_classes
    for backend in backends:
        session = getattr(backend, "session", None)
        where = getattr(session, "_model_path", None) or getattr(backend, "path", None) or model
        if session is not None and hasattr(session, "get_inputs"):
            declared_in = session.get_inputs()[0].shape  # ['batch', 3, S, S]
            declared_out = session.get_outputs()[0].shape  # ['batch', C]
            if [d for d in declared_in[1:]] != [3, s, s]:
                raise StartupError(f"{where}: the graph takes {declared_in[1:]} images, but the manifest's "
                                   f"preprocessing.input_size is {s} (expected [3, {s}, {s}])")
            if isinstance(declared_out[-1], int) and declared_out[-1] != classes:
                raise StartupError(f"{where}: the graph gives {declared_out[-1]} logits, but the manifest has "
                                   f"{classes} labels")
        try:
            out = np.asarray(backend(np.zeros((1, 3, s, s), np.uint8)))
        except Exception as e:
            raise StartupError(f"{where}: one {s}x{s} image through the model failed ({_first_line(e)})") from None
        if out.shape != (1, classes):
            raise StartupError(f"{where}: the model gives logits of shape {list(out.shape)} for one image, but "
                               f"there are {classes} labels (expected [1, {classes}])")
        if not np.all(np.isfinite(out)):
            raise StartupError(f"{where}: the model gives non-finite logits for a blank image (corrupt weights?)")
