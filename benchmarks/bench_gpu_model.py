"""Model-only throughput of the torch backend: images/s per batch size, eager against CUDA graphs, fp32 against
fp16 and bf16 -- the serving code path (``ganet.serve.backends.TorchBackend``) without HTTP or decoding: uint8 images
from page-locked host memory in, float32 logits back on the host, each call synchronised.

Target (224x224 ga_shufflenet_v2 on one H100/H200): fp16 or bf16 with CUDA graphs >= 20,000 images/s at batch 256.

    python benchmarks/bench_gpu_model.py                                     # on a GPU host, 224x224
    python benchmarks/bench_gpu_model.py --device cpu --model ga_shufflenet_v2_cifar --batches 1,8 \\
        --rounds 2 --seconds 0.2                                             # the CPU check that it runs

On the CPU there are no CUDA graphs: mode ``graph`` then runs the same bucketing (``ganet.buckets``) with an eager
forward per bucket, so the code path is exercised, not measured. Random weights: speed does not depend on them.
Writes benchmarks/results/gpu_model_<date>.json (or --output).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _stats import spread  # benchmarks/_stats.py (scripts run from this folder)

ROOT = Path(__file__).resolve().parent.parent
TARGET = {"images_per_s": 20_000, "batch": 256, "precisions": ["fp16", "bf16"], "mode": "graph"}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:
        return platform.processor() or "unknown"


def make_checkpoint(tmp: Path, model_name: str) -> Path:
    from ganet.checkpoint import save_checkpoint
    from ganet.models import create_model
    from ganet.preprocess import Preprocessing

    torch.manual_seed(0)
    model = create_model(model_name, num_classes=1000 if "cifar" not in model_name else 10).eval()
    size = 32 if "cifar" in model_name else 224
    labels = [f"class_{i}" for i in range(1000 if size == 224 else 10)]
    return save_checkpoint(tmp / "model.safetensors", model, model_name, labels, Preprocessing.for_input_size(size))


def backend_for(checkpoint: Path, device: str, precision: str, mode: str, max_batch: int):
    from ganet.buckets import BucketedRunner, bucket_sizes
    from ganet.serve.backends import TorchBackend
    from ganet.serve.torch_graphs import eager_capture

    backend = TorchBackend(checkpoint, device, intra_op_threads=0, precision=precision,
                           cuda_graphs=mode == "graph", max_batch=max_batch)
    if mode == "graph" and backend.runner is None:  # the CPU: bucketing without graphs (exercised, not measured)
        shape = (3, backend.info.preprocessing.input_size, backend.info.preprocessing.input_size)
        backend.runner = BucketedRunner(eager_capture(backend.forward, device), bucket_sizes(max_batch), shape)
    return backend


def measure(backend, images: np.ndarray, rounds: int, seconds: float) -> dict:
    """images/s of ``backend(images)`` over ``rounds`` windows of about ``seconds`` each (after a warm-up that
    records the graph of this size)."""
    for _ in range(3):
        backend(images)
    per_round, call_ms = [], []
    for _ in range(rounds):
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds or calls < 2:
            t = time.perf_counter()
            backend(images)
            call_ms.append((time.perf_counter() - t) * 1e3)
            calls += 1
        per_round.append(calls * len(images) / elapsed)
    return {"images_per_s": spread(per_round), "ms_per_call": spread(call_ms), "rounds": per_round}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda (default when "
                   "available) or cpu")
    p.add_argument("--model", default="ga_shufflenet_v2", help="architecture (random weights; default the 224x224 "
                   "ga_shufflenet_v2)")
    p.add_argument("--batches", default="1,8,64,256", help="comma-separated batch sizes (default 1,8,64,256)")
    p.add_argument("--precisions", default="fp32,fp16,bf16", help="comma-separated subset of fp32, fp16, bf16")
    p.add_argument("--modes", default="eager,graph", help="eager, graph (CUDA graphs; bucketing alone on the CPU)")
    p.add_argument("--rounds", type=int, default=5, help="timed windows per configuration (default 5)")
    p.add_argument("--seconds", type=float, default=0.3, help="length of one window (default 0.3 s)")
    p.add_argument("--output", type=Path, help="JSON path (default benchmarks/results/gpu_model_<date>.json)")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    precisions, modes = args.precisions.split(","), args.modes.split(",")
    on_gpu = args.device.startswith("cuda")
    results = {"host": {"cpu": cpu_model(), "gpu": torch.cuda.get_device_name() if on_gpu else None,
                        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()},
               "config": {"model": args.model, "device": args.device, "batches": batches, "rounds": args.rounds,
                          "seconds_per_round": args.seconds, "input": "uint8 from pinned host memory, logits to the "
                          "host, synchronised per call"},
               "target": TARGET, "results": []}
    print(f"{args.model} on {results['host']['gpu'] or results['host']['cpu']}; images/s median [min, max] over "
          f"{args.rounds} rounds", flush=True)
    print(f"{'precision':<10}{'mode':<7}{'batch':>6}{'images/s':>12}{'min':>10}{'max':>10}{'ms/call':>9}")
    with tempfile.TemporaryDirectory(prefix="bench_gpu_model.") as tmp:
        checkpoint = make_checkpoint(Path(tmp), args.model)
        size = 32 if "cifar" in args.model else 224
        rng = np.random.default_rng(0)
        pool = rng.integers(0, 256, (max(batches), 3, size, size), dtype=np.uint8)  # random pixels, never zeros
        for precision in precisions:
            for mode in modes:
                start = time.perf_counter()
                backend = backend_for(checkpoint, args.device, precision, mode, max(batches))
                for batch in batches:
                    m = measure(backend, pool[:batch], args.rounds, args.seconds)
                    ips, ms = m["images_per_s"], m["ms_per_call"]
                    results["results"].append({"precision": precision, "mode": mode, "batch": batch, **m})
                    print(f"{precision:<10}{mode:<7}{batch:>6}{ips['median']:>12.0f}{ips['min']:>10.0f}"
                          f"{ips['max']:>10.0f}{ms['median']:>9.2f}", flush=True)
                results.setdefault("setup_s", {})[f"{precision}/{mode}"] = round(time.perf_counter() - start, 2)
                backend.close()
                del backend
                if on_gpu:
                    torch.cuda.empty_cache()
    best = max((r for r in results["results"] if r["precision"] in TARGET["precisions"] and r["mode"] == "graph"
                and r["batch"] == TARGET["batch"]), key=lambda r: r["images_per_s"]["median"], default=None)
    if best is None or not on_gpu:
        verdict = "n/a (needs a GPU run with fp16/bf16, graph, batch 256)"
    else:
        value = best["images_per_s"]["median"]
        verdict = f"{value:.0f} images/s ({best['precision']}) {'ok' if value >= TARGET['images_per_s'] else 'MISSED'}"
    results["target_result"] = verdict
    print(f"target: fp16/bf16 + CUDA graphs >= {TARGET['images_per_s']} images/s at batch {TARGET['batch']}: {verdict}")
    out = args.output or ROOT / "benchmarks" / "results" / f"gpu_model_{datetime.date.today():%Y%m%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from ganet._io import atomic_write_bytes

    atomic_write_bytes(out, (json.dumps(results, indent=2) + "\n").encode())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
