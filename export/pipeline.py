"""``export_checkpoint``: checkpoint -> export directory (ONNX, optional INT8 / TensorRT / Triton, manifest, report).

Everything is built in a temporary directory beside ``output`` and renamed into place at the end, so an export
that fails at any step leaves no ``output`` behind (and, with ``force``, the previous one untouched).
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ganet._io import atomic_write_bytes
from ganet.preprocess import normalize_uint8
from ganet.system import usable_cpus
from ganet.export.data import DEFAULT_HELDOUT_IMAGES
from ganet.export.manifest import FORMAT, FORMAT_VERSION, MANIFEST_FILE, hash_directory, sha256_file
from ganet.export.partial import make_partial_dir, old_export_path, remove_stale_partials
from ganet.export.trt_ops import check_tensorrt_compatibility
from ganet.export.onnx_export import BATCH_AXIS, DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME

__all__ = ["ExportOptions", "ExportError", "ExportUsageError", "export_checkpoint", "parity_batch_sizes",
           "heldout_top1"]

Log = Callable[[str], None]


class ExportError(RuntimeError):
    """The export ran and failed (parity, checker, op compatibility): exit code 1, no output directory."""


class ExportUsageError(ExportError):
    """The request cannot be carried out (bad checkpoint, existing output, TensorRT missing): exit code 2."""


@dataclass
class ExportOptions:
    output: Path
    trt: bool = False
    fp16: bool = False
    int8: bool = False
    triton: bool = False
    max_batch: int = 32
    opset: int = DEFAULT_OPSET
    force: bool = False
    simplify: bool = False
    calibration_images: int = 512
    benchmark_rounds: int = 5  # 0: skip the latency table
    timing_cache: Path | None = None
    atol: float | None = None  # the fp32 ONNX parity bound on max |dlogit| (None: parity.TOLERANCES)
    data_dir: Path | None = None  # the checkpoint's data set here (None: the folder the checkpoint records)
    heldout_images: int = DEFAULT_HELDOUT_IMAGES  # held-out images in parity and the INT8 gate (0: all)


def _atol_hint(result: Any) -> str:  # a parity.ParityResult (parity imports torch: imported where used)
    """For an fp32 export that ranks every image the same and misses the bound by little: how to accept it.

    fp32 rounding grows with the logits' size and differs between CPUs and library versions, so a correct export
    of a model with large logits can land just past 1e-4 on some hosts."""
    tol = result.tolerance["max_abs"]
    if result.top1_agreement < 1.0 or not tol or result.max_abs > 10 * tol:
        return ""
    return (f". Every image has the same top-1 and the largest difference is {result.max_abs / tol:.3g}x the bound: "
            f"if that is fp32 rounding on this host, accept it with --atol {float(f'{result.max_abs * 1.5:.1g}'):g} "
            "(recorded in the manifest)")


def parity_batch_sizes(max_batch: int) -> list[int]:
    return sorted({1, min(3, max_batch), max_batch})


def _require_tensorrt() -> None:
    import torch  # noqa: F401  (its CUDA version picks the TensorRT package to suggest)

    from ganet.export.tensorrt import install_command, tensorrt_available

    if not tensorrt_available():
        raise ExportUsageError(f"--trt needs TensorRT and an NVIDIA GPU, and `import tensorrt` fails here: install it "
                               f"on a GPU host ({install_command()}) and run ganet-export there; nothing was written")


def _check_request(opts: ExportOptions) -> None:
    problems = []
    if opts.atol is not None and not opts.atol > 0:
        problems.append(f"--atol must be a positive number, got {opts.atol}")
    if opts.max_batch < 1:
        problems.append(f"--max-batch must be >= 1, got {opts.max_batch}")
    if opts.fp16 and not opts.trt:
        problems.append("--fp16 builds a TensorRT engine: add --trt")
    if opts.calibration_images < 1:
        problems.append(f"--calibration-images must be >= 1, got {opts.calibration_images}")
    if opts.heldout_images < 0:
        problems.append(f"--heldout-images must be >= 0 (0: all), got {opts.heldout_images}")
    if problems:
        raise ExportUsageError("; ".join(problems))
    out = Path(opts.output)
    if out.exists() and not out.is_dir():
        raise ExportUsageError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not opts.force:
        raise ExportUsageError(f"{out}: exists and is not empty; pass --force to replace it")
    if opts.trt:
        _require_tensorrt()


def heldout_top1(onnx_path: Path, held_out: Any, batch_size: int = 64) -> float:
    """Top-1 of an ONNX model on labelled images, in fixed chunks so that --verify reproduces it exactly."""
    from ganet.export.parity import ort_runner
    from ganet.export.quantize import top1_accuracy

    run = ort_runner(onnx_path)
    logits = np.concatenate([run(held_out.images[i:i + batch_size]) for i in range(0, len(held_out), batch_size)])
    return top1_accuracy(logits, held_out.targets)


def export_checkpoint(checkpoint: str | os.PathLike, opts: ExportOptions, log: Log = print) -> Path:
    """Export ``checkpoint`` into ``opts.output``; returns the directory. Raises :class:`ExportError`."""
    checkpoint, output = Path(checkpoint), Path(opts.output)
    _check_request(opts)
    from ganet.checkpoint import CheckpointError, load_checkpoint

    try:
        model, info = load_checkpoint(checkpoint)
    except CheckpointError as e:
        raise ExportUsageError(f"cannot export: {e}") from None
    from ganet.export.data import DataUnavailableError, resolve_export_data

    try:
        data = resolve_export_data(info.extra, info.preprocessing, info.labels, opts.data_dir, opts.heldout_images)
    except DataUnavailableError as e:
        raise ExportUsageError(f"--data-dir {e}; nothing was written") from None
    log(f"[ganet-export] real images: the bundled photographs and the {data.note}" if data.reachable
        else f"[ganet-export] {data.note}")
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(output, log)
    tmp = make_partial_dir(output)
    try:
        try:
            manifest = _build(checkpoint, model, info, data, opts, tmp, log)
        except ExportError:
            raise
        except (RuntimeError, ValueError, OSError, ImportError) as e:  # exporter, checker, quantizer, TensorRT, disk
            raise ExportError(f"{type(e).__name__}: {e}") from e
        atomic_write_bytes(tmp / MANIFEST_FILE, (json.dumps(manifest, indent=2) + "\n").encode())
        _publish_permissions(tmp)
        _move_into_place(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def _publish_permissions(directory: Path) -> None:
    """mkdtemp/mkstemp create owner-only entries; give the result the permissions the umask allows."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [directory, *directory.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _move_into_place(tmp: Path, output: Path) -> None:
    old = None
    if output.exists():
        old = old_export_path(output)
        os.replace(output, old)
    try:
        os.replace(tmp, output)
    except BaseException:
        if old is not None:
            os.replace(old, output)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _step(log: Log, text: str) -> float:
    log(f"[ganet-export] {text} ...")
    return time.perf_counter()


