"""Convolutional Block Attention Module: channel attention followed by spatial attention.

Paper: "CBAM: Convolutional Block Attention Module", Woo, Park, Lee and Kweon, ECCV 2018.
"""
from __future__ import annotations

import torch
from torch import nn


class CBAM(nn.Module):
    """CBAM: a shared MLP over the average- and max-pooled channel vectors, then a 7x7 conv over the channel-wise
    mean and max maps. ``reduction = 4`` for the same reason as ``SqueezeExcite``."""

    def __init__(self, channels: int, reduction: int = 4, kernel_size: int = 7,
                 act_layer: type[nn.Module] = nn.ReLU, inplace: bool = False) -> None:
        super().__init__()
        if reduction < 1 or channels < reduction:
            raise ValueError(f"CBAM: need 1 <= reduction <= channels, got {reduction} for {channels}")
        if kernel_size % 2 == 0:
            raise ValueError(f"CBAM: kernel_size must be odd, got {kernel_size}")
        hidden = channels // reduction
        self.inplace = inplace  # scale the input in place in inference (autograd off), like nn.ReLU(inplace=True)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), act_layer(inplace=True), nn.Conv2d(hidden, channels, 1))
        self.spatial = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = x.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        mx = x.amax(dim=(2, 3), keepdim=True)
        reuse_input = self.inplace and not torch.is_grad_enabled()
        channel_gate = torch.sigmoid(self.mlp(avg) + self.mlp(mx))
        x = x.mul_(channel_gate) if reuse_input else x * channel_gate
        maps = torch.cat((x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)), dim=1)  # (B, 2, H, W)
        spatial_gate = torch.sigmoid(self.spatial(maps))
        # In inference x is now either the input we may reuse or our own buffer: scale it in place either way.
        return x.mul_(spatial_gate) if not torch.is_grad_enabled() else x * spatial_gate
