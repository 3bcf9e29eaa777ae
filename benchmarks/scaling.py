"""The paper's cost claim, measured as the input grows: pairwise attention (NL, GNL) costs O((HW)^2 C), Group
Attention O(HW C), the unary blocks (SE, SGE, CBAM) O(HW C) too.

* **Blocks**: each attention block where the non-local models put theirs, the last unit of stage 2 of the ImageNet
  form: 60 channels at 1/8 of the input (4x4 for a 32x32 input, 28x28 at 224, 40x40 at 320), batch 1, built as
  the models build them but not in place (the same input is reused every round).
* **Networks**: the ImageNet-form models (the plain one at the attention models' widths 120/240/480), batch 1.
* **Time**: PyTorch eager under ``inference_mode``, every block (or network) of a size interleaved round by round;
  each one's per-round ratio to GA (blocks) or to the plain network (networks), as median and spread.
* **MACs**: ``ganet.profile.count_macs``, the counter of ``ganet-profile`` (NL's pixel-pair products included).
* **Peak memory**: the resident memory one forward pass adds at its peak, in a separate process that measures
  nothing else: after a warm-up pass, ``/proc/self/clear_refs`` resets the kernel's high-water mark (VmHWM) and the
  pass runs; peak = VmHWM - VmRSS before the pass. glibc is told to give every buffer of 64 KiB or more back to the
  kernel when freed (``MALLOC_MMAP_THRESHOLD_``), so memory freed by an earlier measurement cannot hide this one's.
  (``tracemalloc`` sees none of torch's allocations.) Where clear_refs cannot be written, each measurement gets a
  process of its own and its ``ru_maxrss``.
* **Threads**: one by default. The cost being compared is per operation; on a shared 2-core machine a
  two-thread PyTorch stalls at every barrier while another process holds a core, which swamps millisecond blocks.

    python -m benchmarks.scaling --sizes 32 64 128 --rounds 5    # alone; benchmarks/report.py runs it for the page
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

SIZES = (32, 64, 128, 224, 320)
BLOCKS = ("ga", "se", "sge", "cbam", "nl", "gnl")
NETWORKS = ("plain", "ga", "se", "sge", "cbam", "nl", "gnl")
STAGE2_CHANNELS = 60  # the branch width of stage 2 at the attention models' widths
STAGE2_STRIDE = 8  # ImageNet form: stride-2 stem, max pool, stride-2 first unit of stage 2


def block_feature(size: int) -> int:
    return max(1, size // STAGE2_STRIDE)


def build(kind: str, name: str):
    """A block (kind "block", built at STAGE2_CHANNELS) or an ImageNet-form network, eval mode, seed 0."""
    import torch

    torch.manual_seed(0)
    if kind == "block":
        from ganet.layers import attn_factory

        return attn_factory(name, inplace=False)(STAGE2_CHANNELS).eval()
    from bench_export_ort import build as build_network

    return build_network("shufflenet_v2_g15" if name == "plain" else f"{name}_shufflenet_v2")


def input_for(kind: str, size: int):
    import torch

    g = torch.Generator().manual_seed(0)
    if kind == "block":
        f = block_feature(size)
        return torch.randn(1, STAGE2_CHANNELS, f, f, generator=g)
    return torch.randn(1, 3, size, size, generator=g)


def macs(kind: str, names: tuple[str, ...], sizes: tuple[int, ...]) -> dict[str, dict[str, int]]:
    from ganet.profile import count_macs

    out: dict[str, dict[str, int]] = {}
    for name in names:
        model = build(kind, name)
        for s in sizes:
            out.setdefault(name, {})[str(s)] = count_macs(model, tuple(input_for(kind, s).shape))
    return out


def times(kind: str, names: tuple[str, ...], sizes: tuple[int, ...], rounds: int, baseline: str,
          log: Callable[[str], None]) -> dict:
    """``{size: {name: {"median_ms", "over_<baseline>": spread}}}``, plus NL over GA for the networks."""
    import torch

    from _stats import spread

    models = {name: build(kind, name) for name in names}
    out: dict = {}
    for s in sizes:
        x = input_for(kind, s)
        ts: dict[str, list[float]] = {name: [] for name in names}
        with torch.inference_mode():
            for m in models.values():  # warm-up: allocator, oneDNN primitives
                m(x)
            t_start = time.perf_counter()
            for _ in range(rounds):
                for name, m in models.items():
                    t0 = time.perf_counter()
                    m(x)
                    ts[name].append(time.perf_counter() - t0)
        entry = {}
        for name, t in ts.items():
            entry[name] = {"median_ms": 1000 * statistics.median(t), "ms": spread([1000 * v for v in t])}
            if name != baseline:
                entry[name][f"over_{baseline}"] = spread([a / b for a, b in zip(t, ts[baseline])])
        if baseline != "ga" and {"nl", "ga"} <= set(ts):
            entry["nl"]["over_ga"] = spread([a / b for a, b in zip(ts["nl"], ts["ga"])])
        out[str(s)] = entry
        log(f"  {kind}s at {s}x{s}: {len(names)} x {rounds} rounds in {time.perf_counter() - t_start:.1f} s; "
            + ", ".join(f"{n} {e['median_ms']:.2f} ms" for n, e in entry.items()))
    return out


# ---------------------------------------------------------------------------------------------- peak memory

def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def _peak_of_one_pass(kind: str, name: str, size: int, reset: bool) -> int:
    """Bytes one forward pass adds to the resident set at its peak (this process measures only this)."""
    import ctypes
    import resource

    import torch

    model, x = build(kind, name), input_for(kind, size)
    with torch.inference_mode():
        model(x)  # warm-up: oneDNN primitive caches and lazy initialisation are not the pass's memory
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        base = _status_kib("VmRSS")
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
        out = model(x)
        peak = _status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        del out
    return max(0, peak - base) * 1024


def _memory_worker(spec: list[list]) -> None:
    """Child process: measure each (kind, name, size) of ``spec`` in turn, one JSON line each."""
    import torch

    torch.set_num_threads(int(os.environ.get("GANET_BENCH_THREADS", "1")))
    reset = len(spec) > 1  # one measurement per process needs no reset
    for kind, name, size in spec:
        print(json.dumps([kind, name, size, _peak_of_one_pass(kind, name, size, reset)]), flush=True)


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(plan: list[tuple[str, str, int]], threads: int) -> dict:
    """``{kind: {name: {size: bytes}}}``: one worker process for all (or one per measurement without clear_refs)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "GANET_BENCH_THREADS": str(threads)}
    batches = [plan] if _can_reset_hwm() else [[p] for p in plan]
    out: dict = {}
    for batch in batches:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.scaling", "--memory-worker", json.dumps(batch)],
                              capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parent.parent,
                              timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"memory worker failed: {proc.stderr[-2000:]}")
        for line in proc.stdout.splitlines():
            kind, name, size, peak = json.loads(line)
            out.setdefault(kind, {}).setdefault(name, {})[str(size)] = peak
    out["method"] = ("VmHWM after /proc/self/clear_refs, one worker process" if len(batches) == 1 else
                     "ru_maxrss, one process per measurement")
    return out


