"""A direct, loop-free transcription of GANet's equations (1)-(9), the reference GroupAttention is checked against.

Written for clarity, not speed (the tests compare the fast block with it; benchmarks/bench_ga_latency.py times it as
the "straightforward" baseline): every mask is computed exactly as printed, with the conv biases, on the (B, C, H, W)
tensors, using the parameters of a ``ganet.GroupAttention`` instance. Eq. (4) uses the weighted-mean reading
(no extra 1/(H*W)), as the block's docstring explains.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ganet.layers.group_attention import GroupAttention


def normalize(a: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    """Eqs. (8)-(9) on (B, G, H, W) maps; gamma, beta: (G,)."""
    mu = a.mean(dim=(2, 3), keepdim=True)
    sigma = ((a - mu) ** 2).mean(dim=(2, 3), keepdim=True).sqrt()
    a_bar = (a - mu) / (sigma + eps)
    return gamma.view(1, -1, 1, 1) * a_bar + beta.view(1, -1, 1, 1)


def reference_masks(block: GroupAttention, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The masks as printed: ``{"unary": att^u (eq. 1), "pool": att^pp (eq. 3), "assign": att^pa (eq. 5)}``, each
    (B, G, H, W), those the block's ablation keeps."""
    b, c, h, w = x.shape
    g = block.groups
    norm = (lambda a, gm, bt: normalize(a, gm, bt, block.eps)) if block.normalize else (lambda a, gm, bt: a)

    masks = {}
    x_u = x
    if block.use_u4u:
        masks["unary"] = torch.sigmoid(norm(block.u4u_conv(x), getattr(block, "u4u_gamma", None),
                                            getattr(block, "u4u_beta", None)))  # eq. (1)
        x_u = (x.view(b, g, c // g, h, w) * masks["unary"].unsqueeze(2)).reshape(b, c, h, w)  # eq. (2)
    if block.use_u4p:
        pp = norm(block.pool_conv(x_u), getattr(block, "pool_gamma", None), getattr(block, "pool_beta", None))
        masks["pool"] = F.softmax(pp.view(b, g, h * w), dim=-1).view(b, g, h, w)  # eq. (3)
        pa = norm(block.assign_conv(x_u), getattr(block, "assign_gamma", None), getattr(block, "assign_beta", None))
        masks["assign"] = torch.sigmoid(pa)  # eq. (5)
    return masks


def group_attention_reference(block: GroupAttention, x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    g = block.groups
    masks = reference_masks(block, x)

    x_groups = x.view(b, g, c // g, h, w)
    x_u = x_groups * masks["unary"].unsqueeze(2) if "unary" in masks else x_groups  # eq. (2): (B, G, C/G, H, W)
    if not block.use_u4p:
        return x_u.reshape(b, c, h, w)

    y = (masks["pool"].unsqueeze(2) * x_u).sum(dim=(3, 4), keepdim=True)  # eq. (4), weighted mean: (B, G, C/G, 1, 1)
    x_p = y * masks["assign"].unsqueeze(2)  # eq. (6)
    out = x_u + block.alpha.view(1, g, 1, 1, 1) * x_p  # eq. (7)
    return out.reshape(b, c, h, w)
