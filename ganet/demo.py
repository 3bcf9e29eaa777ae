"""``ganet-demo``: the end-to-end job on the embedded default.

For now (the model library): build a GA-ShuffleNetV2, save it in the checkpoint format, reload it, prove the reloaded
model computes the same logits, and print the Table 1 profile. Training, export and serving join this job as the
``ganet-train`` / ``ganet-export`` / ``ganet-serve`` issues land.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_MODEL = "ga_shufflenet_v2_cifar"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ganet-demo",
        description="Build a GA-ShuffleNet, save and reload its checkpoint, check the reload is exact, and print "
                    "parameters and MACs beside the paper's Table 1.",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"registered model name (default: {DEFAULT_MODEL})")
    parser.add_argument("--output", type=Path, default=Path("runs/demo"),
                        help="folder for the checkpoint (default: runs/demo)")
    args = parser.parse_args(argv)

    import torch

    import ganet
    from ganet.profile import format_table, profile_model

    try:
        info = ganet.model_info(args.model)
    except ValueError as e:
        print(f"ganet-demo: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    model = ganet.create_model(args.model).eval()
    path = ganet.save_checkpoint(args.output / f"{args.model}.safetensors", model, args.model)
    reloaded, meta = ganet.load_checkpoint(path)
    x = torch.randn(4, 3, info.input_size, info.input_size)
    with torch.no_grad():
        same = torch.equal(model(x), reloaded(x))
    print(f"built {args.model}: {sum(p.numel() for p in model.parameters()):,} parameters, {meta.num_classes} classes")
    print(f"saved and reloaded {path} ({path.stat().st_size / 1e6:.1f} MB): logits identical = {same}")
    if not same:
        print("ganet-demo: the reloaded model disagrees with the saved one", file=sys.stderr)
        return 1
    print()
    rows = [profile_model(n) for n in ganet.list_models("*shufflenet_v2*")]
    print(format_table(rows))
    print()
    print(f"Wrote {path}. Next: `ganet-profile` for every model, `pytest` for the tests, "
          f"`python benchmarks/bench_ga_latency.py` for the GA block's CPU cost.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