def _build(checkpoint: Path, model: Any, info: Any, data: Any, opts: ExportOptions, tmp: Path,
           log: Log) -> dict[str, Any]:
    import onnx
    import onnxruntime
    import torch

    import ganet
    from ganet.export import parity as P
    from ganet.export.onnx_export import check_onnx, export_onnx, simplify_onnx
    from ganet.export.report import render_report

    prep, batches = info.preprocessing, parity_batch_sizes(opts.max_batch)
    t = _step(log, f"exporting {info.model} to ONNX (opset {opts.opset}, dynamo exporter)")
    onnx_path = tmp / "model.onnx"
    export = export_onnx(model, prep, onnx_path, opset=opts.opset, max_batch=opts.max_batch)
    proto = check_onnx(onnx_path, info.num_classes, prep.input_size)
    exported = proto  # with the exporter's module paths, which --simplify drops and the GA fusion reads
    log(f"  done in {time.perf_counter() - t:.1f}s; onnx.checker(full_check) passed, no batch size in any Reshape")

    t = _step(log, "computing PyTorch fp32 reference logits on real images")
    inputs = data.parity_inputs()
    reference = P.torch_reference(model, prep, inputs.images)
    log(f"  {len(inputs)} images (photographs{' + ' + data.name + ' held-out split' if data.reachable else ''})")

    tolerances = P.tolerances(opts.atol)

    def onnx_parity(path: Path, label: str, kernels: bool = False) -> P.ParityResult:
        tolerance = tolerances["onnx_fused" if kernels else "onnx"]
        result = P.run_parity(P.ort_runner(path, kernels=kernels), inputs, reference, batches, tolerance)
        log(f"  {label}: {result.summary()} at batch sizes {batches}")
        if not result.passed:
            raise ExportError(P.failure_message(label, result) + _atol_hint(result))
        return result

    _step(log, f"checking ONNX Runtime fp32 against PyTorch (max |dlogit| <= {tolerances['onnx']['max_abs']}, "
               "100% top-1)")
    parity: dict[str, Any] = {"reference": "PyTorch fp32 CPU, same uint8 images normalised in torch",
                              "inputs": {"count": len(inputs), **data.record(),
                                         "names": inputs.names[:12] + (["..."] if len(inputs) > 12 else [])}}
    parity["onnx"] = onnx_parity(onnx_path, "ONNX Runtime fp32").to_dict()
    onnx_meta = export.to_dict() | {"simplified": None}
    if opts.simplify:
        t = _step(log, "simplifying the graph")
        slim_path = tmp / "model.simplified.onnx"
        tool = simplify_onnx(onnx_path, slim_path)
        os.replace(slim_path, onnx_path)
        proto = check_onnx(onnx_path, info.num_classes, prep.input_size)
        parity["onnx_before_simplify"] = parity["onnx"]
        parity["onnx"] = onnx_parity(onnx_path, f"ONNX Runtime fp32 after {tool}").to_dict()
        onnx_meta["simplified"] = tool

    problems = check_tensorrt_compatibility(proto)
    if problems:
        raise ExportError(f"{len(problems)} node(s) TensorRT's ONNX parser would reject: "
                          + "; ".join(str(p) for p in problems))
    log(f"  TensorRT op-compatibility: all {len(proto.graph.node)} nodes supported")
    onnx_meta["tensorrt_op_check"] = "passed"

    artifacts: list[dict[str, Any]] = [{"kind": "onnx", "file": "model.onnx", "precision": "fp32"}]
    fused, fused_parity = _fused(exported, model, prep, tmp, onnx_parity, log) or (None, None)
    if fused is not None:
        artifacts.append(fused)
        parity["onnx_fused"] = fused_parity.to_dict()
    onnx_meta["fused_group_attention"] = fused["blocks"] if fused else None
    if opts.int8:
        artifacts.append(_int8(onnx_path, tmp / "model.int8.onnx", data, opts, inputs, reference, parity, log))

    engine_info = None
    if opts.trt:
        engine_info = _tensorrt(onnx_path, tmp / "model.plan", opts, inputs, reference, batches, parity, log)
        # The engine's compatibility info sits in the entry itself: Artifact.info is what TensorRTRunner takes.
        artifacts.append({"kind": "tensorrt", "file": "model.plan", **engine_info})  # build_engine sets precision

    speed = None
    if opts.benchmark_rounds > 0:
        _step(log, f"measuring CPU latency ({opts.benchmark_rounds} interleaved rounds)")
        speed = _measure_speed(model, prep, onnx_path, tmp / "model.int8.onnx" if opts.int8 else None, inputs,
                               opts, log, fused_path=tmp / fused["file"] if fused else None)

    (tmp / "labels.txt").write_text("".join(f"{label}\n" for label in info.labels), encoding="utf-8")
    triton = None
    if opts.triton:
        triton = _triton(tmp, info, prep, opts, engine_info is not None, log)

    try:
        import tensorrt
        trt_version = tensorrt.__version__
    except ImportError:
        trt_version = None
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": info.model, "num_classes": info.num_classes, "model_kwargs": info.model_kwargs,
        "labels": list(info.labels), "max_batch": opts.max_batch,
        "checkpoint": {"path": str(checkpoint.resolve()), "sha256": sha256_file(checkpoint),
                       "bytes": checkpoint.stat().st_size, "extra": info.extra},
        "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": [BATCH_AXIS, 3, prep.input_size, prep.input_size],
                  "dynamic_axes": {"0": BATCH_AXIS}, "layout": "NCHW", "color": "RGB", "value_range": [0, 255],
                  "produced_by": "ganet.preprocess.image_to_uint8 (resize shorter side, center crop); the graph "
                                 "computes (x / 255 - mean) / std itself"},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": [BATCH_AXIS, info.num_classes],
                   "dynamic_axes": {"0": BATCH_AXIS}, "meaning": "unnormalised class scores (apply softmax)"},
        "preprocessing": prep.to_dict(),
        "onnx": onnx_meta,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                     "tensorrt": trt_version, "ganet": ganet.__version__, "python": platform.python_version()},
        "artifacts": artifacts,
        "parity": parity,
        "speed": speed,
        "triton": triton,
        "host": {"machine": platform.machine(), "processor": _cpu_name(), "cpu_count": os.cpu_count(),
                 "usable_cpus": usable_cpus()},
    }
    (tmp / "report.md").write_text(render_report(manifest), encoding="utf-8")
    manifest["files"] = hash_directory(tmp)
    return manifest


