"""ShuffleNetV1 (g = 3) with an optional attention block in every unit: the GANet paper's second backbone.

Paper: "ShuffleNet: An Extremely Efficient Convolutional Neural Network for Mobile Devices", Zhang, Zhou, Lin and
Sun, CVPR 2018. Layout of its Table 1 for g = 3, x1.0: a 24-channel stem, stages 2..4 of 4 / 8 / 4 units with
output widths 240 / 480 / 960, bottleneck width = stage width / 4 (60 / 120 / 240), global average pool, fc.

A unit (the paper's Fig. 2 (b), (c))::

    1x1 group conv -> BN -> ReLU -> channel shuffle -> 3x3 depthwise conv (stride) -> BN -> [attn]
        -> 1x1 group conv -> BN  ==> add the identity (stride 1) or concat a 3x3 stride-2 avg-pool of the input
                                     (stride 2) ==> ReLU

The first 1x1 conv of the first unit of stage 2 is not grouped: its input is the 24-channel stem, too narrow to
split into groups (the paper, Sec. 3.3). A concatenating unit's branch outputs ``out_ch - in_ch`` channels so that
the concat has ``out_ch``.

Where the attention goes. GANet inserts its block "into bottlenecks like SENet", and Group Attention (like SGE) needs
a width divisible by G = 15. SENet's place, the residual branch's output, does not work here: the downsampling units
emit 216 / 240 / 480 channels there, and 216 is not a multiple of 15. The bottleneck widths 60 / 120 / 240 all are,
so the block (``attn``; an ``nn.Identity`` when there is none) sits on the bottleneck, right after the depthwise
conv's BN, in every one of the 16 units.

CIFAR form (``cifar=True``, 32x32 inputs): a 3x3 stride-1 stem, no max-pool, and stage 2 without downsampling, as
the GANet paper does for ShuffleNetV2, so the stages run at 32x32, 16x16 and 8x8. The first unit of stage 2 then
has stride 1: its shortcut is the identity (no pooling), still concatenated because 24 -> 240 channels.

Size: 1.87M parameters at 1000 classes and 137.5M multiply-adds at 224x224, as the authors' reference
implementation reports (1.9M, 138M; the paper: 140 MFLOPs). The 3.4M sometimes quoted for ShuffleNet is the x1.5
model (widths 360 / 720 / 1440; 3.44M here). ``tests/test_shufflenet_v1.py`` checks all three numbers.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ganet.layers import attn_factory
from ganet.models._registry import register_model
from ganet.models.shufflenet_v2 import channel_shuffle

__all__ = ["ShuffleNetV1", "ShuffleUnit"]

AttnFactory = Callable[[int], nn.Module]


class ShuffleUnit(nn.Module):
    """A ShuffleNetV1 unit (see the module docstring).

    Args:
        in_ch: input channels.
        out_ch: output channels; the bottleneck is ``out_ch // 4`` wide.
        stride: 1 or 2 (2: avg-pool shortcut, concatenated).
        groups: groups of the 1x1 convs and of the channel shuffle.
        group_first_conv: ``False`` for the first unit of stage 2, whose input is the stem.
        attn: builds the attention block from the bottleneck width (``None``: no attention).

    A unit concatenates its shortcut when ``stride == 2`` or ``in_ch != out_ch``; it adds it otherwise.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int,
        groups: int = 3,
        group_first_conv: bool = True,
        attn: AttnFactory | None = None,
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"ShuffleUnit: stride must be 1 or 2, got {stride}")
        if groups < 1:
            raise ValueError(f"ShuffleUnit: groups must be >= 1, got {groups}")
        if out_ch % 4:
            raise ValueError(f"ShuffleUnit: out_ch must be divisible by 4 (bottleneck = out_ch / 4), got {out_ch}")
        self.concat = stride == 2 or in_ch != out_ch
        if self.concat and out_ch <= in_ch:
            raise ValueError(f"ShuffleUnit: a concatenating unit needs out_ch > in_ch, got {in_ch} -> {out_ch}")
        mid_ch = out_ch // 4
        branch_ch = out_ch - in_ch if self.concat else out_ch
        first_groups = groups if group_first_conv else 1
        for what, width, g in (("in_ch", in_ch, first_groups), ("bottleneck width", mid_ch, groups),
                               ("branch width", branch_ch, groups)):
            if width % g:
                raise ValueError(f"ShuffleUnit: {what} ({width}) must be divisible by groups ({g}) "
                                 f"for a unit {in_ch} -> {out_ch}")
        self.groups = groups

        self.conv1 = nn.Conv2d(in_ch, mid_ch, 1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_ch)
        self.conv2 = nn.Conv2d(mid_ch, mid_ch, 3, stride, 1, groups=mid_ch, bias=False)  # depthwise
        self.bn2 = nn.BatchNorm2d(mid_ch)
        self.attn = attn(mid_ch) if attn is not None else nn.Identity()
        self.conv3 = nn.Conv2d(mid_ch, branch_ch, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(branch_ch)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)  # (B, mid, H, W)
        out = channel_shuffle(out, self.groups)
        out = self.attn(self.bn2(self.conv2(out)))  # (B, mid, H/stride, W/stride)
        out = self.bn3(self.conv3(out))  # (B, branch, H/stride, W/stride)
        if self.concat:
            out = torch.cat((self.shortcut(x), out), dim=1)  # (B, in + branch = out, H/stride, W/stride)
        else:
            out = out + x
        return F.relu(out, inplace=True)


