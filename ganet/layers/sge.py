"""Spatial Group-wise Enhance.

Paper: "Spatial Group-wise Enhance: Improving Semantic Feature Learning in Convolutional Networks",
Li, Hu and Yang, 2019 (arXiv:1905.09646).
"""
from __future__ import annotations

import torch
from torch import nn


class SpatialGroupEnhance(nn.Module):
    """SGE: in each of G groups, the similarity of every pixel to the group's mean vector is normalised over space,
    scaled and shifted per group (weight 0, bias 1 at init, as in the paper) and used as a sigmoid gate."""

    def __init__(self, channels: int, groups: int = 15, eps: float = 1e-5, inplace: bool = False) -> None:
        super().__init__()
        if groups < 1 or channels % groups != 0:
            raise ValueError(f"SpatialGroupEnhance: channels ({channels}) must be divisible by groups ({groups})")
        self.groups = groups
        self.eps = eps
        self.inplace = inplace  # gate the input in place in inference (autograd off), like nn.ReLU(inplace=True)
        self.weight = nn.Parameter(torch.zeros(groups))
        self.bias = nn.Parameter(torch.ones(groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        g = self.groups
        xg = x.reshape(b, g, c // g, h * w)  # (B, G, C/G, N)
        sim = (xg * xg.mean(dim=-1, keepdim=True)).sum(dim=2)  # (B, G, N)
        sim = sim - sim.mean(dim=-1, keepdim=True)
        sim = sim / (sim.std(dim=-1, keepdim=True) + self.eps)
        gate = torch.sigmoid(sim * self.weight.view(1, g, 1) + self.bias.view(1, g, 1))
        gate = gate.unsqueeze(2)
        return (xg.mul_(gate) if self.inplace and not torch.is_grad_enabled() else xg * gate).view_as(x)
