"""How long the paper's CIFAR-100 recipe (``--preset cifar100``: 200 epochs of 50,000 images, batch 64) takes on one
modern GPU, estimated on paper from what can be measured here, and where the time goes.

Measured on this machine, for one training step of ``ga_shufflenet_v2_cifar`` (batch 64, 32x32, 100 classes):
the step time on the CPU, the operators it runs (torch.profiler: how many, and which take the time), the MACs
(``ganet.profile.count_macs``) and the activation bytes every layer writes (forward hooks).

On paper, for a GPU whose numbers are given below (defaults: an H100 SXM), a step costs at least the largest of
    compute:  3 x forward FLOPs / (peak x efficiency)        backward is ~2x forward
    memory:   3 x 2 x activation bytes / HBM bandwidth       every activation written and read, forward and backward
    launches: kernels x per-kernel overhead                  eager PyTorch, or CUDA graphs under torch.compile
With ``--measure-gpu`` on a machine with a GPU, it also times real steps there (eager and bf16 autocast).

    python benchmarks/estimate_cifar100_gpu.py
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ganet.models import create_model
from ganet.profile import count_macs
from ganet.train.presets import PRESETS

# Ops that create views or metadata only: no kernel on a GPU.
VIEW_OPS = {"aten::view", "aten::reshape", "aten::_reshape_alias", "aten::t", "aten::transpose", "aten::permute",
            "aten::expand", "aten::as_strided", "aten::unsqueeze", "aten::squeeze", "aten::detach", "aten::alias",
            "aten::slice", "aten::select", "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::chunk",
            "aten::split", "aten::flatten", "aten::unflatten", "aten::narrow", "aten::lift_fresh", "aten::resize_",
            "aten::_unsafe_view", "aten::contiguous", "aten::result_type", "aten::is_nonzero", "aten::item",
            "aten::_local_scalar_dense", "aten::to", "aten::_to_copy", "aten::set_", "aten::zeros",
            "aten::expand_as", "aten::view_as", "aten::numpy_T", "aten::split_with_sizes"}


def training_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def activation_bytes(model: nn.Module, x: torch.Tensor, bytes_per_value: int) -> int:
    """Bytes every leaf module writes in one forward pass."""
    total = 0

    def hook(_m, _i, out):
        nonlocal total
        total += sum(t.numel() for t in (out if isinstance(out, tuple) else (out,)) if torch.is_tensor(t))

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total * bytes_per_value


@dataclass(frozen=True)
class GpuAssumptions:
    """What the estimate assumes of the GPU (every field is a flag of this script)."""

    name: str = "H100 SXM"
    peak_tflops: float = 989.0  # dense bf16 tensor-core peak
    efficiency: float = 0.15  # fraction of peak small 1x1/depthwise convolutions reach
    hbm_tbs: float = 3.35  # memory bandwidth, TB/s
    launch_us: float = 5.0  # eager per-kernel overhead (CPU-bound)
    graph_launch_us: float = 1.5  # per kernel under CUDA graphs


def step_kernels(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
                 ) -> tuple[int, list[tuple[str, float]]]:
    """Kernels one training step would launch on a GPU (leaf ATen ops that do work, from torch.profiler on the
    CPU), and the share of CPU time of the eight costliest op types."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        training_step(model, opt, x, y)
    # Leaf operators (no child op) that do work: what would each be a kernel launch on a GPU.
    events = [e for e in prof.events() if e.name.startswith("aten::") and e.name not in VIEW_OPS
              and not any(c.name.startswith("aten::") for c in e.cpu_children)]
    by_op = Counter()
    for e in events:
        by_op[e.name] += e.self_cpu_time_total
    total_us = sum(by_op.values())
    return len(events), [(name, us / total_us) for name, us in by_op.most_common(8)]


def on_paper(train_flops: float, act_bytes: float, kernels: int, steps_total: int, gpu: GpuAssumptions) -> dict:
    """A step's time on ``gpu``: the largest of compute, memory traffic and kernel launches (module docstring);
    ``train_flops`` and ``act_bytes`` are per step (the whole batch)."""
    compute_s = train_flops / (gpu.peak_tflops * 1e12 * gpu.efficiency)
    memory_s = 3 * 2 * act_bytes / (gpu.hbm_tbs * 1e12)
    eager_s = max(compute_s, memory_s, kernels * gpu.launch_us * 1e-6)
    graphs_s = max(compute_s, memory_s, kernels * gpu.graph_launch_us * 1e-6)
    return {"name": gpu.name, "assumed_peak_tflops": gpu.peak_tflops, "assumed_efficiency": gpu.efficiency,
            "hbm_tbs": gpu.hbm_tbs, "compute_ms": compute_s * 1e3, "memory_ms": memory_s * 1e3,
            "launch_ms_eager": kernels * gpu.launch_us * 1e-3,
            "launch_ms_cuda_graphs": kernels * gpu.graph_launch_us * 1e-3,
            "step_ms_eager": eager_s * 1e3, "step_ms_compiled": graphs_s * 1e3,
            "recipe_minutes_eager": steps_total * eager_s / 60,
            "recipe_minutes_compiled": steps_total * graphs_s / 60}


