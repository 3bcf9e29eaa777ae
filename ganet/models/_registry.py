"""The model registry: a name -> builder table, with the facts every tool needs about each model."""
from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ganet.preprocess import Preprocessing

__all__ = ["ModelInfo", "register_model", "create_model", "list_models", "model_info"]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    builder: Callable[..., nn.Module]
    input_size: int  # the square input side the model is designed for (32 for CIFAR forms, 224 for ImageNet)
    paper_row: str  # the Table 1 row this model reproduces, e.g. "GA-ShuffleNetV2"
    default_num_classes: int

    @property
    def dataset(self) -> str:
        return "cifar" if self.input_size == 32 else "imagenet"

    def default_preprocessing(self) -> Preprocessing:
        return Preprocessing.for_input_size(self.input_size)


_MODELS: dict[str, ModelInfo] = {}


def register_model(*, input_size: int, paper_row: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a builder ``fn(num_classes=..., **kwargs) -> nn.Module`` under its function name."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = fn.__name__
        if name in _MODELS:
            raise ValueError(f"register_model: a model named {name!r} is already registered")
        param = inspect.signature(fn).parameters.get("num_classes")
        if param is None or not isinstance(param.default, int):
            raise ValueError(f"register_model: {name} must take num_classes with an integer default")
        default_classes = param.default
        _MODELS[name] = ModelInfo(name, fn, input_size, paper_row, default_classes)
        return fn

    return wrap


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names (sorted), optionally filtered by a shell-style pattern such as ``"ga_*"``."""
    return sorted(n for n in _MODELS if fnmatch.fnmatchcase(n, pattern))


def model_info(name: str) -> ModelInfo:
    try:
        return _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}") from None


def create_model(name: str, num_classes: int | None = None, **kwargs) -> nn.Module:
    """Build a registered model, e.g. ``create_model("ga_shufflenet_v2_cifar", num_classes=10)``.

    Raises ``ValueError`` naming the valid models when ``name`` is unknown.
    """
    info = model_info(name)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return info.builder(**kwargs)
