"""Squeeze-and-Excitation channel attention.

Paper: "Squeeze-and-Excitation Networks", Hu, Shen and Sun, CVPR 2018.
"""
from __future__ import annotations

import torch
from torch import nn


class SqueezeExcite(nn.Module):
    """SE block: global average pool -> 1x1 conv (C -> C/r) -> ReLU -> 1x1 conv (C/r -> C) -> sigmoid -> scale.

    ``reduction = 4``: the GANet paper does not give r; 4 comes closest to its Table 1 parameter count for
    SE-ShuffleNetV2 on CIFAR-100 (see docs/models.md).
    """

    def __init__(self, channels: int, reduction: int = 4, act_layer: type[nn.Module] = nn.ReLU,
                 inplace: bool = False) -> None:
        super().__init__()
        if reduction < 1 or channels < reduction:
            raise ValueError(f"SqueezeExcite: need 1 <= reduction <= channels, got {reduction} for {channels}")
        hidden = channels // reduction
        self.inplace = inplace  # scale the input in place in inference (autograd off), like nn.ReLU(inplace=True)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = act_layer(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        s = self.fc2(self.act(self.fc1(s)))
        gate = torch.sigmoid(s)
        return x.mul_(gate) if self.inplace and not torch.is_grad_enabled() else x * gate
