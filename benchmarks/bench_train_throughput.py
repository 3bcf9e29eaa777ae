"""Training throughput: ``ganet-train``'s loop against a bare 15-line loop, same model, same tensors, same run.

Target: the framework around the loop (batching, augmentation, learning-rate schedule, finiteness
checks, metrics, progress) costs at most 5%, i.e. ours / bare >= 0.95 in images per second of the training phase.
Rounds alternate between the two loops, so machine noise hits both alike; the per-round ratios are reported as
median (min, quartiles, max). Writes benchmarks/results/train_throughput.json.

    python benchmarks/bench_train_throughput.py --rounds 5
    python benchmarks/bench_train_throughput.py --device cuda --steps 200 --output /tmp/train_gpu.json
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _stats import spread  # benchmarks/_stats.py (scripts run from this folder)

from ganet.models import create_model
from ganet.preprocess import Preprocessing
from ganet.train.config import TrainConfig
from ganet.train.data import DataSplit, ImageTensors, preprocess_batch
from ganet.train.engine import fit


def bare_loop(images: torch.Tensor, targets: torch.Tensor, cfg: TrainConfig, num_classes: int) -> float:
    """The baseline: the 15 lines anyone would write. Returns images/s."""
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes=num_classes).to(cfg.device).train()
    images, targets = images.to(cfg.device), targets.to(cfg.device)  # GPU-resident, as ganet-train keeps them
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          nesterov=cfg.nesterov)
    t0 = time.perf_counter()
    for i in range(0, len(targets), cfg.batch_size):
        x, y = images[i:i + cfg.batch_size], targets[i:i + cfg.batch_size]
        loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if cfg.device != "cpu":
        torch.cuda.synchronize()
    return len(targets) / (time.perf_counter() - t0)


def ours(split: DataSplit, cfg: TrainConfig) -> float:
    """One epoch of ganet-train's fit() on the same images; its own images/s of the training phase."""
    with tempfile.TemporaryDirectory() as out:
        fit(cfg.replace({"output": out}), data=split, log=lambda *_: None)
        return json.loads((Path(out) / "metrics.jsonl").read_text().splitlines()[0])["images_per_s"]


def synthetic_data(model: str, classes: int, batch_size: int, input_size: int, steps: int, device: str = "cpu",
                   seed: int = 0) -> tuple[DataSplit, torch.Tensor, torch.Tensor, TrainConfig]:
    """``steps`` batches of random uint8 images as ganet-train's in-memory split, the same images preprocessed for
    the bare loop, their targets, and the one-epoch config (no augmentation, fp32) both loops run."""
    n, s = steps * batch_size, input_size
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, s, s), dtype=torch.uint8, generator=g)
    targets = torch.randint(0, classes, (n,), generator=g)
    prep = Preprocessing.for_input_size(s)
    labels = tuple(str(i) for i in range(classes))
    split = DataSplit(ImageTensors(images, targets), ImageTensors(images[:64], targets[:64]), labels, prep)
    inputs = preprocess_batch(images, prep)  # the bare loop gets its float tensors ready-made
    cfg = TrainConfig(model=model, input_size=s, epochs=1, batch_size=batch_size, warmup_epochs=0.0, max_shift=0,
                      hflip=False, device=device, amp="off")
    return split, inputs, targets, cfg


def compare(model: str, classes: int, batch_size: int, input_size: int, steps: int, rounds: int,
            device: str = "cpu", log=print) -> dict:
    """Rounds alternating the bare loop, ganet-train and ganet-train with augmentation; images/s of each and the
    per-round ratios to the bare loop."""
    split, inputs, targets, cfg = synthetic_data(model, classes, batch_size, input_size, steps, device)
    augmented = cfg.replace({"max_shift": 4, "hflip": True})
    rows = {"bare": [], "ganet": [], "ganet_augmented": []}
    ours(split, cfg), bare_loop(inputs, targets, cfg, classes)  # warm-up: allocator, thread pool
    for r in range(rounds):
        rows["bare"].append(bare_loop(inputs, targets, cfg, classes))
        rows["ganet"].append(ours(split, cfg))
        rows["ganet_augmented"].append(ours(split, augmented))
        log(f"round {r + 1}/{rounds}: " + "  ".join(f"{k} {v[-1]:.1f} img/s" for k, v in rows.items()))
    ratio = [a / b for a, b in zip(rows["ganet"], rows["bare"])]
    ratio_aug = [a / b for a, b in zip(rows["ganet_augmented"], rows["bare"])]
    return {
        "model": model, "batch_size": batch_size, "input_size": input_size, "steps": steps,
        "rounds": rounds, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device != "cpu" else "cpu",
        "images_per_s": {k: spread(v) for k, v in rows.items()},
        "ratio_ganet_over_bare": spread(ratio), "ratio_ganet_augmented_over_bare": spread(ratio_aug),
        "target": ">= 0.95",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--model", default="ga_shufflenet_v2_cifar")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per round and loop")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (both loops in fp32: --amp off)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/train_throughput.json"))
    args = parser.parse_args()

    result = compare(args.model, args.classes, args.batch_size, args.input_size, args.steps, args.rounds, args.device)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    for name, st in (("ganet / bare", result["ratio_ganet_over_bare"]),
                     ("ganet+augmentation / bare", result["ratio_ganet_augmented_over_bare"])):
        print(f"{name}: median {st['median']:.3f} (min {st['min']:.3f}, q {st['q1']:.3f}-{st['q3']:.3f}, "
              f"max {st['max']:.3f})")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