class ShuffleNetV1(nn.Module):
    """ShuffleNetV1 backbone + classifier.

    Args:
        stages_repeats: units in stages 2, 3, 4 (the paper: 4, 8, 4).
        stages_out_channels: widths of conv1 and stage2..4; g = 3, x1.0: (24, 240, 480, 960).
        groups: g, the groups of every 1x1 conv except the first one of stage 2.
        num_classes: classifier outputs.
        attn: builds the attention block from a bottleneck width (``None``: no attention).
        cifar: the 32x32 stem and stage-2 layout described in the module docstring.
        in_chans: input image channels.
    """

    def __init__(
        self,
        stages_repeats: Sequence[int] = (4, 8, 4),
        stages_out_channels: Sequence[int] = (24, 240, 480, 960),
        groups: int = 3,
        num_classes: int = 1000,
        attn: AttnFactory | None = None,
        cifar: bool = False,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if len(stages_repeats) != 3 or any(r < 1 for r in stages_repeats):
            raise ValueError(f"ShuffleNetV1: expected 3 stage repeats >= 1, got {list(stages_repeats)}")
        if len(stages_out_channels) != 4 or any(c < 1 for c in stages_out_channels):
            raise ValueError(f"ShuffleNetV1: expected 4 positive widths (stem, stage2..4), "
                             f"got {list(stages_out_channels)}")
        if groups < 1:
            raise ValueError(f"ShuffleNetV1: groups must be >= 1, got {groups}")
        if num_classes < 1:
            raise ValueError(f"ShuffleNetV1: num_classes must be >= 1, got {num_classes}")
        if in_chans < 1:
            raise ValueError(f"ShuffleNetV1: in_chans must be >= 1, got {in_chans}")
        self.num_classes = num_classes
        self.num_features = stages_out_channels[-1]

        stem_ch = stages_out_channels[0]
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_chans, stem_ch, 3, 1 if cifar else 2, 1, bias=False),
            nn.BatchNorm2d(stem_ch),
            nn.ReLU(inplace=True),
        )
        self.maxpool = nn.Identity() if cifar else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        in_ch = stem_ch
        for stage_idx, (repeats, out_ch) in enumerate(zip(stages_repeats, stages_out_channels[1:])):
            first_stride = 1 if (cifar and stage_idx == 0) else 2
            units = []
            for unit_idx in range(repeats):
                units.append(ShuffleUnit(
                    in_ch, out_ch,
                    stride=first_stride if unit_idx == 0 else 1,
                    groups=groups,
                    group_first_conv=not (stage_idx == 0 and unit_idx == 0),
                    attn=attn,
                ))
                in_ch = out_ch
            setattr(self, f"stage{stage_idx + 2}", nn.Sequential(*units))

        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        return self.stage4(self.stage3(self.stage2(x)))  # (B, num_features, H/32, W/32) or (B, ., H/4, W/4) CIFAR

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))  # global average pool: (B, num_features)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


WIDTHS_G3 = (24, 240, 480, 960)  # g = 3, x1.0; bottlenecks 60 / 120 / 240 divide by G = 15
REPEATS = (4, 8, 4)


def _shufflenet_v1(attn_name: str | None, cifar: bool, num_classes: int, attn_kwargs: dict | None = None,
                   **kwargs) -> ShuffleNetV1:
    kwargs.setdefault("stages_out_channels", WIDTHS_G3)
    kwargs.setdefault("groups", 3)
    attn = attn_factory(attn_name, **(attn_kwargs or {}))
    return ShuffleNetV1(REPEATS, num_classes=num_classes, attn=attn, cifar=cifar, **kwargs)


@register_model(input_size=224, paper_row="ShuffleNetV1")
def shufflenet_v1(num_classes: int = 1000, **kwargs) -> ShuffleNetV1:
    """ShuffleNetV1 x1.0, g = 3 (widths 240/480/960)."""
    return _shufflenet_v1(None, False, num_classes, **kwargs)


@register_model(input_size=32, paper_row="ShuffleNetV1")
def shufflenet_v1_cifar(num_classes: int = 100, **kwargs) -> ShuffleNetV1:
    """ShuffleNetV1 x1.0, g = 3, for 32x32 inputs."""
    return _shufflenet_v1(None, True, num_classes, **kwargs)


@register_model(input_size=224, paper_row="GA-ShuffleNetV1")
def ga_shufflenet_v1(num_classes: int = 1000, **kwargs) -> ShuffleNetV1:
    """GA-ShuffleNetV1: a Group Attention block (G = 15) on the bottleneck of every unit."""
    return _shufflenet_v1("ga", False, num_classes, **kwargs)


@register_model(input_size=32, paper_row="GA-ShuffleNetV1")
def ga_shufflenet_v1_cifar(num_classes: int = 100, **kwargs) -> ShuffleNetV1:
    """GA-ShuffleNetV1 for 32x32 inputs."""
    return _shufflenet_v1("ga", True, num_classes, **kwargs)


@register_model(input_size=224, paper_row="SGE-ShuffleNetV1")
def sge_shufflenet_v1(num_classes: int = 1000, **kwargs) -> ShuffleNetV1:
    return _shufflenet_v1("sge", False, num_classes, **kwargs)


@register_model(input_size=32, paper_row="SGE-ShuffleNetV1")
def sge_shufflenet_v1_cifar(num_classes: int = 100, **kwargs) -> ShuffleNetV1:
    return _shufflenet_v1("sge", True, num_classes, **kwargs)
