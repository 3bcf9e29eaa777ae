"""Group Attention (GA) block.

Paper: "GANet: Unary Attention Reaches Pairwise Attention via Implicit Group Clustering in Light-Weight CNNs",
Cheng Zhuang and Yunlian Sun (equations (1)-(9)).

The block splits a (B, C, H, W) feature map into G groups of C/G channels and applies two unary attentions:

* U4U, unary attention for unary relation (eqs. 1-2): a 1x1 conv over *all* channels gives one map per group;
  ``sigmoid(normalize(.))`` of it scales every channel of that group.
* U4P, unary attention for pairwise relation (eqs. 3-7): per-group 1x1 convs over the U4U output give a pooling mask
  (``softmax`` over H*W of the normalized map) and an assigning mask (``sigmoid`` of the normalized map). The
  pooled group vector is spread back to every pixel by the assigning mask and added with a learnable per-group
  ``alpha`` that starts at 0.

``normalize()`` (eqs. 8-9) standardises every map over H*W, ``(a - mu) / (sigma + eps)`` with the population
standard deviation, then applies a learnable per-map affine (gamma = 1, beta = 0 at init: the identity).

Eq. (4) as printed divides the softmax-weighted sum by H*W. The softmax weights already sum to one, so the sum is a
weighted *mean*; dividing once more shrinks the entity vector by the feature-map area (1/1024 at 32x32, 1/49 at
7x7), which makes the scale alpha has to learn depend on the input resolution and slows its gradient by the same
factor. We follow the weighted-mean reading: ``y = sum_p softmax(a)_p * x_p``, no extra 1/(H*W). A model trained
at one resolution then keeps its meaning at another.

Implementation notes (why ``forward`` does not look like the equations line by line). On a CPU this block is
memory-bound: its cost is the number of full passes over the (B, C, H, W) map and the fresh buffers it allocates,
not its FLOPs. The forward pass makes four passes: the three logit maps come from one matmul over the *input* (the
per-group convs are linear, so ``conv_g(x * u) = u * conv_g(x)``, and the per-map conv bias is removed exactly by
``normalize``), the pooled vectors come from one batched matmul, and ``x * u`` plus the rank-1 pairwise term is one
multiply and one in-place ``addcmul``. Everything else runs on the G small maps, in place during inference.
``tests/test_group_attention.py`` checks it against the direct transcription of the equations in
``group_attention_reference.py``.

Exported graphs (ONNX Runtime, TensorRT) have no in-place ops, and there every op is a pass of its own, so
:meth:`GroupAttention.forward_graph` (switched on by :func:`graph_mode` during export) is shaped for them instead:
the dense U4U conv and the block-diagonal pool/assign convs are two matmuls (one (3G, C) matmul would spend 2.6x the
multiply-adds on zeros), the pool/assign matmul and eq. (4) read ``x * u``, which the output needs anyway (so ``u``
multiplies no small map twice), every map keeps a (B, G, ., N) layout so that nothing is transposed, and the spread
of a map is the mean of its squared deviations (ONNX Runtime's ReduceL2 runs ~8x slower than a Mul and a
ReduceMean).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ganet.layers._mask_hooks import MaskHooks

__all__ = ["GroupAttention", "graph_mode"]


class GroupAttention(MaskHooks, nn.Module):
    """Group Attention block (GANet, eqs. 1-9).

    Args:
        channels: input (and output) channels C; must be divisible by ``groups``.
        groups: number of groups G (the paper uses 15).
        use_u4u: keep the unary attention for unary relation (Table 2 "-U4U" sets it False).
        use_u4p: keep the unary attention for pairwise relation (Table 2 "-U4P" sets it False).
        normalize: keep ``normalize()`` before every mask (Table 2 "-Normalize" sets it False).
        eps: the epsilon of eq. (8).
        inplace: in inference (autograd off), write the output into the input's memory, as ``nn.ReLU(inplace=True)``
            does. The models set it: on a CPU a fresh feature-map-sized buffer costs more than the arithmetic.

    Shape: (B, C, H, W) -> (B, C, H, W).

    Masks: :meth:`register_mask_hook` hands a hook the masks of each eager forward pass, ``{"unary": att^u (eq. 1),
    "pool": att^pp (eq. 3, sums to 1 over H*W), "assign": att^pa (eq. 5)}``, each (B, G, H, W), those the
    ablation keeps (``ganet-visualize`` draws them).
    """

    def __init__(
        self,
        channels: int,
        groups: int = 15,
        use_u4u: bool = True,
        use_u4p: bool = True,
        normalize: bool = True,
        eps: float = 1e-5,
        inplace: bool = False,
    ) -> None:
        super().__init__()
        if groups < 1 or channels % groups != 0:
            raise ValueError(f"GroupAttention: channels ({channels}) must be divisible by groups ({groups})")
        if not (use_u4u or use_u4p):
            raise ValueError("GroupAttention: use_u4u and use_u4p cannot both be False (the block would be empty)")
        self.channels = channels
        self.groups = groups
        self.use_u4u = use_u4u
        self.use_u4p = use_u4p
        self.normalize = normalize
        self.eps = eps
        self.inplace = inplace
        self.graph = False  # set by graph_mode(): forward() becomes forward_graph()

        # Parameter layout follows the paper's modules; the per-map affine of normalize() is (gamma, beta) per group.
        if use_u4u:
            self.u4u_conv = nn.Conv2d(channels, groups, 1)  # eq. (1): all channels -> one map per group
            if normalize:
                self.u4u_gamma = nn.Parameter(torch.ones(groups))
                self.u4u_beta = nn.Parameter(torch.zeros(groups))
        if use_u4p:
            self.pool_conv = nn.Conv2d(channels, groups, 1, groups=groups)  # eq. (3): within each group
            self.assign_conv = nn.Conv2d(channels, groups, 1, groups=groups)  # eq. (5)
            if normalize:
                self.pool_gamma = nn.Parameter(torch.ones(groups))
                self.pool_beta = nn.Parameter(torch.zeros(groups))
                self.assign_gamma = nn.Parameter(torch.ones(groups))
                self.assign_beta = nn.Parameter(torch.zeros(groups))
            self.alpha = nn.Parameter(torch.zeros(groups))  # eq. (7), zero so training starts from U4U alone

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, groups={self.groups}, use_u4u={self.use_u4u}, use_u4p={self.use_u4p}, "
            f"normalize={self.normalize}, inplace={self.inplace}"
        )

    def extra_macs(self, input_shape: tuple[int, ...]) -> int:
        """MACs for ganet-profile: the three 1x1 convs as the paper defines them (C*G + 2*C per pixel; the fused
        matmul's zero blocks are not counted) and the weighted pooling of eq. (4) (C per pixel)."""
        b, c, h, w = input_shape
        per_pixel = (c * self.groups if self.use_u4u else 0) + (3 * c if self.use_u4p else 0)
        return b * h * w * per_pixel

    def _affine_norm(self, logits: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                     inplace: bool) -> torch.Tensor:
        """normalize() of eqs. (8)-(9) over the last dim: gamma * (a - mu) / (sigma + eps) + beta.

        ``inplace`` overwrites ``logits`` (a buffer of our own, in inference): on a CPU, fresh buffers of this size
        cost more in page faults than the arithmetic does.
        """
        mean = logits.mean(dim=-1, keepdim=True)  # (torch.var_mean is several times slower on short CPU rows)
        centered = logits.sub_(mean) if inplace else logits - mean
        sigma = torch.linalg.vector_norm(centered, dim=-1, keepdim=True) * logits.shape[-1] ** -0.5
        scale = gamma.unsqueeze(-1) / (sigma + self.eps)
        return torch.addcmul(beta.unsqueeze(-1), centered, scale, out=centered if inplace else None)

    def _group_weights(self) -> torch.Tensor:
        """The three 1x1 convs as one (3G, C) matrix: U4U rows are dense, pool/assign rows are block-diagonal."""
        g, c = self.groups, self.channels // self.groups
        eye = torch.eye(g, dtype=self.pool_conv.weight.dtype, device=self.pool_conv.weight.device)
        pool = (eye[:, :, None] * self.pool_conv.weight.view(g, 1, c)).reshape(g, self.channels)
        assign = (eye[:, :, None] * self.assign_conv.weight.view(g, 1, c)).reshape(g, self.channels)
        rows = [pool, assign]
        if self.use_u4u:
            rows.insert(0, self.u4u_conv.weight.view(g, self.channels))
        return torch.cat(rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.graph:
            return self.forward_graph(x)
        b, ch, h, w = x.shape
        g, c, n = self.groups, ch // self.groups, h * w
        # (B, G, C/G, N) views of x; for NCHW and channels_last inputs alike (no copy), and the output keeps x's layout.
        xg = x.reshape(b, g, c, n)
        inplace = not torch.is_grad_enabled()  # free to overwrite our own intermediates
        reuse_input = inplace and self.inplace  # ... and the input
        # fp16/bf16 models (a converted copy for GPU serving): the small (B, G, N) maps -- normalisation, sigmoid,
        # softmax -- are computed in fp32, as the fp16 islands of the export are (export/fp16.py: a sum of squares
        # over H*W overflows fp16, the softmax loses its small weights); the feature-map products stay in x's dtype.
        # For fp32 (and fp64) models both .to() calls return their input: nothing changes.
        low = x.dtype
        island = torch.float32 if low in (torch.float16, torch.bfloat16) else low

        if not self.use_u4p:  # Table 2 "-U4P": unary relation only
            logits = torch.matmul(self.u4u_conv.weight.view(g, ch), x.reshape(b, ch, n)).to(island)
            u = self._unary_mask(logits, inplace).unsqueeze(2).to(low)  # (B, G, 1, N)
            if self._mask_hooks:
                self._emit_masks({"unary": u.view(b, g, h, w)})
            return (xg.mul_(u) if reuse_input else xg * u).view(b, ch, h, w)

        # One pass over x for every logit map: (3G, C) @ (B, C, N) -> (B, 3G, N).
        logits = torch.matmul(self._group_weights(), x.reshape(b, ch, n)).to(island)
        if self.use_u4u:
            u = self._unary_mask(logits[:, :g], inplace)  # (B, G, N), eq. (1)
            pair_logits = logits[:, g:].view(b, 2, g, n) * u.unsqueeze(1)  # conv_g(x * u) = u * conv_g(x)
            u = u.to(low).unsqueeze(2)
            x_unary = xg.mul_(u) if reuse_input else xg * u  # (B, G, C/G, N), eq. (2)
        else:
            pair_logits = logits.view(b, 2, g, n)
            x_unary = xg
        if self.normalize:
            # The conv biases are constant per map, so normalize() removes them exactly: skip adding them.
            gamma = torch.stack([self.pool_gamma, self.assign_gamma]).unsqueeze(0)  # (1, 2, G)
            beta = torch.stack([self.pool_beta, self.assign_beta]).unsqueeze(0)
            pair_logits = self._affine_norm(pair_logits, gamma, beta, inplace)
        else:
            pair_logits = pair_logits + torch.stack([self.pool_conv.bias, self.assign_conv.bias]).view(1, 2, g, 1)
        pool_mask = torch.softmax(pair_logits[:, 0], dim=-1).to(low)  # (B, G, N), eq. (3)
        assign_mask = (pair_logits[:, 1].sigmoid_() if inplace else pair_logits[:, 1].sigmoid()).to(low)  # eq. (5)

        # eq. (4), weighted-mean reading: (B, G, 1, N) @ (B, G, N, C/G) -> (B, G, 1, C/G). This operand order runs
        # ~10x faster on CPU than (.., C/G, N) @ (.., N, 1): the reduction runs over the contiguous N of both.
        entity = torch.matmul(pool_mask.unsqueeze(2), x_unary.transpose(2, 3))
        entity = entity.transpose(2, 3) * self.alpha.view(1, g, 1, 1)  # (B, G, C/G, 1); alpha_i scales group i
        # eqs. (6)-(7): x_u + alpha * y * assign, a rank-1 update per group, in one pass.
        if inplace and (self.use_u4u or reuse_input):  # x_unary is our own buffer (or the input we may reuse)
            out = x_unary.addcmul_(entity, assign_mask.unsqueeze(2))
        else:
            out = torch.addcmul(x_unary, entity, assign_mask.unsqueeze(2))
        if self._mask_hooks:
            masks = {"unary": u} if self.use_u4u else {}
            masks |= {"pool": pool_mask, "assign": assign_mask}
            self._emit_masks({name: m.view(b, g, h, w) for name, m in masks.items()})
        return out.view(b, ch, h, w)

    def _unary_mask(self, logits: torch.Tensor, inplace: bool) -> torch.Tensor:
        """att^u of eq. (1) from the bias-free U4U conv output, (B, G, N) -> (B, G, N)."""
        if self.normalize:  # normalize() removes the conv bias exactly, so it is never added
            logits = self._affine_norm(logits, self.u4u_gamma.unsqueeze(0), self.u4u_beta.unsqueeze(0), inplace)
        else:
            logits = logits + self.u4u_conv.bias.view(1, -1, 1)
        return logits.sigmoid_() if inplace else logits.sigmoid()

    def forward_graph(self, x: torch.Tensor) -> torch.Tensor:
        """The same function as :meth:`forward`, in the op shapes an exported graph runs fastest (see the module
        docstring); no in-place ops, so it traces into a pure graph."""
        b, ch, h, w = x.shape
        g, c, n = self.groups, ch // self.groups, h * w
        xg = x.reshape(b, g, c, n)  # (B, G, C/G, N)
        if self.use_u4u:
            u_logits = torch.matmul(self.u4u_conv.weight.view(g, ch), x.reshape(b, ch, n))  # (B, G, N)
            if self.normalize:  # (no conv bias: normalize() removes it exactly)
                u = self._graph_norm(u_logits, self.u4u_gamma, self.u4u_beta).sigmoid()
            else:
                u = (u_logits + self.u4u_conv.bias.view(1, g, 1)).sigmoid()
            x_unary = xg * u.unsqueeze(2)  # (B, G, C/G, N), eq. (2)
        else:
            x_unary = xg
        if not self.use_u4p:
            return x_unary.reshape(b, ch, h, w)
        # Pool and assign logits of every group in one batched matmul over x * u (eq. (3) and (5) as written; the
        # product exists anyway, for the output): (G, 2, C/G) @ (B, G, C/G, N) -> (B, G, 2, N)
        pair_weights = torch.stack([self.pool_conv.weight.view(g, c), self.assign_conv.weight.view(g, c)], 1)
        pair = torch.matmul(pair_weights, x_unary)
        if self.normalize:
            gamma = torch.stack([self.pool_gamma, self.assign_gamma], 1)  # (G, 2)
            beta = torch.stack([self.pool_beta, self.assign_beta], 1)
            pair = self._graph_norm(pair, gamma, beta)
        else:
            pair = pair + torch.stack([self.pool_conv.bias, self.assign_conv.bias], 1).unsqueeze(-1)
        pool_mask, assign_mask = pair.split(1, dim=2)  # (B, G, 1, N) each
        # eq. (4): (B, G, C/G, N) @ (B, G, N, 1); the (B, G, 1, N) -> (B, G, N, 1) step is a reshape, because a
        # Transpose here becomes a slow transposed matmul in ORT
        entity = torch.matmul(x_unary, pool_mask.softmax(dim=-1).reshape(b, g, n, 1))
        out = x_unary + entity * self.alpha.view(1, g, 1, 1) * assign_mask.sigmoid()  # eqs. (6)-(7)
        return out.reshape(b, ch, h, w)

    def _graph_norm(self, logits: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """normalize() over the last dim, for ``forward_graph``: gamma and beta broadcast against logits[..., 0]."""
        centered = logits - logits.mean(dim=-1, keepdim=True)
        sigma = (centered * centered).mean(dim=-1, keepdim=True).sqrt()  # (square() exports as a slow Pow)
        return centered * (gamma.unsqueeze(-1) / (sigma + self.eps)) + beta.unsqueeze(-1)


@contextmanager
def graph_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every :class:`GroupAttention` in ``model`` runs :meth:`GroupAttention.forward_graph`:
    for exporters (ONNX) that record each op as a pass of its own."""
    blocks = [m for m in model.modules() if isinstance(m, GroupAttention)]
    for block in blocks:
        block.graph = True
    try:
        yield model
    finally:
        for block in blocks:
            block.graph = False
