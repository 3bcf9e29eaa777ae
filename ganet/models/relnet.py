"""RelNet: a two-stage ShuffleNetV2 whose receptive field is smaller than its 32x32 input, for the same-different
data set (``ganet-train --data same-different``), where a label can only be read by relating two distant glyphs.

Every unit is the ShuffleNetV2 unit of :mod:`ganet.models.shufflenet_v2`, and an attention block sits where the paper
puts it, on the residual branch of a unit (``attn``); only the layout is shallower::

    3x3 stride-2 conv (24) -> unit (stride 1, 60) -> unit (stride 2, 120) -> 1x1 conv (128) -> global pool -> fc
    32x32                     16x16                  8x8                       8x8

Branch widths are 30 and 60: multiples of G = 15, so SGE, GNL and GA keep the paper's group count, and every
variant has the same width. The non-local variants put their one block in the last (here: only) unit of stage 2, as
the paper's models do; the other attentions sit in both units.

Why shallow. The plain backbone's receptive field is :data:`RECEPTIVE_FIELD` = 11 pixels: 3 (stem) + 2 x 2 (the
stride-1 unit's 3x3 depthwise conv on the stride-2 grid) + 2 x 2 (the stride-2 unit's, entered on that grid); 1x1
convs add nothing. So no feature before the global pool sees two glyphs that are farther apart than that, and the
pooled features of an image are a sum of one term per glyph: a classifier on them cannot relate the two. Any
long-range path (an attention block that pools over the image) can. ``tests/test_same_different.py`` measures the
receptive field by autograd. The paper's CIFAR ShuffleNetV2 sees 69 pixels, more than the whole image.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ganet.layers import attn_factory
from ganet.models._registry import register_model
from ganet.models.shufflenet_v2 import InvertedResidual, _conv_bn

__all__ = ["RelNet", "RECEPTIVE_FIELD", "RELNET_WIDTHS"]

RECEPTIVE_FIELD = 11  # pixels of the input that one feature before the global pool sees (see the docstring)
RELNET_WIDTHS = (24, 60, 120, 128)  # stem, stage 2, stage 3, head; branch widths 30 and 60 divide by G = 15

AttnFactory = Callable[[int], nn.Module]


class RelNet(nn.Module):
    """Stem (3x3, stride 2), one ShuffleNetV2 unit at stride 1, one at stride 2, a 1x1 head conv, pool, fc.

    Args:
        num_classes: classifier outputs.
        widths: output channels of the stem, the two units and the head conv.
        attn: builds an attention block from a unit's branch width (``None``: no attention).
        attn_units: ``"all"`` (both units) or ``"stage2_last"`` (the stage-2 unit only, for the non-local blocks).
        in_chans: input image channels.
    """

    def __init__(
        self,
        num_classes: int = 2,
        widths: Sequence[int] = RELNET_WIDTHS,
        attn: AttnFactory | None = None,
        attn_units: str = "all",
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if len(widths) != 4 or any(w < 1 for w in widths):
            raise ValueError(f"RelNet: expected 4 positive widths (stem, stage2, stage3, head), got {list(widths)}")
        if attn_units not in ("all", "stage2_last"):
            raise ValueError(f"RelNet: attn_units must be 'all' or 'stage2_last', got {attn_units!r}")
        if num_classes < 1:
            raise ValueError(f"RelNet: num_classes must be >= 1, got {num_classes}")
        stem_ch, stage2_ch, stage3_ch, head_ch = widths
        self.num_classes = num_classes
        self.num_features = head_ch
        self.conv1 = nn.Sequential(*_conv_bn(in_chans, stem_ch, 3, 2), nn.ReLU(inplace=True))
        self.stage2 = nn.Sequential(InvertedResidual(stem_ch, stage2_ch, 1, attn))
        self.stage3 = nn.Sequential(InvertedResidual(stage2_ch, stage3_ch, 2, attn if attn_units == "all" else None))
        self.conv5 = nn.Sequential(*_conv_bn(stage3_ch, head_ch, 1), nn.ReLU(inplace=True))
        self.fc = nn.Linear(head_ch, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.conv1(x))  # (B, stage2, H/2, W/2)
        return self.conv5(self.stage3(x))  # (B, head, H/4, W/4)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))  # global average pool: (B, head)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _relnet(attn_name: str | None, num_classes: int, attn_kwargs: dict | None = None, **kwargs) -> RelNet:
    attn_units = "stage2_last" if attn_name in ("nl", "gnl") else "all"
    return RelNet(num_classes, attn=attn_factory(attn_name, **(attn_kwargs or {})), attn_units=attn_units, **kwargs)


@register_model(input_size=32, paper_row="RelNet")
def relnet(num_classes: int = 2, **kwargs) -> RelNet:
    """The plain backbone: no path between features farther apart than 11 pixels."""
    return _relnet(None, num_classes, **kwargs)


@register_model(input_size=32, paper_row="SE-RelNet")
def se_relnet(num_classes: int = 2, **kwargs) -> RelNet:
    return _relnet("se", num_classes, **kwargs)


@register_model(input_size=32, paper_row="SGE-RelNet")
def sge_relnet(num_classes: int = 2, **kwargs) -> RelNet:
    return _relnet("sge", num_classes, **kwargs)


@register_model(input_size=32, paper_row="NL-RelNet")
def nl_relnet(num_classes: int = 2, **kwargs) -> RelNet:
    return _relnet("nl", num_classes, **kwargs)


@register_model(input_size=32, paper_row="GNL-RelNet")
def gnl_relnet(num_classes: int = 2, **kwargs) -> RelNet:
    return _relnet("gnl", num_classes, **kwargs)


@register_model(input_size=32, paper_row="GA-RelNet")
def ga_relnet(num_classes: int = 2, **kwargs) -> RelNet:
    return _relnet("ga", num_classes, **kwargs)


# Table 2's ablations, by name, so that ganet-train can train them.
@register_model(input_size=32, paper_row="GA-RelNet -U4U")
def ga_relnet_no_u4u(num_classes: int = 2, **kwargs) -> RelNet:
    """GA without the unary attention for unary relation (eqs. 1-2)."""
    return _relnet("ga", num_classes, attn_kwargs={"use_u4u": False}, **kwargs)


@register_model(input_size=32, paper_row="GA-RelNet -U4P")
def ga_relnet_no_u4p(num_classes: int = 2, **kwargs) -> RelNet:
    """GA without the unary attention for pairwise relation (eqs. 3-7). The only path across the image left is the
    spatial mean and spread that normalize() takes of each unary map."""
    return _relnet("ga", num_classes, attn_kwargs={"use_u4p": False}, **kwargs)


@register_model(input_size=32, paper_row="GA-RelNet -Normalize")
def ga_relnet_no_norm(num_classes: int = 2, **kwargs) -> RelNet:
    """GA without the normalisation of eqs. (8)-(9)."""
    return _relnet("ga", num_classes, attn_kwargs={"normalize": False}, **kwargs)
