"""The training configuration: one dataclass, with every field documented; saved resolved beside the outputs."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class TrainConfig:
    model: str = "ga_shufflenet_v2_cifar"  # registered model name (ganet.list_models())
    data: str = "digits"  # data set; "digits" is scikit-learn's bundled handwritten digits (no download)
    input_size: int = 16  # square network input; digits are 8x8, upsampled
    epochs: int = 10  # with the digits default: >= 95% held-out top-1 in under 3 minutes on 2 CPU cores
    batch_size: int = 64
    lr: float = 0.1  # peak learning rate (after warm-up), SGD with Nesterov momentum
    warmup_epochs: float = 1.0  # linear warm-up from 0, then cosine to 0 at the last step
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    max_shift: int = 2  # training augmentation: random translation in pixels of the network input
    seed: int = 0  # fixes the initial weights, every epoch's order and augmentation (resume stays exact)
    output: str = "runs/digits"  # folder for best/last checkpoints, metrics.jsonl and config.json

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
