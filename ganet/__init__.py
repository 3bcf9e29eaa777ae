"""ganet: GA-ShuffleNet models, one checkpoint format, and the tools to train, export and serve them.

The names below are imported lazily, so ``import ganet.preprocess`` or ``ganet.read_checkpoint_info`` work on a
serving host that has neither torch nor torchvision.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "GroupAttention": "ganet.layers",
    "create_model": "ganet.models",
    "list_models": "ganet.models",
    "model_info": "ganet.models",
    "Preprocessing": "ganet.preprocess",
    "CheckpointError": "ganet.checkpoint",
    "CheckpointInfo": "ganet.checkpoint",
    "load_checkpoint": "ganet.checkpoint",
    "read_checkpoint_info": "ganet.checkpoint",
    "save_checkpoint": "ganet.checkpoint",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ganet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