def main() -> None:
    defaults = GpuAssumptions()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--model", default=PRESETS["cifar100"]["model"])
    parser.add_argument("--steps", type=int, default=10, help="CPU steps timed")
    parser.add_argument("--gpu-name", default=defaults.name)
    parser.add_argument("--peak-tflops", type=float, default=defaults.peak_tflops, help="dense bf16 tensor-core peak")
    parser.add_argument("--efficiency", type=float, default=defaults.efficiency,
                        help="fraction of peak small 1x1/depthwise convolutions reach (assumption)")
    parser.add_argument("--hbm-tbs", type=float, default=defaults.hbm_tbs, help="memory bandwidth, TB/s")
    parser.add_argument("--launch-us", type=float, default=defaults.launch_us,
                        help="eager per-kernel overhead (CPU-bound), µs")
    parser.add_argument("--graph-launch-us", type=float, default=defaults.graph_launch_us,
                        help="per kernel under CUDA graphs, µs")
    parser.add_argument("--measure-gpu", action="store_true", help="also time real steps on this machine's GPU")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/cifar100_gpu_estimate.json"))
    args = parser.parse_args()
    gpu = GpuAssumptions(args.gpu_name, args.peak_tflops, args.efficiency, args.hbm_tbs, args.launch_us,
                         args.graph_launch_us)

    preset = PRESETS["cifar100"]
    batch, size, epochs = preset["batch_size"], preset["input_size"], preset["epochs"]
    steps_total = epochs * math.ceil(50_000 / batch)
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=100)
    # foreach: the multi-tensor SGD that CUDA uses by default (a handful of kernels, not 3 per parameter).
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, foreach=True)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 100, (batch,))

    for _ in range(2):
        training_step(model, opt, x, y)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        training_step(model, opt, x, y)
        times.append(time.perf_counter() - t0)
    cpu_step = statistics.median(times)

    kernels, top_ops = step_kernels(model, opt, x, y)
    macs = count_macs(model, (1, 3, size, size)) * batch
    train_flops = 3 * 2 * macs
    act_bytes = activation_bytes(model.eval(), x, 2)  # bf16 activations under autocast

    result = {
        "model": args.model, "batch": batch, "input_size": size, "epochs": epochs, "steps_total": steps_total,
        "cpu": {"step_s_median": cpu_step, "step_s_min": min(times), "step_s_max": max(times),
                "threads": torch.get_num_threads(), "recipe_hours": steps_total * cpu_step / 3600,
                "top_ops_share": top_ops},
        "per_step": {"kernels": kernels, "train_gflop": train_flops / 1e9, "activation_mb_bf16": act_bytes / 1e6},
        "gpu": on_paper(train_flops, act_bytes, kernels, steps_total, gpu),
    }
    if args.measure_gpu and torch.cuda.is_available():
        result["gpu_measured"] = measure_gpu(args.model, batch, size, steps_total)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    g = result["gpu"]
    print(f"{args.model}, batch {batch}, {size}x{size}: {steps_total:,} steps for the {epochs}-epoch recipe")
    print(f"CPU here: {cpu_step * 1e3:.0f} ms/step (min {min(times) * 1e3:.0f}, max {max(times) * 1e3:.0f}) -> "
          f"{result['cpu']['recipe_hours']:.0f} h for the recipe on {torch.get_num_threads()} threads")
    print("  where the CPU time goes: " + ", ".join(f"{n[6:]} {s:.0%}" for n, s in top_ops))
    print(f"per step: {kernels} kernels, {train_flops / 1e9:.0f} GFLOP, {act_bytes / 1e6:.0f} MB of bf16 activations")
    print(f"{args.gpu_name} on paper: compute {g['compute_ms']:.2f} ms, memory {g['memory_ms']:.2f} ms, launches "
          f"{g['launch_ms_eager']:.2f} ms eager / {g['launch_ms_cuda_graphs']:.2f} ms with CUDA graphs")
    print(f"  -> {g['step_ms_eager']:.2f} ms/step eager = {g['recipe_minutes_eager']:.0f} min; "
          f"{g['step_ms_compiled']:.2f} ms/step compiled = {g['recipe_minutes_compiled']:.0f} min (+ evaluation)")
    if "gpu_measured" in result:
        print(f"measured on {result['gpu_measured']['device']}: {json.dumps(result['gpu_measured'])}")
    print(f"wrote {args.output}")


def measure_gpu(model_name: str, batch: int, size: int, steps_total: int) -> dict:
    """Real step times on the GPU: fp32 eager and bf16 autocast + channels_last, with GPU-resident data."""
    device = torch.device("cuda")
    out = {"device": torch.cuda.get_device_name()}
    for name, amp, fmt in (("fp32", None, torch.contiguous_format), ("bf16_nhwc", torch.bfloat16,
                                                                       torch.channels_last)):
        torch.manual_seed(0)
        model = create_model(model_name, num_classes=100).to(device, memory_format=fmt)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
        y = torch.randint(0, 100, (batch,), device=device)
        for i in range(60):
            if i == 20:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=amp, enabled=amp is not None):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        torch.cuda.synchronize()
        step = (time.perf_counter() - t0) / 40
        out[name] = {"step_ms": step * 1e3, "recipe_minutes": steps_total * step / 60}
    return out


if __name__ == "__main__":
    main()
