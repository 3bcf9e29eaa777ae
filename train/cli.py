"""``ganet-train``: train a registered model and write checkpoints in the project's one format.

With no arguments it trains GA-ShuffleNetV2 (CIFAR form) on scikit-learn's bundled handwritten digits, the embedded
default that needs no download. The CIFAR and image-folder data sets, presets, config files, mixed precision and
multi-GPU training are still being built (issue 3).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from ganet.train.config import TrainConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ganet-train",
        description="Train a GA-ShuffleNet (or any registered model) and write best.safetensors, last.safetensors, "
                    "metrics.jsonl and config.json to --output. With no arguments: ga_shufflenet_v2_cifar on the "
                    "bundled handwritten digits (1,797 8x8 images, fixed 1,437/360 split), about 2 minutes on 2 "
                    "CPU cores.",
    )
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        parser.add_argument(flag, type=type(default), default=default,
                            help=f"{f.metadata['help']} (default: %(default)s)")
    parser.add_argument("--resume", metavar="DIR", help="continue the run in DIR where it stopped")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ganet.train.engine import NonFiniteLossError, fit

    if args.resume:
        import json
        from pathlib import Path

        config_path = Path(args.resume) / "config.json"
        if not config_path.is_file():
            print(f"ganet-train: cannot resume {args.resume}: no config.json there (is it a ganet-train output "
                  "folder?)", file=sys.stderr)
            return 2
        cfg = TrainConfig.from_dict(json.loads(config_path.read_text()) | {"output": args.resume})
    else:
        cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    try:
        best = fit(cfg, resume=bool(args.resume))
    except (ValueError, FileNotFoundError) as e:
        print(f"ganet-train: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"ganet-train: stopped: {e}", file=sys.stderr)
        return 1
    print(f"\nWrote {best} (the best held-out checkpoint) and {cfg.output}/last.safetensors.")
    print(f"Next: ganet-export {best} --output {cfg.output}/export   (once the export issue lands)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
