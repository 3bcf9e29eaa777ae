"""CPU latency of GA-ShuffleNetV2 against a plain ShuffleNetV2 of the same widths (120/240/480), torch eager.

Targets: at batch 32, GA costs at most 1.30x the plain model at 32x32 (CIFAR form) and 1.15x at
224x224 (ImageNet form). The runs are interleaved (plain, GA, straightforward GA, plain, GA, ...) so that machine
noise hits all models alike; we report each model's median latency and the median and spread (min, quartiles,
max) of the per-round ratios. "straightforward" is the same GA model running the direct transcription of the
equations (ganet/layers/group_attention_reference.py), for context.

    python benchmarks/bench_ga_latency.py                  # both sizes, NCHW
    python benchmarks/bench_ga_latency.py --channels-last  # the layout the GPU trainer uses
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from _stats import spread  # benchmarks/_stats.py (scripts run from this folder)

import ganet
from ganet.layers import GroupAttention
from ganet.layers.group_attention_reference import group_attention_reference
from ganet.models.shufflenet_v2 import GROUP15_WIDTHS, ShuffleNetV2

TARGETS = {32: 1.30, 224: 1.15}


class StraightforwardGA(nn.Module):
    def __init__(self, block: GroupAttention) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_attention_reference(self.block, x)


def straightforward(model: nn.Module) -> nn.Module:
    for unit in model.modules():
        if isinstance(getattr(unit, "attn", None), GroupAttention):
            unit.attn = StraightforwardGA(unit.attn)
    return model


def bench_size(size: int, batch: int, rounds: int, channels_last: bool, with_reference: bool) -> dict:
    cifar = size == 32
    torch.manual_seed(0)
    models = {
        "plain": ShuffleNetV2(stages_out_channels=GROUP15_WIDTHS, cifar=cifar),
        "ga": ganet.create_model("ga_shufflenet_v2_cifar" if cifar else "ga_shufflenet_v2"),
    }
    if with_reference:
        models["straightforward"] = straightforward(ganet.create_model(
            "ga_shufflenet_v2_cifar" if cifar else "ga_shufflenet_v2"))
    x = torch.randn(batch, 3, size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for name, m in models.items():
        m.eval()
        if channels_last:
            models[name] = m.to(memory_format=torch.channels_last)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for m in models.values():  # warm-up: allocator, oneDNN primitives
            for _ in range(3):
                m(x)
        for _ in range(rounds):
            for name, m in models.items():
                t0 = time.perf_counter()
                m(x)
                times[name].append(time.perf_counter() - t0)
    result = {"size": size, "batch": batch, "rounds": rounds, "channels_last": channels_last,
              "median_ms": {n: statistics.median(t) * 1e3 for n, t in times.items()}, "ratio": {}}
    for name in models:
        if name != "plain":
            ratios = [a / b for a, b in zip(times[name], times["plain"])]
            result["ratio"][name] = spread(ratios)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224], choices=[32, 224])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds per size (default 30)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--no-reference", action="store_true", help="skip the straightforward transcription")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/ga_latency.json"))
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
          f", batch {args.batch}, {'channels_last' if args.channels_last else 'NCHW'}, {args.rounds} rounds")
    results = []
    for size in args.sizes:
        r = bench_size(size, args.batch, args.rounds, args.channels_last, not args.no_reference)
        results.append(r)
        ms = r["median_ms"]
        print(f"\n{size}x{size}: plain {ms['plain']:.1f} ms, GA {ms['ga']:.1f} ms"
              + (f", straightforward GA {ms['straightforward']:.1f} ms" if "straightforward" in ms else ""))
        for name, q in r["ratio"].items():
            verdict = ""
            if name == "ga":
                verdict = f"  target <= {TARGETS[size]:.2f}: {'met' if q['median'] <= TARGETS[size] else 'MISSED'}"
            print(f"  {name:>15s} / plain: median {q['median']:.3f}  (min {q['min']:.3f}, quartiles "
                  f"{q['q1']:.3f}-{q['q3']:.3f}, max {q['max']:.3f}){verdict}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                       "results": results}, indent=2))
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
