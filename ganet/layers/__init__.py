"""Attention blocks, each usable on its own: ``GroupAttention(channels, groups=15)`` and the paper's baselines."""
from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from torch import nn

from ganet.layers.cbam import CBAM
from ganet.layers.group_attention import GroupAttention
from ganet.layers.non_local import GroupNonLocal, NonLocal
from ganet.layers.sge import SpatialGroupEnhance
from ganet.layers.squeeze_excite import SqueezeExcite

__all__ = ["CBAM", "GroupAttention", "GroupNonLocal", "NonLocal", "SpatialGroupEnhance", "SqueezeExcite",
           "get_attn", "attn_factory", "ATTN_LAYERS"]

ATTN_LAYERS: dict[str, type[nn.Module]] = {
    "se": SqueezeExcite,
    "cbam": CBAM,
    "sge": SpatialGroupEnhance,
    "nl": NonLocal,
    "gnl": GroupNonLocal,
    "ga": GroupAttention,
}


def get_attn(name: str) -> type[nn.Module]:
    """The attention class for a short name ("ga", "se", ...); every class takes ``channels`` first."""
    try:
        return ATTN_LAYERS[name]
    except KeyError:
        raise ValueError(f"unknown attention {name!r}; valid names: {', '.join(sorted(ATTN_LAYERS))}") from None


def attn_factory(name: str | None, **kwargs: Any) -> Callable[[int], nn.Module] | None:
    """What a backbone takes as ``attn``: ``channels -> block``, or ``None`` for no attention.

    Blocks built for a backbone default to ``inplace=True``: inside a unit their input is a fresh activation that
    nothing else reads, so in inference they may overwrite it (training is never in place).
    """
    if name is None:
        return None
    return partial(get_attn(name), **({"inplace": True} | kwargs))
