"""A hook point for the attention maps a block computes inside its forward pass (not module outputs).

``ganet-visualize`` draws the Group Attention masks of eqs. (1), (3) and (5) and the non-local blocks' pixel-pair
attention from the real forward pass. Those maps live inside ``forward`` (GA computes them fused; the non-local
block inside ``scaled_dot_product_attention``), so a forward hook on a submodule cannot see them. A block that
mixes this in calls :meth:`MaskHooks._emit_masks` with them; with no hook registered that is one falsy attribute
read per forward, and nothing is computed or kept.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch.utils.hooks import RemovableHandle

__all__ = ["MaskHook", "MaskHooks"]

# hook(block, maps): maps by name, e.g. {"unary": (B, G, H, W), ...}; see each block's docstring for its names.
MaskHook = Callable[[torch.nn.Module, dict[str, torch.Tensor]], None]


class MaskHooks:
    """Mixin for an ``nn.Module`` that exposes internal attention maps to hooks."""

    _mask_hooks: OrderedDict[int, MaskHook] | None = None  # per instance once a hook is registered

    def register_mask_hook(self, hook: MaskHook) -> RemovableHandle:
        """Call ``hook(block, maps)`` after every eager forward pass; ``handle.remove()`` stops it.

        The maps are the block's own tensors, detached from autograd: copy them to keep them past the call (in
        inference the block may reuse its buffers in the next pass).
        """
        if self._mask_hooks is None:
            self._mask_hooks = OrderedDict()  # (RemovableHandle keeps a weak reference: a plain dict has none)
        handle = RemovableHandle(self._mask_hooks)
        self._mask_hooks[handle.id] = hook
        return handle

    def _emit_masks(self, maps: dict[str, torch.Tensor]) -> None:
        for hook in list(self._mask_hooks.values()):
            hook(self, {name: m.detach() for name, m in maps.items()})
