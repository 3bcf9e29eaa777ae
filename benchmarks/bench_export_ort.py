"""ONNX Runtime (CPU, fp32 and INT8) against PyTorch eager for the exported GA-ShuffleNetV2, and the GA variant's cost
against its same-width baseline inside ONNX Runtime: with the standard graph (model.onnx) and with the fused one
(model.fused.onnx, every GA block one ganet.ops kernel that also writes its unit's channel shuffle, and at 224x224
the stem one node), which ganet-serve runs on CPUs. "blocks only" fuses the GA blocks and nothing else, so that
against the baseline (which keeps its shuffles and stem as exported too) it measures what the GA blocks cost.

Targets, on the development machine: ORT fp32 at batch 1 and 32 is >= 2x faster than PyTorch eager for
ga_shufflenet_v2 (224x224) and ga_shufflenet_v2_cifar (32x32); at batch 32 in ORT, GA costs <= 1.15x its
same-width baseline (shufflenet_v2_g15 at 224, shufflenet_v2_cifar at 32). Every model is exported exactly as
``ganet-export`` does it (uint8 input, normalisation in the graph). Runs are interleaved (torch GA, ORT GA,
ORT GA fused, ORT GA blocks only, ORT baseline, ORT GA INT8, then again) so that noise from other processes hits all alike; we report each runner's
median and the median and spread of the per-round ratios. intra_op threads = torch threads = the core count.

    python benchmarks/bench_export_ort.py                 # both sizes, batch 1 and 32, 7 rounds
    python benchmarks/bench_export_ort.py --sizes 32 --rounds 15 --profile   # + time per ONNX op type

Writes benchmarks/results/export_ort_<threads>t.json.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from _stats import spread  # benchmarks/_stats.py (scripts run from this folder)

from ganet.export.onnx_export import ImageModel, export_onnx
from ganet.export.ort_fused import fuse_group_attention
from ganet.export.parity import ort_runner, photographs
from ganet.export.quantize import quantize_int8
from ganet.export.speed import interleaved_times
from ganet.models import create_model
from ganet.preprocess import Preprocessing, normalize_uint8

MODELS = {32: ("ga_shufflenet_v2_cifar", "shufflenet_v2_cifar"), 224: ("ga_shufflenet_v2", "shufflenet_v2_g15")}


def build(name: str) -> torch.nn.Module:
    """A registered model, or shufflenet_v2_g15: ImageNet ShuffleNetV2 at the GA widths (120/240/480), no attention."""
    if name == "shufflenet_v2_g15":
        from ganet.models.shufflenet_v2 import GROUP15_WIDTHS, ShuffleNetV2

        return ShuffleNetV2(stages_out_channels=GROUP15_WIDTHS).eval()
    return create_model(name).eval()


def op_profile(path: Path, images: np.ndarray, threads: int, runs: int = 5, kernels: bool = False) -> dict[str, float]:
    """Milliseconds per run spent in each ONNX Runtime node type (ORT's profiler; it adds its own overhead);
    ``kernels``: the graph is model.fused.onnx, which needs ganet's custom-op library."""
    import onnxruntime as ort

    from ganet.kernels import register_kernels

    options = ort.SessionOptions()
    if kernels:
        register_kernels(options)
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(None, {"image": images})
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"] / 1000 / runs
    return dict(sorted(per_op.items(), key=lambda kv: -kv[1]))


def export_variants(model: torch.nn.Module, prep: Preprocessing, folder: Path, max_batch: int,
                    calibration: np.ndarray, fused: bool = True, int8: bool = True) -> dict[str, Path]:
    """The graphs ganet-export writes, by the same functions, into ``folder`` (its file names): ``onnx``
    (model.onnx), ``fused`` (model.fused.onnx: GA blocks, their shuffles and the ImageNet stem fused; GA models
    only), ``fused_blocks_only`` (the GA blocks alone fused: what they cost), ``int8`` (QDQ, calibrated on
    ``calibration``: speed does not depend on which images)."""
    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    paths = {"onnx": folder / "model.onnx"}
    export_onnx(model, prep, paths["onnx"], max_batch=max_batch)
    if fused:
        graph = onnx.load(str(paths["onnx"]))
        for key, more in (("fused", True), ("fused_blocks_only", False)):
            fused_graph, blocks = fuse_group_attention(graph, ImageModel(model, prep), fold_shuffles=more,
                                                       fuse_stem=more)
            if blocks:  # (a model without GA blocks has no fused graph)
                paths[key] = folder / f"model.{key}.onnx"
                onnx.save(fused_graph, str(paths[key]))
    if int8:
        paths["int8"] = folder / "model.int8.onnx"
        quantize_int8(paths["onnx"], paths["int8"], calibration)
    return paths


def torch_runner(model: torch.nn.Module, prep: Preprocessing):
    """PyTorch eager on the uint8 batch, normalised as the exported graph does it."""
    def run(images: np.ndarray):
        with torch.inference_mode():
            return model(normalize_uint8(torch.from_numpy(images), prep))
    return run


def bench_size(size: int, batches: list[int], rounds: int, profile: bool, tmp: Path, threads: int) -> dict:
    prep = Preprocessing.for_input_size(size)
    ga_name, base_name = MODELS[size]
    torch.manual_seed(0)
    ga, base = build(ga_name), build(base_name)
    photos = photographs(prep).images
    ga_paths = export_variants(ga, prep, tmp / ga_name, max(batches), photos)
    base_paths = export_variants(base, prep, tmp / base_name, max(batches), photos, fused=False, int8=False)
    paths = {ga_name: ga_paths["onnx"], base_name: base_paths["onnx"]}
    fused_path, kept_path = ga_paths["fused"], ga_paths["fused_blocks_only"]

    # Spinning off: idle ORT threads would otherwise busy-wait through the next runner's turn.
    runners = {"torch_ga": torch_runner(ga, prep), "ort_ga": ort_runner(paths[ga_name], threads, spinning=False),
               "ort_ga_fused": ort_runner(fused_path, threads, spinning=False, kernels=True),
               "ort_ga_fused_blocks_only": ort_runner(kept_path, threads, spinning=False, kernels=True),
               "ort_base": ort_runner(paths[base_name], threads, spinning=False),
               "ort_ga_int8": ort_runner(ga_paths["int8"], threads, spinning=False)}
    result = {"models": {"ga": ga_name, "baseline": base_name}, "by_batch": {}}
    for b in batches:
        images = np.resize(photos, (b, 3, size, size))
        times = interleaved_times(runners, images, rounds)
        ratios = {
            "ort_speedup_vs_torch": [t / o for t, o in zip(times["torch_ga"], times["ort_ga"])],
            "ga_over_baseline_ort": [g / p for g, p in zip(times["ort_ga"], times["ort_base"])],
            "ort_fused_speedup_vs_torch": [t / o for t, o in zip(times["torch_ga"], times["ort_ga_fused"])],
            "ga_fused_over_baseline_ort": [g / p for g, p in zip(times["ort_ga_fused"], times["ort_base"])],
            "ga_fused_blocks_only_over_baseline_ort": [g / p for g, p in zip(times["ort_ga_fused_blocks_only"],
                                                                              times["ort_base"])],
            "int8_speedup_vs_fp32": [f / q for f, q in zip(times["ort_ga"], times["ort_ga_int8"])],
        }
        entry = {"median_ms": {k: 1000 * statistics.median(v) for k, v in times.items()},
                 "ratios": {k: spread(v) for k, v in ratios.items()}}
        if profile:
            entry["ort_ms_per_op_type"] = {
                name: op_profile(path, images, threads, kernels=name == "ga_fused") for name, path in
                (("ga", paths[ga_name]), ("ga_fused", fused_path), ("baseline", paths[base_name]))}
        result["by_batch"][str(b)] = entry
        m, r = entry["median_ms"], entry["ratios"]
        span = lambda k, f=".2f": f"{r[k]['median']:{f}} ({r[k]['min']:{f}}..{r[k]['max']:{f}})"  # noqa: E731
        print(f"{size}x{size} batch {b:3d}: torch GA {m['torch_ga']:8.2f} ms | ORT GA {m['ort_ga']:8.2f} | fused "
              f"{m['ort_ga_fused']:8.2f} | blocks only {m['ort_ga_fused_blocks_only']:8.2f} | base "
              f"{m['ort_base']:8.2f} | int8 {m['ort_ga_int8']:8.2f}\n"
              f"    ORT/torch {span('ort_speedup_vs_torch')}x, fused {span('ort_fused_speedup_vs_torch')}x | GA/base "
              f"{span('ga_over_baseline_ort', '.3f')}, fused {span('ga_fused_over_baseline_ort', '.3f')}, blocks only "
              f"{span('ga_fused_blocks_only_over_baseline_ort', '.3f')} | int8 "
              f"speed-up {span('int8_speedup_vs_fp32')}x", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224], choices=sorted(MODELS))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--profile", action="store_true", help="add ORT's time per node type for GA and baseline")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch and ORT intra-op threads (default: the core count). On a shared machine, 1 is "
                             "the robust choice: a multi-threaded torch stalls at every barrier when another "
                             "process holds a core")
    parser.add_argument("--output", type=Path, default=None,
                        help="default: benchmarks/results/export_ort_<threads>t.json")
    args = parser.parse_args()
    args.output = args.output or Path(__file__).parent / "results" / f"export_ort_{args.threads}t.json"
    torch.set_num_threads(args.threads)
    import onnxruntime

    results = {"host": {"cpu_count": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__,
                        "onnxruntime": onnxruntime.__version__, "threads": args.threads},
               "rounds": args.rounds, "note": "the host may be shared: compare the per-round ratios, not ms",
               "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            results["sizes"][str(size)] = bench_size(size, args.batches, args.rounds, args.profile, Path(tmp),
                                                      args.threads)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
