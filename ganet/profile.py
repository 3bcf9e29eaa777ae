"""``ganet-profile``: parameters and MACs of every registered model beside the GANet paper's Table 1.

What the counter counts (a MAC is one multiply-add): every ``nn.Conv2d`` and ``nn.Linear`` that runs (output
elements x inputs per output; biases, BN, activations and other elementwise work are not counted), plus the
matrix products inside attention blocks, which those blocks declare through ``extra_macs(input_shape)``: the
pairwise products of the non-local blocks (2 * N^2 * inner width), and for Group Attention its three 1x1 convs
(C*G + 2*C per pixel, counted as the paper defines them: its fused implementation also multiplies the zero blocks,
which are not counted) and the weighted pooling of eq. (4) (C per pixel). See docs/models.md for the comparison.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

# Table 1 of the paper: (params in millions, MFLOPs (MACs), top-1 %) for CIFAR-100 and ImageNet.
TABLE1: dict[str, dict[str, tuple[float, float, float]]] = {
    "ShuffleNetV2": {"cifar": (1.43, 188.51, 76.88), "imagenet": (2.28, 147.70, 66.80)},
    "SE-ShuffleNetV2": {"cifar": (1.65, 189.39, 77.41), "imagenet": (2.47, 156.45, 68.08)},
    "CBAM-ShuffleNetV2": {"cifar": (1.58, 190.88, 77.40), "imagenet": (2.47, 157.47, 68.38)},
    "SGE-ShuffleNetV2": {"cifar": (1.43, 189.17, 78.02), "imagenet": (2.35, 156.33, 67.33)},
    "NL-ShuffleNetV2": {"cifar": (1.43, 259.28, 77.56), "imagenet": (2.35, 192.78, 67.26)},
    "GNL-ShuffleNetV2": {"cifar": (1.43, 259.28, 78.22), "imagenet": (2.35, 192.78, 68.11)},
    "GA-ShuffleNetV2": {"cifar": (1.48, 194.14, 78.40), "imagenet": (2.39, 163.26, 68.16)},
}
# Rows held to tolerance by the tests (the others are reported; see docs/models.md for why they differ).
CHECKED_ROWS = ("ShuffleNetV2", "SGE-ShuffleNetV2", "GA-ShuffleNetV2")
PARAM_TOLERANCE = 0.015
MACS_TOLERANCE = 0.03


@dataclass(frozen=True)
class ProfileRow:
    model: str
    input_size: int
    num_classes: int
    params: int
    macs: int
    paper_row: str
    paper_params_m: float | None
    paper_macs_m: float | None

    @property
    def params_rel(self) -> float | None:
        return None if self.paper_params_m is None else self.params / 1e6 / self.paper_params_m - 1

    @property
    def macs_rel(self) -> float | None:
        return None if self.paper_macs_m is None else self.macs / 1e6 / self.paper_macs_m - 1


def count_macs(model, input_shape: tuple[int, ...]) -> int:
    """MACs of one forward pass at ``input_shape`` (batch included), counted as the module docstring says."""
    import torch
    from torch import nn

    total = 0

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output.numel() * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features
        if hasattr(module, "extra_macs"):
            total += module.extra_macs(tuple(inputs[0].shape))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(input_shape))
    finally:
        for h in handles:
            h.remove()
    return total


def profile_model(name: str) -> ProfileRow:
    from ganet.models import create_model, model_info

    info = model_info(name)
    model = create_model(name)
    paper = TABLE1.get(info.paper_row, {}).get(info.dataset)
    return ProfileRow(
        model=name,
        input_size=info.input_size,
        num_classes=info.default_num_classes,
        params=sum(p.numel() for p in model.parameters()),
        macs=count_macs(model, (1, 3, info.input_size, info.input_size)),
        paper_row=info.paper_row,
        paper_params_m=paper[0] if paper else None,
        paper_macs_m=paper[1] if paper else None,
    )


def _fmt_rel(rel: float | None) -> str:
    return "" if rel is None else f"{rel * 100:+.1f}%"


def format_table(rows: list[ProfileRow]) -> str:
    head = f"{'model':28s} {'input':>5s} {'classes':>7s} {'params':>11s} {'paper':>6s} {'diff':>6s}   " \
           f"{'MMACs':>8s} {'paper':>7s} {'diff':>6s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        paper_p = f"{r.paper_params_m:.2f}M" if r.paper_params_m else "-"
        paper_m = f"{r.paper_macs_m:.2f}" if r.paper_macs_m else "-"
        lines.append(f"{r.model:28s} {r.input_size:>5d} {r.num_classes:>7d} {r.params:>11,d} {paper_p:>6s} "
                     f"{_fmt_rel(r.params_rel):>6s}   {r.macs / 1e6:>8.2f} {paper_m:>7s} {_fmt_rel(r.macs_rel):>6s}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ganet-profile", allow_abbrev=False,
        description="Print parameters and MACs of the registered models beside the GANet paper's Table 1 "
                    "(CIFAR forms at 32x32 with 100 classes, ImageNet forms at 224x224 with 1000). MACs count "
                    "convolutions, linear layers and attention matrix products; see ganet/profile.py.",
    )
    parser.add_argument("--models", default="*", metavar="PATTERN",
                        help="shell-style filter on model names, e.g. 'ga_*' (default: all)")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    args = parser.parse_args(argv)

    from ganet.models import list_models

    names = list_models(args.models)
    if not names:
        print(f"ganet-profile: no registered model matches {args.models!r}; see the names with --models '*'",
              file=sys.stderr)
        return 2
    rows = [profile_model(n) for n in names]
    if args.json:
        for r in rows:
            print(json.dumps(asdict(r) | {"params_rel": r.params_rel, "macs_rel": r.macs_rel}))
    else:
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
