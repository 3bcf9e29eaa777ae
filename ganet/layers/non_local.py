"""Non-local block (embedded Gaussian) and its group form, the pairwise attentions of GANet's Table 1.

Paper: "Non-local Neural Networks", Wang, Girshick, Gupta and He, CVPR 2018. The GANet paper describes its GNL
only as "the NL operation in a group-wise form" with G = 15; we read it as Disentangled/grouped non-local does:
the same theta/phi/g embeddings, with the pixel-to-pixel affinity computed separately in each of G channel groups
(G attention "heads"). That keeps GNL's parameters and MACs equal to NL's, as in Table 1.

Placement (ganet/models): one block, on the residual branch of the last unit of stage 2 (32x32 on CIFAR, 28x28 on
ImageNet), as the NL paper inserts a single block. Table 1 supports it: NL adds no visible parameters (1.43M) and
about 71 MMACs on CIFAR, which is what one embedded-Gaussian block on 60 channels at 32x32 costs (about 70 MMACs);
a block in every unit would cost many times more.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ganet.layers._mask_hooks import MaskHooks


class NonLocal(MaskHooks, nn.Module):
    """Embedded-Gaussian non-local block: ``z = x + BN(W(softmax(theta(x)^T phi(x)) g(x)))``.

    The inner width is C/2; the output BN's scale starts at 0 so the block starts as the identity (as in the
    paper). ``groups > 1`` splits the inner channels into that many groups with an affinity each (group NL).

    Attention maps: with a hook registered (:meth:`register_mask_hook`), the pass computes the pixel-pair weights
    ``softmax(theta^T phi)`` explicitly instead of inside ``scaled_dot_product_attention`` (which never
    materialises them), hands them to the hook as ``{"attention": (B, groups, H, W, H, W)}`` (query pixel first:
    ``[b, g, y, x]`` is the map query (x, y) attends with, summing to 1), and uses those same weights for the
    output. ``ganet-visualize`` draws them, as the GANet paper's Figure 1 does.
    """

    def __init__(self, channels: int, groups: int = 1, reduction: int = 2, inplace: bool = False) -> None:
        super().__init__()
        inner = channels // reduction
        if inner < 1 or inner % groups != 0:
            raise ValueError(f"NonLocal: inner width {inner} (channels {channels} / {reduction}) must be divisible "
                             f"by groups ({groups})")
        self.groups = groups
        self.inner = inner
        self.inplace = inplace  # add the residual into the input in inference (autograd off)
        self.theta = nn.Conv2d(channels, inner, 1)
        self.phi = nn.Conv2d(channels, inner, 1)
        self.g = nn.Conv2d(channels, inner, 1)
        self.out = nn.Conv2d(inner, channels, 1)
        self.bn = nn.BatchNorm2d(channels)
        nn.init.zeros_(self.bn.weight)

    def extra_macs(self, input_shape: tuple[int, ...]) -> int:
        """MACs of the two pixel-to-pixel products (affinity and aggregation) for ganet-profile."""
        b, _, h, w = input_shape
        return 2 * b * (h * w) ** 2 * self.inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        heads, d = self.groups, self.inner // self.groups

        def split(t: torch.Tensor) -> torch.Tensor:  # (B, inner, H, W) -> (B, heads, N, d), d contiguous
            # The fused attention kernels need stride 1 on d; without it SDPA falls back to its unfused math path,
            # about 5x slower in training here. With d = 1 (GNL at G = inner) the plain view already has it.
            return t.view(b, heads, h * w, 1) if d == 1 else t.view(b, heads, d, h * w).transpose(2, 3).contiguous()

        # softmax(theta^T phi) without the 1/sqrt(d) of dot-product attention: the embedded-Gaussian form.
        q, k, v = split(self.theta(x)), split(self.phi(x)), split(self.g(x))  # (B, heads, N, d) each
        if self._mask_hooks:
            attention = torch.softmax(q @ k.transpose(2, 3), dim=-1)  # (B, heads, N, N), rows sum to 1
            self._emit_masks({"attention": attention.view(b, heads, h, w, h, w)})
            y = attention @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        y = y.transpose(2, 3).reshape(b, self.inner, h, w)  # (B, inner, H, W)
        z = self.bn(self.out(y))
        return x.add_(z) if self.inplace and not torch.is_grad_enabled() else x + z


class GroupNonLocal(NonLocal):
    """Group non-local (GNL): the non-local affinity computed in each of ``groups`` channel groups."""

    def __init__(self, channels: int, groups: int = 15, reduction: int = 2, inplace: bool = False) -> None:
        super().__init__(channels, groups=groups, reduction=reduction, inplace=inplace)