def _fused(proto: Any, model: Any, prep: Any, tmp: Path, onnx_parity: Callable[..., Any],
           log: Log) -> tuple[dict[str, Any], Any] | None:
    """``model.fused.onnx`` (GA blocks as one custom op each, for ONNX Runtime on CPUs), parity-checked like
    ``model.onnx``: (its manifest artifact entry, its ParityResult); None when the model has no GA block or the
    kernel cannot be built here (logged)."""
    import onnx

    from ganet.export.onnx_export import ImageModel
    from ganet.export.ort_fused import FUSED_FILE, fuse_group_attention
    from ganet.kernels import DOMAIN, OP_TYPE_SHUFFLE, OP_TYPE_SHUFFLE_SPLIT, OP_TYPE_STEM, KernelUnavailable

    t = time.perf_counter()
    fused, blocks = fuse_group_attention(proto, ImageModel(model, prep))
    if not blocks:
        return None
    ops = [n.op_type for n in fused.graph.node if n.domain == DOMAIN]
    shuffles = sum(op in (OP_TYPE_SHUFFLE, OP_TYPE_SHUFFLE_SPLIT) for op in ops)
    _step(log, f"fusing {blocks} Group Attention blocks ({shuffles} with the channel shuffle after them)"
               f"{' and the ImageNet stem' if OP_TYPE_STEM in ops else ''} into ganet.ops CPU kernels")
    path = tmp / FUSED_FILE
    onnx.save(fused, str(path))
    try:
        result = onnx_parity(path, "ONNX Runtime fp32, fused GA kernel", kernels=True)
    except KernelUnavailable as e:
        path.unlink()
        log(f"  skipped: {e}\n  (serving falls back to model.onnx; the fused graph is only a CPU speed-up)")
        return None
    log(f"  done in {time.perf_counter() - t:.1f}s; {len(fused.graph.node)} nodes instead of {len(proto.graph.node)}")
    return ({"kind": "onnx_fused", "file": FUSED_FILE, "precision": "fp32", "blocks": blocks,
             "shuffles_folded": shuffles, "stem_fused": OP_TYPE_STEM in ops,
             "custom_op": f"{DOMAIN}::{'/'.join(sorted(set(ops)))} (ganet/kernels/group_attention.c)"}, result)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _int8(fp32_path: Path, int8_path: Path, data: Any, opts: ExportOptions, inputs: Any, reference: np.ndarray,
          parity: dict[str, Any], log: Log) -> dict[str, Any]:
    from ganet.export import parity as P
    from ganet.export.quantize import quantize_int8

    calibration, calib_desc = data.calibration(opts.calibration_images)
    _step(log, f"quantising to INT8 (QDQ, calibrated on {calib_desc})")
    settings = quantize_int8(fp32_path, int8_path, calibration) | {"calibration_set": calib_desc}
    int8_run = P.ort_runner(int8_path)
    result = P.run_parity(int8_run, inputs, reference, [opts.max_batch], {"max_abs": None, "top1_agreement": 0.0})
    entry: dict[str, Any] = {"vs_torch": result.to_dict()}
    held_out = data.heldout
    if held_out is not None:
        acc32, acc8 = heldout_top1(fp32_path, held_out), heldout_top1(int8_path, held_out)
        drop = 100 * (acc32 - acc8)
        entry["heldout"] = {"dataset": data.name, "images": len(held_out), "top1_fp32": acc32, "top1_int8": acc8,
                            "drop_points": drop, "max_drop_points": 1.0}
        log(f"  held-out top-1: fp32 {100 * acc32:.2f}%, int8 {100 * acc8:.2f}% (drop {drop:.2f} points; limit 1)")
        entry["passed"] = drop <= 1.0
        if not entry["passed"]:
            raise ExportError(f"INT8 held-out accuracy drop {drop:.2f} points > 1 point (fp32 {100 * acc32:.2f}%, "
                              f"int8 {100 * acc8:.2f}% on {len(held_out)} {data.name} images)")
    else:
        entry["heldout"] = None
        entry["passed"] = None  # not gated: no labelled images here
        log(f"  int8 vs PyTorch on photographs: {result.summary()}; NOT gated: the checkpoint's data set is not "
            "reachable here (its first line says why), so no held-out accuracy was measured")
    parity["onnx_int8"] = entry
    return {"kind": "onnx_int8", "file": "model.int8.onnx", "precision": "int8", "quantization": settings}


