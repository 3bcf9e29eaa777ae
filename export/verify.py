"""``ganet-export --verify DIR``: re-hash every file, re-check the graph contract, re-run parity, name differences."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ganet.export.manifest import MANIFEST_FILE, Manifest, load_manifest, sha256_file

__all__ = ["VerifyResult", "verify_export", "file_problem"]

# Re-run numbers may move by float noise (thread scheduling, another CPU); a recorded number that was edited or a
# model that changed moves far more.
_RTOL, _ATOL = 0.5, 1e-6


@dataclass
class VerifyResult:
    differences: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    parity_rerun: bool = False

    @property
    def ok(self) -> bool:
        return not self.differences


def _close(recorded: float, now: float) -> bool:
    return math.isclose(recorded, now, rel_tol=_RTOL, abs_tol=_ATOL)


def file_problem(m: Manifest, rel: str) -> str | None:
    """What is wrong with the listed file ``rel`` against the manifest (missing, size, SHA-256), or None. Also what
    ``ganet-serve`` checks of every file it loads before it turns ready."""
    entry = m.files.get(rel)
    path = m.directory / rel
    if entry is None:
        return "not listed in the manifest"
    if not path.is_file():
        return f"missing (manifest lists {entry.bytes} bytes)"
    if path.stat().st_size != entry.bytes:
        return f"size {path.stat().st_size} bytes, manifest says {entry.bytes}"
    if (digest := sha256_file(path)) != entry.sha256:
        return f"sha256 {digest}, manifest says {entry.sha256}"
    return None


def _check_files(m: Manifest, result: VerifyResult) -> set[str]:
    """Hashes and sizes against the manifest; returns the listed files that are missing or differ."""
    changed = set()
    for rel in m.files:
        if (problem := file_problem(m, rel)) is None:
            continue
        changed.add(rel)
        result.differences.append(f"{rel}: {problem}")
    for path in sorted(p for p in m.directory.rglob("*") if p.is_file()):
        rel = path.relative_to(m.directory).as_posix()
        if rel != MANIFEST_FILE and rel not in m.files:
            result.differences.append(f"{rel}: not listed in the manifest")
    return changed


def _check_contract(m: Manifest, result: VerifyResult, changed: set[str]) -> None:
    """The manifest's contract against what the ONNX file and labels.txt actually hold."""
    import onnx

    onnx_file = m.path(m.artifact("onnx"))
    if not onnx_file.is_file() or m.artifact("onnx").file in changed:
        return
    graph = onnx.load(str(onnx_file), load_external_data=False).graph
    for spec, value, dtype in ((m.input, graph.input[0], "uint8"), (m.output, graph.output[0], "float32")):
        shape = tuple(d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim)
        elem = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name
        if (spec.name, spec.dtype, spec.shape) != (value.name, elem, shape):
            result.differences.append(f"manifest {spec.name!r}: {spec.dtype} {list(spec.shape)}, model.onnx has "
                                      f"{value.name!r}: {elem} {list(shape)}")
    if m.output.shape[-1] != m.num_classes:
        result.differences.append(f"num_classes: manifest says {m.num_classes}, its output shape {list(m.output.shape)}")
    if m.input.shape[-1] != m.preprocessing.input_size:
        result.differences.append(f"preprocessing.input_size: manifest says {m.preprocessing.input_size}, its input "
                                  f"shape {list(m.input.shape)}")
    labels_file = m.directory / "labels.txt"
    if labels_file.is_file() and tuple(labels_file.read_text(encoding="utf-8").splitlines()) != m.labels:
        result.differences.append("labels: manifest and labels.txt differ")


def _compare_numbers(where: str, recorded: dict[str, Any], now: dict[str, Any], keys: tuple[str, ...],
                     result: VerifyResult) -> None:
    for key in keys:
        if key not in recorded:
            result.differences.append(f"{where}.{key}: missing from the manifest (re-run gives {now[key]:.6g})")
            continue
        exact = key.startswith("top1") or key == "drop_points"
        same = abs(recorded[key] - now[key]) <= 1e-9 if exact else _close(recorded[key], now[key])
        if not same:
            result.differences.append(f"{where}.{key}: manifest says {recorded[key]:.6g}, re-run gives {now[key]:.6g}")


