"""``ganet-train``: train a registered model and write checkpoints in the project's one format.

With no arguments it trains GA-ShuffleNetV2 (CIFAR form) on scikit-learn's bundled handwritten digits, the embedded
default that needs no download. ``--preset cifar100|nl-finetune|imagenet`` selects the paper's recipes; a YAML or
TOML ``--config`` file and any flag override them. Under ``torchrun`` it trains with DistributedDataParallel.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

from ganet.train.config import TrainConfig, resolve_config
from ganet.train.presets import PRESETS

EPILOG = """\
examples:
  ganet-train                                    # the digits default, ~3 min on 2 CPU cores
  ganet-train --preset cifar100 --data-dir data --download
  ganet-train --preset nl-finetune --init runs/cifar100-baseline/best.safetensors
  ganet-train --preset imagenet --data-dir /data/imagenet --amp bf16 --channels-last --compile
  torchrun --nproc-per-node 8 -m ganet.train.cli --preset imagenet --data-dir /data/imagenet --sync-bn
  ganet-train --config my.yaml --epochs 50       # precedence: defaults < preset < config file < flags
  ganet-train --resume runs/cifar100             # continue a killed run exactly where it stopped
  ganet-train --eval runs/cifar100/best.safetensors --data cifar100 --data-dir data

outputs in --output: best.safetensors (deployable, best held-out top-1), last.safetensors, last.state.safetensors
(resumable state), metrics.jsonl, config.json (resolved) and tensorboard/ (tensorboard --logdir DIR/tensorboard).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ganet-train", allow_abbrev=False, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a GA-ShuffleNet (or any registered model) and write checkpoints in the ganet format. With "
                    "no arguments: ga_shufflenet_v2_cifar on the bundled handwritten digits (1,797 8x8 images, "
                    "fixed 1,437/360 split), about 2 minutes on 2 CPU cores.",
    )
    run = parser.add_argument_group("run")
    run.add_argument("--preset", choices=sorted(PRESETS), help="start from one of the paper's recipes "
                     "(docs/training.md lists every value and each assumption)")
    run.add_argument("--config", metavar="FILE", help="YAML, TOML or JSON file of settings (same names as the flags, "
                     "with _ or -; may hold 'preset')")
    run.add_argument("--resume", metavar="DIR", help="continue the run in DIR where it stopped, with its saved config "
                     "(flags given here override it)")
    run.add_argument("--eval", metavar="CHECKPOINT", help="only evaluate CHECKPOINT on --data's held-out split (with "
                     "the checkpoint's own preprocessing) and print top-1/top-5 as JSON")
    run.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    settings = parser.add_argument_group("settings (defaults are the digits demo's)")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {default!r})"
        if isinstance(default, bool):
            settings.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                  help=help_text)
        else:
            settings.add_argument(flag, type=type(default), default=argparse.SUPPRESS, metavar=f.name.upper(),
                                  help=help_text)
    return parser


def _fail(message: str, code: int = 2) -> int:
    print(f"ganet-train: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    from ganet.train.datasets import CorruptImageError
    from ganet.train.engine import NonFiniteLossError, evaluate_checkpoint, fit

    try:
        if args.resume:
            if args.preset or args.config:  # the run's own config.json decides; flags may still override it
                return _fail("--resume continues a run with its saved config.json: drop --preset/--config (flags "
                             "such as --epochs still apply)")
            config_path = Path(args.resume) / "config.json"
            if not config_path.is_file():
                return _fail(f"cannot resume {args.resume}: no config.json there (is it a ganet-train output folder?)")
            saved = TrainConfig.from_dict(json.loads(config_path.read_text()), source=str(config_path))
            cfg = saved.replace(overrides | {"output": args.resume}, source="command line")
        else:
            cfg = resolve_config(args.preset, args.config, overrides)
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=2))
            return 0
        if args.eval:
            print(json.dumps(evaluate_checkpoint(args.eval, cfg)))
            return 0
        best = fit(cfg, resume=bool(args.resume))
    except (NonFiniteLossError, CorruptImageError) as e:
        return _fail(f"stopped: {e}", 1)
    except (ValueError, FileNotFoundError) as e:  # CheckpointError is a ValueError
        return _fail(str(e))
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, only rank 0 speaks
        print(f"\nWrote {best} (the best held-out checkpoint) and {cfg.output}/last.safetensors.")
        print(f"Next: ganet-export {best} --output {cfg.output}/export")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