def _tensorrt(onnx_path: Path, plan_path: Path, opts: ExportOptions, inputs: Any, reference: np.ndarray,
              batches: list[int], parity: dict[str, Any], log: Log) -> dict[str, Any]:
    from ganet.export import parity as P
    from ganet.export.tensorrt import TensorRTRunner, build_engine

    precision = "fp16" if opts.fp16 else "fp32"
    t = _step(log, f"building the TensorRT {precision} engine (batch 1..{opts.max_batch})")
    cache = opts.timing_cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ganet" / \
        "tensorrt_timing.cache"
    engine_info = build_engine(onnx_path, plan_path, max_batch=opts.max_batch,
                               opt_batch=min(opts.max_batch, max(1, opts.max_batch // 2)), fp16=opts.fp16,
                               timing_cache=cache)
    log(f"  built in {time.perf_counter() - t:.1f}s")
    runner = TensorRTRunner(plan_path, engine_info)
    tolerance = P.TOLERANCES[f"tensorrt_{precision}"]
    result = P.run_parity(runner, inputs, reference, batches, tolerance)
    log(f"  TensorRT {precision}: {result.summary()}")
    if not result.passed:
        raise ExportError(P.failure_message(f"TensorRT {precision}", result))
    parity["tensorrt"] = result.to_dict()
    return engine_info


def _measure_speed(model: Any, prep: Any, onnx_path: Path, int8_path: Path | None, inputs: Any, opts: ExportOptions,
                   log: Log, fused_path: Path | None = None) -> dict[str, Any]:
    import torch

    from ganet.export import parity as P
    from ganet.export.speed import interleaved_latency

    def torch_eager(images: np.ndarray) -> Any:
        with torch.inference_mode():
            return model(normalize_uint8(torch.from_numpy(images), prep))

    runners = {"pytorch_eager_fp32": torch_eager, "onnxruntime_fp32": P.ort_runner(onnx_path, spinning=False)}
    if fused_path is not None:
        runners["onnxruntime_fp32_fused"] = P.ort_runner(fused_path, spinning=False, kernels=True)
    if int8_path is not None:
        runners["onnxruntime_int8"] = P.ort_runner(int8_path, spinning=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(usable_cpus())  # as many as ORT's sessions here; restored below: callers' setting
    try:
        results = {}
        for b in sorted({1, opts.max_batch}):
            batch = np.resize(inputs.images, (b,) + inputs.images.shape[1:])  # real images, repeated to fill it
            results[str(b)] = interleaved_latency(runners, batch, opts.benchmark_rounds, baseline="pytorch_eager_fp32")
            log(f"  batch {b}: " + ", ".join(f"{k} {v['median_ms']:.2f} ms" for k, v in results[str(b)].items()))
    finally:
        torch.set_num_threads(threads)
    return {"device": f"CPU ({_cpu_name()}, {usable_cpus()} threads)", "rounds": opts.benchmark_rounds,
            "by_batch": results,
            "note": "medians of interleaved rounds on the exporting host; speedup = PyTorch eager / runner"}


def _triton(tmp: Path, info: Any, prep: Any, opts: ExportOptions, with_plan: bool, log: Log) -> dict[str, Any]:
    from ganet.export.triton import write_triton_repository

    platform_name = "tensorrt_plan" if with_plan else "onnxruntime_onnx"
    model_file = tmp / ("model.plan" if with_plan else "model.onnx")
    _step(log, f"writing the Triton model repository ({platform_name})")
    model_dir = write_triton_repository(
        tmp / "triton", model_name=info.model, model_file=model_file, platform=platform_name,
        input_name=INPUT_NAME, input_dtype="uint8", input_dims=[3, prep.input_size, prep.input_size],
        output_name=OUTPUT_NAME, num_classes=info.num_classes, labels=list(info.labels), max_batch=opts.max_batch)
    return {"repository": "triton", "model_name": info.model, "platform": platform_name,
            "model_dir": Path(model_dir).relative_to(tmp).as_posix()}
