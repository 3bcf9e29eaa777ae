"""Table 1 of the GANet paper, measured: every row (ShuffleNetV2 and its SE, CBAM, SGE, NL, GNL and GA forms) and
ShuffleNetV1 with and without GA, in the CIFAR form (32x32) and the ImageNet form (224x224).

* Parameters and MACs (``ganet.profile``, the counter ``ganet-profile`` prints) beside the paper's columns.
* CPU latency at batch 1 and 32 in every runtime a user deploys: PyTorch eager, ONNX Runtime fp32 with the
  standard graph (model.onnx) and the fused one (model.fused.onnx; GA models only, the others have no fused
  graph), ONNX Runtime INT8 (QDQ, the GA blocks kept in float), and PyTorch on CUDA where a GPU is present. Every
  model is exported as ``ganet-export`` does it (``bench_export_ort.export_variants``). All models and runtimes of a
  form run interleaved round by round (``export.speed.interleaved_times``), so that machine noise hits all alike;
  each row's cost is reported as the median and spread of its per-round ratio to its backbone's plain row
  (ShuffleNetV2 or ShuffleNetV1) in the same runtime.

Weights are random (speed does not depend on them); accuracy is the paper's, not measured here.

    python -m benchmarks.table1 --forms cifar --rounds 3      # alone; benchmarks/report.py runs it for the page
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROWS = ("shufflenet_v2", "se_shufflenet_v2", "cbam_shufflenet_v2", "sge_shufflenet_v2", "nl_shufflenet_v2",
        "gnl_shufflenet_v2", "ga_shufflenet_v2", "shufflenet_v1", "ga_shufflenet_v1")
FORMS = {"cifar": 32, "imagenet": 224}
RUNTIMES = ("torch", "ort", "ort_fused", "int8", "cuda")  # "cuda": PyTorch eager on the GPU, where there is one
# The paper gives ShuffleNetV1's CIFAR-100 top-1 in the text of Sec. 3.1, not in Table 1.
PAPER_V1_CIFAR_TOP1 = {"ShuffleNetV1": 75.76, "SGE-ShuffleNetV1": 76.74, "GA-ShuffleNetV1": 78.06}


def form_name(row: str, form: str) -> str:
    return f"{row}_cifar" if form == "cifar" else row


def baseline_of(row: str) -> str:
    return "shufflenet_v1" if "shufflenet_v1" in row else "shufflenet_v2"


def profile(rows: list[str], form: str) -> dict[str, dict]:
    """Params and MACs of each row beside the paper's Table 1 columns (CIFAR: 100 classes, ImageNet: 1000)."""
    from ganet.profile import TABLE1, profile_model

    out = {}
    for row in rows:
        p = profile_model(form_name(row, form))
        paper = TABLE1.get(p.paper_row, {}).get(form)
        top1 = paper[2] if paper else (PAPER_V1_CIFAR_TOP1.get(p.paper_row) if form == "cifar" else None)
        out[row] = {"model": p.model, "paper_row": p.paper_row, "params": p.params, "macs": p.macs,
                    "paper_params_m": p.paper_params_m, "paper_macs_m": p.paper_macs_m, "paper_top1": top1}
    return out


def runners_for(row: str, form: str, workdir: Path, runtimes: tuple[str, ...], max_batch: int, threads: int,
                log: Callable[[str], None], export: bool = True) -> dict[str, Callable]:
    """The model in every runtime asked for (a runtime the model has no graph for is left out). ``export=False``:
    only graphs already in ``workdir`` run (the test suite's quick configuration)."""
    import torch

    from bench_export_ort import export_variants, torch_runner
    from ganet.export.parity import ort_runner, photographs
    from ganet.models import create_model
    from ganet.preprocess import Preprocessing

    name = form_name(row, form)
    prep = Preprocessing.for_input_size(FORMS[form])
    torch.manual_seed(0)
    model = create_model(name).eval()
    out: dict[str, Callable] = {}
    if "torch" in runtimes:
        out["torch"] = torch_runner(model, prep)
    if "cuda" in runtimes and torch.cuda.is_available():
        gpu = create_model(name).eval().cuda()
        gpu.load_state_dict(model.state_dict())
        out["cuda"] = cuda_runner(gpu, prep)
    if {"ort", "ort_fused", "int8"} & set(runtimes):
        folder = workdir / form / name
        paths = reusable_export(folder, name)
        if paths is None and not export:
            log(f"  {name}: no export in {folder}, PyTorch only")
            paths = {}
        elif paths is None:
            t0 = time.perf_counter()
            paths = export_variants(model, prep, folder, max_batch, photographs(prep).images,
                                    fused="ort_fused" in runtimes, int8="int8" in runtimes)
            log(f"  exported {name} ({', '.join(sorted(paths))}) in {time.perf_counter() - t0:.0f} s")
        else:
            log(f"  reusing the export in {folder} ({', '.join(sorted(paths))})")
        # Idle ORT threads must not spin: they would busy-wait through the next runner's turn.
        if "ort" in runtimes and "onnx" in paths:
            out["ort"] = ort_runner(paths["onnx"], threads, spinning=False)
        if "fused" in paths:
            try:
                out["ort_fused"] = ort_runner(paths["fused"], threads, spinning=False, kernels=True)
            except Exception as e:  # noqa: BLE001 -- no C compiler here: the page says the fused graph was not run
                log(f"  {name}: the fused graph cannot run here ({e})")
        if "int8" in paths:
            out["int8"] = ort_runner(paths["int8"], threads, spinning=False)
    return out


