"""The training configuration: one dataclass, with every field documented; saved resolved beside the outputs."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every training setting; each field's help text is also its ``ganet-train --help`` entry."""

    model: str = _opt("ga_shufflenet_v2_cifar", "registered model name (see ganet-profile)")
    data: str = _opt("digits", "data set; 'digits' is scikit-learn's bundled handwritten digits (no download)")
    input_size: int = _opt(16, "square network input in pixels; the 8x8 digits are upsampled")
    epochs: int = _opt(10, "training epochs; the digits default reaches >= 95%% held-out top-1 in under 3 minutes "
                           "on 2 CPU cores")
    batch_size: int = _opt(64, "images per optimizer step")
    lr: float = _opt(0.1, "peak learning rate of SGD with Nesterov momentum, reached after the warm-up")
    warmup_epochs: float = _opt(1.0, "linear warm-up from 0, then cosine decay to 0 at the last step")
    momentum: float = _opt(0.9, "SGD momentum")
    weight_decay: float = _opt(5e-4, "L2 weight decay")
    label_smoothing: float = _opt(0.1, "label smoothing of the cross-entropy loss")
    max_shift: int = _opt(2, "training augmentation: random translation of the network input, in pixels")
    seed: int = _opt(0, "fixes the initial weights and every epoch's order and augmentation (resume stays exact)")
    output: str = _opt("runs/digits", "folder for best/last checkpoints, metrics.jsonl and config.json")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; valid keys: {sorted(known)}")
        return cls(**d)

    def validate(self) -> None:
        problems = []
        if self.data != "digits":
            problems.append(f"data {self.data!r} is not available yet (only 'digits'; CIFAR and image folders are "
                            "still being built)")
        for name in ("epochs", "batch_size", "input_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_epochs < self.epochs:
            problems.append(f"warmup_epochs must be in [0, epochs), got {self.warmup_epochs}")
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))