def _rerun_parity(m: Manifest, result: VerifyResult, changed: set[str], log: Callable[[str], None]) -> None:
    from ganet.checkpoint import CheckpointError, load_checkpoint
    from ganet.export import parity as P
    from ganet.export.data import DEFAULT_HELDOUT_IMAGES, DataUnavailableError, ExportData, resolve_export_data
    from ganet.export.pipeline import heldout_top1, parity_batch_sizes

    ckpt = Path(m.checkpoint.get("path", ""))
    if not ckpt.is_file():
        result.notes.append(f"parity could not be re-run: the checkpoint {ckpt} recorded in the manifest is gone "
                            "(hashes were checked)")
        return
    if sha256_file(ckpt) != m.checkpoint.get("sha256"):
        result.differences.append(f"checkpoint {ckpt}: sha256 differs from the manifest (it changed since the "
                                  "export); parity not re-run")
        return
    try:
        model, info = load_checkpoint(ckpt)
    except CheckpointError as e:
        result.differences.append(f"checkpoint: {e}")
        return
    prep = m.preprocessing
    recorded = m.parity.get("inputs", {})
    # The inputs the export used: the photographs, and the same held-out images of the same folder if it used any.
    data = ExportData(prep)
    if recorded.get("dataset_heldout"):
        try:
            data = resolve_export_data(info.extra, prep, info.labels, recorded.get("data_dir"),
                                       recorded.get("heldout_limit", DEFAULT_HELDOUT_IMAGES))
        except DataUnavailableError as e:
            data.note = str(e)
        if data.name != recorded["dataset_heldout"]:
            result.notes.append(f"parity could not be re-run: the export checked it on the held-out split of "
                                f"{recorded['dataset_heldout']}, which is not reachable here ({data.note}); hashes "
                                "were checked")
            return
    log(f"[ganet-export] re-running parity against {ckpt} ...")
    inputs = data.parity_inputs()
    reference = P.torch_reference(model, prep, inputs.images)
    batches = [int(b) for b in m.parity.get("onnx", {}).get("by_batch", {})] or parity_batch_sizes(m.max_batch)
    onnx_file = m.path(m.artifact("onnx"))

    def recheck(key: str, label: str, runner: Any) -> None:
        recorded = m.parity.get(key, {})
        now = P.run_parity(runner, inputs, reference, batches, recorded.get("tolerance") or P.TOLERANCES[key])
        if not now.passed:
            result.differences.append(P.failure_message(f"{label} (re-run)", now))
        if recorded.get("n") != now.n:
            result.differences.append(f"parity.{key}.n: manifest says {recorded.get('n')} images, re-run used {now.n}")
        _compare_numbers(f"parity.{key}", recorded, now.to_dict(), ("max_abs", "mean_abs", "top1_agreement"), result)
        for b, rb in now.by_batch.items():
            _compare_numbers(f"parity.{key}.by_batch.{b}", recorded.get("by_batch", {}).get(b, {}), rb,
                             ("max_abs", "mean_abs", "top1_agreement"), result)

    recheck("onnx", "ONNX Runtime fp32", P.ort_runner(onnx_file))
    fused = m.artifact("onnx_fused")
    if fused is not None and fused.file in changed:
        result.notes.append(f"fused-graph parity not re-run: {fused.file} differs from the manifest")
    elif fused is not None:
        from ganet.kernels import KernelUnavailable

        try:
            runner = P.ort_runner(m.path(fused), kernels=True)
        except KernelUnavailable as e:
            result.notes.append(f"fused-graph parity not re-run: {e}")
        else:
            recheck("onnx_fused", "ONNX Runtime fp32, fused GA kernel", runner)
    int8 = m.artifact("onnx_int8")
    held = (m.parity.get("onnx_int8") or {}).get("heldout")
    if int8 is not None and int8.file in changed:
        result.notes.append(f"INT8 accuracy not re-run: {int8.file} differs from the manifest")
    elif int8 is not None and held:
        held_out = data.heldout
        if held_out is not None:
            acc32, acc8 = heldout_top1(onnx_file, held_out), heldout_top1(m.path(int8), held_out)
            _compare_numbers("parity.onnx_int8.heldout", held,
                             {"top1_fp32": acc32, "top1_int8": acc8, "drop_points": 100 * (acc32 - acc8)},
                             ("top1_fp32", "top1_int8", "drop_points"), result)
    if m.artifact("tensorrt") is not None:
        result.notes.append("TensorRT parity not re-run by --verify (run the engine on its GPU: ganet-serve)")
    result.parity_rerun = True


def verify_export(directory: str | Path, log: Callable[[str], None] = print) -> VerifyResult:
    """Check an export directory against its manifest. Raises ManifestError if there is no usable manifest."""
    m = load_manifest(directory)
    result = VerifyResult()
    changed = _check_files(m, result)
    _check_contract(m, result, changed)
    onnx_file = m.artifact("onnx").file
    if onnx_file in changed:
        result.notes.append(f"parity not re-run: {onnx_file} differs from the manifest")
    else:
        _rerun_parity(m, result, changed, log)
    return result
