"""The model registry: a name -> builder table, with the facts every tool needs about each model."""
from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ganet.preprocess import Preprocessing

__all__ = ["MAX_INPUT_SCALE", "ModelInfo", "register_model", "create_model", "list_models", "model_info"]


# The largest input side accepted, as a multiple of the side a model is built for: compute grows with its square
# (16x at 4x), and a CIFAR form fed ImageNet's 224 (7x: 49x the compute, 9.5 GMACs an image) is a mislabelled model.
MAX_INPUT_SCALE = 4


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

    def input_size_problem(self, input_size: int) -> str | None:
        """Why ``input_size`` does not fit this model (None when it does): at most MAX_INPUT_SCALE x its own side."""
        if input_size <= MAX_INPUT_SCALE * self.input_size:
            return None
        ratio = (input_size / self.input_size) ** 2
        other = ("the ImageNet form (without _cifar) downsamples 4x in its stem" if self.input_size == 32
                 else "the _cifar form keeps full resolution through stage 2")
        return (f"{self.name} is built for {self.input_size}x{self.input_size} inputs and is asked for "
                f"{input_size}x{input_size}, {ratio:.0f}x the pixels and compute per image (at most "
                f"{MAX_INPUT_SCALE * self.input_size}x{MAX_INPUT_SCALE * self.input_size} is accepted); for large "
                f"inputs pick a model built for them ({other})")


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
