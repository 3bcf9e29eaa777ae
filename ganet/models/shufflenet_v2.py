"""ShuffleNetV2 with an optional attention block in every unit: the GANet paper's main backbone and its Table 1.

Paper: "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design", Ma et al., ECCV 2018.

The module tree and parameter names match torchvision's ``shufflenet_v2_x1_0`` exactly (``conv1``, ``maxpool``,
``stage2..4``, ``conv5``, ``fc``; ``branch1`` / ``branch2`` inside every unit), so a torchvision state_dict loads
with ``strict=True``. An attention block lives beside ``branch2`` as ``attn`` (an ``nn.Identity`` without
parameters when there is none), applied to the residual branch's output before the concat, as SENet does.

CIFAR form (``cifar=True``, 32x32 inputs): a 3x3 stride-1 stem, no max-pool, and stage 2 without downsampling, as
the GANet paper says, so the stages run at 32x32, 16x16 and 8x8.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ganet.layers import attn_factory
from ganet.models._registry import register_model

__all__ = ["ShuffleNetV2", "InvertedResidual", "channel_shuffle"]

AttnFactory = Callable[[int], nn.Module]


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2)  # (B, C/g, g, H, W)
    return x.reshape(b, c, h, w)


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]


class InvertedResidual(nn.Module):
    """A ShuffleNetV2 unit. ``stride == 2`` or ``in_ch != out_ch`` makes it a two-branch (downsampling) unit."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, attn: AttnFactory | None = None) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"InvertedResidual: stride must be 1 or 2, got {stride}")
        if out_ch % 2:
            raise ValueError(f"InvertedResidual: out_ch must be even, got {out_ch}")
        branch_ch = out_ch // 2
        self.stride = stride
        self.split = stride == 1 and in_ch == out_ch
        if self.split:
            self.branch1 = nn.Sequential()
            branch2_in = branch_ch
        else:
            self.branch1 = nn.Sequential(
                *_conv_bn(in_ch, in_ch, 3, stride, groups=in_ch),
                *_conv_bn(in_ch, branch_ch, 1),
                nn.ReLU(inplace=True),
            )
            branch2_in = in_ch
        self.branch2 = nn.Sequential(
            *_conv_bn(branch2_in, branch_ch, 1),
            nn.ReLU(inplace=True),
            *_conv_bn(branch_ch, branch_ch, 3, stride, groups=branch_ch),
            *_conv_bn(branch_ch, branch_ch, 1),
            nn.ReLU(inplace=True),
        )
        self.attn = attn(branch_ch) if attn is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split:
            x1, x2 = x.chunk(2, dim=1)
            a, b = x1, self.attn(self.branch2(x2))
        else:
            a, b = self.branch1(x), self.attn(self.branch2(x))
        return _concat_shuffle(a, b)