# ------------------------------------------------------------------------------------------------- crossover

def crossover(ratio_by_size: dict[int, float], threshold: float) -> dict:
    """The smallest input size at which ``ratio`` reaches ``threshold``, interpolated linearly in log(size) between
    measured sizes. ``{"size": S or None, "status": "measured" | "below" (already at the smallest size) |
    "not_reached", "max_ratio": ...}``."""
    sizes = sorted(ratio_by_size)
    first = ratio_by_size[sizes[0]]
    if first >= threshold:
        return {"size": sizes[0], "status": "below", "max_ratio": max(ratio_by_size.values())}
    for a, b in zip(sizes, sizes[1:]):
        ra, rb = ratio_by_size[a], ratio_by_size[b]
        if ra < threshold <= rb:
            f = (threshold - ra) / (rb - ra)
            size = math.exp(math.log(a) + f * (math.log(b) - math.log(a)))
            return {"size": round(size), "feature": round(size / STAGE2_STRIDE), "status": "measured",
                    "between": [a, b], "max_ratio": max(ratio_by_size.values())}
    out = {"size": None, "status": "not_reached", "max_ratio": max(ratio_by_size.values()),
           "at": max(sizes, key=ratio_by_size.get)}
    (a, ra), (b, rb) = [(s, ratio_by_size[s]) for s in sizes[-2:]] if len(sizes) > 1 else [(0, 0), (0, 0)]
    if ra > 0 and rb > ra:  # the last two points' power law, carried on: an extrapolation, and labelled so
        slope = math.log(rb / ra) / math.log(b / a)
        out["extrapolated_size"] = round(b * (threshold / rb) ** (1 / slope))
    return out


def run(sizes: tuple[int, ...], block_rounds: int, network_rounds: int, threads: int, memory: bool = True,
        log: Callable[[str], None] = print) -> dict:
    import torch

    torch.set_num_threads(threads)
    result: dict = {"sizes": list(sizes), "threads": threads, "batch": 1, "stage2_channels": STAGE2_CHANNELS,
                    "stage2_stride": STAGE2_STRIDE, "block_rounds": block_rounds, "network_rounds": network_rounds}
    log("Scaling: blocks")
    result["block_time"] = times("block", BLOCKS, sizes, block_rounds, "ga", log)
    log("Scaling: networks")
    result["network_time"] = times("network", NETWORKS, sizes, network_rounds, "plain", log)
    result["block_macs"] = macs("block", BLOCKS, sizes)
    result["network_macs"] = macs("network", NETWORKS, sizes)
    if memory:
        t0 = time.perf_counter()
        plan = ([("block", n, s) for n in BLOCKS for s in sizes]
                + [("network", n, s) for n in NETWORKS for s in sizes])
        result["peak_memory"] = peak_memory(plan, threads)
        log(f"  peak memory of {len(plan)} passes in {time.perf_counter() - t0:.0f} s "
            f"({result['peak_memory']['method']})")
    block_ratio = {s: result["block_time"][str(s)]["nl"]["over_ga"]["median"] for s in sizes}
    net_ratio = {s: result["network_time"][str(s)]["nl"]["over_ga"]["median"] for s in sizes}
    result["crossover"] = {"block": {str(t): crossover(block_ratio, t) for t in (2, 10)},
                           "network": {str(t): crossover(net_ratio, t) for t in (2, 10)}}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds per size for the blocks")
    p.add_argument("--network-rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; see the module docstring)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--output", type=Path, default=Path("benchmarks/results/scaling.json"))
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_worker:
        _memory_worker(json.loads(args.memory_worker))
        return
    result = run(tuple(args.sizes), args.rounds, args.network_rounds, args.threads, not args.no_memory)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["crossover"], indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
