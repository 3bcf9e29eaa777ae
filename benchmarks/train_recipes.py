"""Training throughput and what each of the paper's recipes (``ganet-train --preset cifar100 | nl-finetune |
imagenet``) would take.

* ``ganet-train``'s loop against the bare 15-line loop, same model and tensors, rounds alternating
  (``bench_train_throughput.compare``): images/s of each and the per-round ratio (target >= 0.95).
* Per recipe, on this CPU: ``ganet-train``'s own images/s (its ``fit()`` over in-memory batches of the recipe's
  model, input size and augmentation; compute only: an image folder's JPEG decoding runs in loader processes and
  is not included), and the recipe's wall-clock at that rate: epochs x training images / images per second.
* Per recipe, on one GPU, on paper (``estimate_cifar100_gpu.on_paper``, its assumptions: an H100 SXM, 15% of the
  bf16 peak, 5 us per eager kernel launch, 1.5 us under CUDA graphs): the largest of compute, activation traffic and
  kernel launches per step. With a GPU present, real steps there too (``estimate_cifar100_gpu.measure_gpu``).

    python -m benchmarks.train_recipes --rounds 2 --steps 3    # alone; report.py runs it for the page
"""
from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

TRAIN_IMAGES = {"cifar100": 50_000, "imagefolder": 1_281_167}  # CIFAR-100's and ImageNet-1k's training sets
CLASSES = {"cifar100": 100, "imagefolder": 1000}


def recipe(name: str, cpu_batch: int, steps: int, cifar_images_per_s: float | None,
           log: Callable[[str], None]) -> dict:
    import torch

    from bench_train_throughput import ours, synthetic_data
    from estimate_cifar100_gpu import GpuAssumptions, activation_bytes, measure_gpu, on_paper, step_kernels
    from ganet.models import create_model
    from ganet.profile import count_macs
    from ganet.train.presets import PRESETS

    preset = PRESETS[name]
    model_name, size, batch, epochs = preset["model"], preset["input_size"], preset["batch_size"], preset["epochs"]
    images, classes = TRAIN_IMAGES[preset["data"]], CLASSES[preset["data"]]
    steps_total = epochs * math.ceil(images / batch)
    t0 = time.perf_counter()
    cpu_batch = min(cpu_batch, batch)
    if cifar_images_per_s is not None:  # the same model, size and augmentation were just measured
        images_per_s, source = cifar_images_per_s, "ganet-train + augmentation, from the loop comparison"
    else:
        augmentation = {"max_shift": preset["max_shift"], "hflip": preset["hflip"]}
        warm_split, _, _, warm_cfg = synthetic_data(model_name, classes, cpu_batch, size, 1)
        ours(warm_split, warm_cfg.replace(augmentation))  # warm-up: oneDNN primitives, allocator
        split, _, _, cfg = synthetic_data(model_name, classes, cpu_batch, size, steps)
        images_per_s = ours(split, cfg.replace(augmentation))
        source = f"ganet-train fit() with the recipe's augmentation, {steps} steps of batch {cpu_batch}"
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=True)
    x, y = torch.randn(4, 3, size, size), torch.randint(0, classes, (4,))
    kernels, _ = step_kernels(model, opt, x, y)  # launches per step barely depend on the batch
    macs = count_macs(model, (1, 3, size, size))
    act_bytes = activation_bytes(model.eval(), x[:1], 2)  # bf16, per image
    out = {"preset": name, "model": model_name, "input_size": size, "batch_size": batch, "epochs": epochs,
           "train_images": images, "steps_total": steps_total,
           "cpu": {"images_per_s": images_per_s, "source": source, "batch": cpu_batch,
                   "recipe_hours": epochs * images / images_per_s / 3600},
           "per_step": {"kernels": kernels, "train_gflop": 6 * macs * batch / 1e9,
                        "activation_mb_bf16": act_bytes * batch / 1e6},
           "gpu_on_paper": on_paper(6 * macs * batch, act_bytes * batch, kernels, steps_total, GpuAssumptions())}
    if torch.cuda.is_available():
        out["gpu_measured"] = measure_gpu(model_name, batch, size, steps_total)
    log(f"  {name}: {images_per_s:.1f} img/s on this CPU -> {out['cpu']['recipe_hours']:,.0f} h; on paper "
        f"{out['gpu_on_paper']['recipe_minutes_eager']:,.0f} min eager on one GPU ({time.perf_counter() - t0:.0f} s)")
    return out


def run(rounds: int, steps: int, recipe_steps: int, imagenet_batch: int, threads: int,
        log: Callable[[str], None] = print, batch: int = 64) -> dict:
    """``batch``: of the loop comparison and the 32x32 recipes' CPU rate (the recipes' own batch, 64, by default)."""
    import torch

    from bench_train_throughput import compare
    from ganet.train.presets import PRESETS

    torch.set_num_threads(threads)
    log("Training: ganet-train against a bare loop")
    loop = compare("ga_shufflenet_v2_cifar", 100, batch, 32, steps, rounds, log=lambda s: log("  " + s))
    cifar_rate = loop["images_per_s"]["ganet_augmented"]["median"] if batch == 64 else None
    log("Training: the paper's recipes")
    recipes = {name: recipe(name, imagenet_batch if PRESETS[name]["input_size"] > 32 else batch, recipe_steps,
                            cifar_rate if name == "cifar100" else None, log)
               for name in PRESETS if PRESETS[name]["data"] in TRAIN_IMAGES}  # the paper's recipes, not ours
    return {"threads": threads, "loop": loop, "recipes": recipes}


def main() -> None:
    from ganet.system import usable_cpus

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--rounds", type=int, default=3, help="rounds of the loop comparison")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per loop and round")
    p.add_argument("--recipe-steps", type=int, default=3, help="steps timed per recipe")
    p.add_argument("--imagenet-batch", type=int, default=16, help="CPU batch for the 224x224 recipe")
    p.add_argument("--threads", type=int, default=usable_cpus())
    p.add_argument("--output", type=Path, default=Path("benchmarks/results/train_recipes.json"))
    args = p.parse_args()
    result = run(args.rounds, args.steps, args.recipe_steps, args.imagenet_batch, args.threads)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
