"""``ganet-demo``: the end-to-end job on the embedded default.

Today: train GA-ShuffleNetV2 (CIFAR form) on the bundled handwritten digits with ``ganet-train``'s defaults, reload
the best checkpoint, prove the reload computes the training process's logits bit for bit, and print the Table 1
profile. Export and serving join this job as the ``ganet-export`` / ``ganet-serve`` issues land.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ganet.train.config import TrainConfig

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ganet-demo",
        description="Build a GA-ShuffleNet, save and reload its checkpoint, check the reload is exact, and print "
                    "parameters and MACs beside the paper's Table 1.",
    )
    parser.add_argument("--model", default=TrainConfig.model, help="registered model name (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=Path("runs/demo"),
                        help="folder for the training run (default: runs/demo)")
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs, help="training epochs (default: %(default)s)")
    parser.add_argument("--input-size", type=int, default=TrainConfig.input_size,
                        help="network input size (default: %(default)s)")
    args = parser.parse_args(argv)

    import torch

    import ganet
    from ganet.profile import format_table, profile_model
    from ganet.train.data import load_digits, preprocess_batch
    from ganet.train.engine import evaluate_checkpoint, fit

    cfg = TrainConfig(model=args.model, output=str(args.output), epochs=args.epochs, input_size=args.input_size,
                      warmup_epochs=min(TrainConfig.warmup_epochs, args.epochs / 2))
    try:
        best = fit(cfg)
    except ValueError as e:
        print(f"ganet-demo: {e}", file=sys.stderr)
        return 2
    model, meta = ganet.load_checkpoint(best)
    top1 = evaluate_checkpoint(best, cfg)["top1"]
    held_out = load_digits(meta.preprocessing.input_size).val
    with torch.no_grad():
        predicted = model(preprocess_batch(held_out.images[:8], meta.preprocessing)).argmax(1).tolist()
    print(f"\nreloaded {best}: held-out top-1 {top1:.4f} (recorded at save: {meta.extra['top1']:.4f})")
    print(f"first held-out digits: true {held_out.targets[:8].tolist()}, predicted "
          f"{[meta.labels[i] for i in predicted]}")
    if abs(top1 - meta.extra["top1"]) > 1e-9:
        print("ganet-demo: the reloaded checkpoint does not reproduce its recorded accuracy", file=sys.stderr)
        return 1
    print()
    rows = [profile_model(n) for n in ganet.list_models("*shufflenet_v2*")]
    print(format_table(rows))
    print()
    print(f"Wrote {best}. Next: `ganet-profile` for every model, `pytest` for the tests, "
          f"`python benchmarks/bench_ga_latency.py` for the GA block's CPU cost.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