def reusable_export(folder: Path, name: str) -> dict[str, Path] | None:
    """The graphs an earlier run (``report.py --exports``) or ``ganet-export`` left in ``folder``, if they are of
    model ``name`` (a ganet-export manifest must name it); None: export afresh."""
    if not (folder / "model.onnx").is_file():
        return None
    if (folder / "manifest.json").is_file():
        from ganet.export.manifest import ManifestError, load_manifest

        try:
            if load_manifest(folder).model != name:
                return None
        except ManifestError:
            return None
    files = {"onnx": "model.onnx", "fused": "model.fused.onnx", "int8": "model.int8.onnx"}
    return {key: folder / f for key, f in files.items() if (folder / f).is_file()}


def cuda_runner(model, prep):
    import torch

    from ganet.preprocess import normalize_uint8

    def run(images):
        with torch.inference_mode():
            out = model(normalize_uint8(torch.from_numpy(images).cuda(), prep))
            torch.cuda.synchronize()
            return out
    return run


def budgeted_times(runners: dict[str, Callable], batch, rounds: int, budget_s: float | None,
                   min_rounds: int = 3) -> dict[str, list[float]]:
    """``interleaved_times`` for ``rounds`` rounds, or as many as fit ``budget_s`` (at least ``min_rounds``): the
    first round (after one warm-up call each) tells how long a round takes. Batch 32 of the ImageNet form costs
    seconds a round on 2 cores; the page says how many rounds each batch got."""
    from ganet.export.speed import interleaved_times

    t0 = time.perf_counter()
    times = interleaved_times(runners, batch, 1, warmup=1)
    if rounds > 1:
        if budget_s is not None:
            per_round = sum(ts[0] for ts in times.values())
            fit = int((budget_s - (time.perf_counter() - t0)) / per_round) + 1  # the round already run counts
            rounds = max(min(rounds, min_rounds), min(rounds, fit))
        for name, ts in interleaved_times(runners, batch, rounds - 1, warmup=0).items():
            times[name] += ts
    return times


def latency(rows: list[str], form: str, batches: list[int], rounds: int, runtimes: tuple[str, ...], threads: int,
            workdir: Path, log: Callable[[str], None], export: bool = True,
            budget_s: float | None = None) -> dict:
    """``{batch: {row: {runtime: {"median_ms", "over_baseline": spread, "speedup_vs_torch": spread}}}}``; each
    batch size gets ``rounds`` rounds or as many as fit ``budget_s`` seconds, at least 3."""
    import numpy as np

    from _stats import spread
    from ganet.export.parity import photographs
    from ganet.preprocess import Preprocessing

    runners: dict[str, Callable] = {}
    for row in rows:
        for runtime, run in runners_for(row, form, workdir, runtimes, max(batches), threads, log, export).items():
            runners[f"{row}|{runtime}"] = run
    photos = photographs(Preprocessing.for_input_size(FORMS[form])).images
    out: dict = {}
    for b in batches:
        t0 = time.perf_counter()
        times = budgeted_times(runners, np.resize(photos, (b, *photos.shape[1:])), rounds, budget_s)
        by_row: dict = {}
        for key, ts in times.items():
            row, runtime = key.split("|")
            entry = {"median_ms": 1000 * statistics.median(ts), "rounds": len(ts)}
            # the fused graph exists for GA models only: it is compared with the plain model's standard graph
            base = times.get(f"{baseline_of(row)}|{'ort' if runtime == 'ort_fused' else runtime}")
            if base is not None and row != baseline_of(row):
                entry["over_baseline"] = spread([t / p for t, p in zip(ts, base)])
            if runtime != "torch" and f"{row}|torch" in times:
                entry["speedup_vs_torch"] = spread([t / o for t, o in zip(times[f"{row}|torch"], ts)])
            by_row.setdefault(row, {})[runtime] = entry
        out[str(b)] = by_row
        done = min(len(ts) for ts in times.values()) if times else 0
        log(f"  {form} batch {b}: {len(runners)} runners x {done} rounds in {time.perf_counter() - t0:.0f} s")
    return out


def run(forms: list[str], rows: list[str], batches: list[int], rounds: int, runtimes: tuple[str, ...],
        threads: int, workdir: Path, log: Callable[[str], None] = print, export: bool = True,
        budget_s: float | None = None) -> dict:
    """Every form's profile and latency at each of ``batches``."""
    import torch

    torch.set_num_threads(threads)
    result = {"rows": rows, "batches": batches, "rounds": rounds, "budget_s": budget_s, "runtimes": list(runtimes),
              "threads": threads, "forms": {}}
    for form in forms:
        log(f"Table 1, {form} form ({FORMS[form]}x{FORMS[form]}):")
        result["forms"][form] = {"input_size": FORMS[form], "profile": profile(rows, form),
                                 "latency": latency(rows, form, batches, rounds, runtimes, threads, workdir, log,
                                                    export, budget_s)}
    return result


def main() -> None:
    from ganet.system import usable_cpus

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS))
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds each batch size may take; fewer rounds (at least 3) where they would not fit")
    p.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=list(RUNTIMES))
    p.add_argument("--threads", type=int, default=usable_cpus())
    p.add_argument("--output", type=Path, default=Path("benchmarks/results/table1.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="table1.") as tmp:
        result = run(args.forms, args.rows, args.batches, args.rounds, tuple(args.runtimes), args.threads, Path(tmp),
                     budget_s=args.budget_s)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