def _concat_shuffle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``channel_shuffle(cat((a, b), 1), 2)`` as one copy instead of two (also in ONNX: one Concat, no Transpose):
    channel 2i is a[i], 2i + 1 is b[i]. Keeps channels_last channels_last: ``b`` (a branch's fresh output) says
    which layout the network runs in; ``a`` may be a chunk of the input, a view contiguous in neither."""
    if b.is_contiguous(memory_format=torch.channels_last) and not b.is_contiguous():
        nhwc = torch.stack((a.permute(0, 2, 3, 1), b.permute(0, 2, 3, 1)), dim=-1)  # (B, H, W, C, 2)
        return nhwc.flatten(3).permute(0, 3, 1, 2)
    return torch.stack((a, b), dim=2).flatten(1, 2)  # (B, C, 2, H, W) -> (B, 2C, H, W)


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 backbone + classifier.

    Args:
        stages_repeats: units in stages 2, 3, 4 (the paper: 4, 8, 4).
        stages_out_channels: widths of conv1, stage2..4 and conv5, e.g. (24, 116, 232, 464, 1024).
        num_classes: classifier outputs.
        attn: builds the attention block from a branch width (``None``: no attention).
        attn_units: which units get it: ``"all"`` (SENet style) or ``"stage2_last"`` (one block in the last unit
            of stage 2, where the non-local models put their single block).
        cifar: the 32x32 stem and stage-2 layout described in the module docstring.
        in_chans: input image channels.
    """

    def __init__(
        self,
        stages_repeats: Sequence[int] = (4, 8, 4),
        stages_out_channels: Sequence[int] = (24, 116, 232, 464, 1024),
        num_classes: int = 1000,
        attn: AttnFactory | None = None,
        attn_units: str = "all",
        cifar: bool = False,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if len(stages_repeats) != 3:
            raise ValueError(f"ShuffleNetV2: expected 3 stage repeats, got {list(stages_repeats)}")
        if len(stages_out_channels) != 5:
            raise ValueError(f"ShuffleNetV2: expected 5 stage widths, got {list(stages_out_channels)}")
        if attn_units not in ("all", "stage2_last"):
            raise ValueError(f"ShuffleNetV2: attn_units must be 'all' or 'stage2_last', got {attn_units!r}")
        if num_classes < 1:
            raise ValueError(f"ShuffleNetV2: num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.num_features = stages_out_channels[-1]

        stem_ch = stages_out_channels[0]
        self.conv1 = nn.Sequential(*_conv_bn(in_chans, stem_ch, 3, 1 if cifar else 2), nn.ReLU(inplace=True))
        self.maxpool = nn.Identity() if cifar else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        in_ch = stem_ch
        for stage_idx, (repeats, out_ch) in enumerate(zip(stages_repeats, stages_out_channels[1:4])):
            first_stride = 1 if (cifar and stage_idx == 0) else 2
            units = []
            for unit_idx in range(repeats):
                if attn_units == "all":
                    unit_attn = attn
                else:  # "stage2_last"
                    unit_attn = attn if (stage_idx == 0 and unit_idx == repeats - 1) else None
                units.append(InvertedResidual(in_ch, out_ch, first_stride if unit_idx == 0 else 1, unit_attn))
                in_ch = out_ch
            setattr(self, f"stage{stage_idx + 2}", nn.Sequential(*units))

        self.conv5 = nn.Sequential(*_conv_bn(in_ch, self.num_features, 1), nn.ReLU(inplace=True))
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.stage4(self.stage3(self.stage2(x)))
        return self.conv5(x)  # (B, num_features, H/32, W/32) or (B, num_features, H/4, W/4) for CIFAR

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))  # global average pool: (B, num_features)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# Widths. torchvision's x1.0 keeps 116/232/464; the attention variants (and the CIFAR baseline) use 120/240/480 so
# that the branch widths 60/120/240 divide by G = 15. With these, Table 1's parameter counts come out exactly.
IMAGENET_WIDTHS = (24, 116, 232, 464, 1024)
GROUP15_WIDTHS = (24, 120, 240, 480, 1024)
REPEATS = (4, 8, 4)



def _shufflenet_v2(attn_name: str | None, cifar: bool, num_classes: int, attn_kwargs: dict | None = None,
                   **kwargs) -> ShuffleNetV2:
    # The non-local rows put one block in the last unit of stage 2 (see ganet/layers/non_local.py for why).
    attn_units = "stage2_last" if attn_name in ("nl", "gnl") else "all"
    kwargs.setdefault("stages_out_channels", GROUP15_WIDTHS if (attn_name or cifar) else IMAGENET_WIDTHS)
    attn = attn_factory(attn_name, **(attn_kwargs or {}))
    return ShuffleNetV2(REPEATS, num_classes=num_classes, attn=attn, attn_units=attn_units, cifar=cifar, **kwargs)


@register_model(input_size=224, paper_row="ShuffleNetV2")
def shufflenet_v2(num_classes: int = 1000, **kwargs) -> ShuffleNetV2:
    """ShuffleNetV2 x1.0, torchvision's layout and widths (116/232/464)."""
    return _shufflenet_v2(None, False, num_classes, **kwargs)


@register_model(input_size=32, paper_row="ShuffleNetV2")
def shufflenet_v2_cifar(num_classes: int = 100, **kwargs) -> ShuffleNetV2:
    """ShuffleNetV2 for 32x32 inputs, widths 120/240/480."""
    return _shufflenet_v2(None, True, num_classes, **kwargs)


@register_model(input_size=224, paper_row="SE-ShuffleNetV2")
def se_shufflenet_v2(num_classes: int = 1000, **kwargs) -> ShuffleNetV2:
    return _shufflenet_v2("se", False, num_classes, **kwargs)


@register_model(input_size=32, paper_row="SE-ShuffleNetV2")
def se_shufflenet_v2_cifar(num_classes: int = 100, **kwargs) -> ShuffleNetV2:
    return _shufflenet_v2("se", True, num_classes, **kwargs)


@register_model(input_size=224, paper_row="CBAM-ShuffleNetV2")
def cbam_shufflenet_v2(num_classes: int = 1000, **kwargs) -> ShuffleNetV2:
    return _shufflenet_v2("cbam", False, num_classes, **kwargs)


@register_model(input_size=32, paper_row="CBAM-ShuffleNetV2")
def cbam_shufflenet_v2_cifar(num_classes: int = 100, **kwargs) -> ShuffleNetV2:
    return _shufflenet_v2("cbam", True, num_classes, **kwargs)


@register_model(input_size=224, paper_row="SGE-ShuffleNetV2")
def sge_shufflenet_v2(num_classes: int = 1000, **kwargs) -> ShuffleNetV2:
    return _shufflenet_v2("sge", False, num_classes, **kwargs)


@register_model(input_size=32, paper_row="SGE-ShuffleNetV2")
def sge_shufflenet_v2_cifar(num_classes: int = 100, **kwargs) -> ShuffleNetV2:
    return _shufflenet_v2("sge", True, num_classes, **kwargs)


@register_model(input_size=224, paper_row="NL-ShuffleNetV2")
def nl_shufflenet_v2(num_classes: int = 1000, **kwargs) -> ShuffleNetV2:
    return _shufflenet_v2("nl", False, num_classes, **kwargs)


@register_model(input_size=32, paper_row="NL-ShuffleNetV2")
def nl_shufflenet_v2_cifar(num_classes: int = 100, **kwargs) -> ShuffleNetV2:
    return _shufflenet_v2("nl", True, num_classes, **kwargs)


@register_model(input_size=224, paper_row="GNL-ShuffleNetV2")
def gnl_shufflenet_v2(num_classes: int = 1000, **kwargs) -> ShuffleNetV2:
    return _shufflenet_v2("gnl", False, num_classes, **kwargs)


@register_model(input_size=32, paper_row="GNL-ShuffleNetV2")
def gnl_shufflenet_v2_cifar(num_classes: int = 100, **kwargs) -> ShuffleNetV2:
    return _shufflenet_v2("gnl", True, num_classes, **kwargs)


@register_model(input_size=224, paper_row="GA-ShuffleNetV2")
def ga_shufflenet_v2(num_classes: int = 1000, **kwargs) -> ShuffleNetV2:
    """GA-ShuffleNetV2: a Group Attention block (G = 15) on the residual branch of every unit."""
    return _shufflenet_v2("ga", False, num_classes, **kwargs)


@register_model(input_size=32, paper_row="GA-ShuffleNetV2")
def ga_shufflenet_v2_cifar(num_classes: int = 100, **kwargs) -> ShuffleNetV2:
    """GA-ShuffleNetV2 for 32x32 inputs."""
    return _shufflenet_v2("ga", True, num_classes, **kwargs)
