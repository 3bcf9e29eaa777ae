"""The training configuration: one dataclass, with every field documented; saved resolved beside the outputs.

A run's config is resolved in layers, each overriding the one before: the dataclass defaults (the embedded digits
demo), a named preset (:mod:`ganet.train.presets`), a YAML or TOML config file, then command-line flags.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ganet.system import usable_cpus

AMP_MODES = ("auto", "off", "bf16", "fp16")
OPTIMIZERS = ("sgd", "adamw")
DEVICES = ("auto", "cpu", "cuda")


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every training setting; each field's help text is also its ``ganet-train --help`` entry."""

    # What to train on what
    model: str = _opt("ga_shufflenet_v2_cifar", "registered model name (see ganet-profile)")
    data: str = _opt("digits", "data set: digits (scikit-learn's bundled handwritten digits, no download), cifar10, "
                               "cifar100 (torchvision's on-disk format in --data-dir), imagefolder "
                               "(--data-dir/train/<class>/*.jpg and --data-dir/val/<class>/*.jpg) or same-different "
                               "(generated: are two distant glyphs the same? needs --input-size 32)")
    data_dir: str = _opt("data", "where cifar10/cifar100/imagefolder data live")
    download: bool = _opt(False, "download CIFAR into --data-dir if it is missing (never done unless asked)")
    strict: bool = _opt(False, "stop at the first corrupt image of an image folder instead of skipping and counting")
    input_size: int = _opt(16, "square network input in pixels; the 8x8 digits are upsampled")
    init: str = _opt("", "initialise from this checkpoint's weights (layers whose names and shapes match; the rest "
                         "stay freshly initialised), e.g. a baseline for the Non-Local fine-tune")
    # Optimisation
    epochs: int = _opt(5, "training epochs; the digits default reaches >= 95%% held-out top-1 (97.8%% measured) in "
                          "about 2 minutes on 2 CPU cores")
    batch_size: int = _opt(64, "images per optimizer step, over all processes (each of N torchrun processes takes "
                               "batch_size / N)")
    optimizer: str = _opt("sgd", "sgd (the paper's; with --momentum and --nesterov) or adamw (betas 0.9, 0.999; "
                                 "--weight-decay is then decoupled)")
    lr: float = _opt(0.1, "peak learning rate, reached after the warm-up")
    warmup_epochs: float = _opt(1.0, "linear warm-up from 0, then cosine decay to 0 at the last step; a warm-up as "
                                     "long as the run or longer is cut to half the run (so --epochs 1 works)")
    momentum: float = _opt(0.9, "SGD momentum (sgd only)")
    nesterov: bool = _opt(True, "Nesterov momentum (sgd only)")
    weight_decay: float = _opt(5e-4, "weight decay: L2 in SGD's gradient, decoupled in AdamW")
    label_smoothing: float = _opt(0.1, "label smoothing of the cross-entropy loss")
    # Augmentation of in-memory data sets (image folders use the standard ImageNet random-resized-crop + flip)
    max_shift: int = _opt(2, "random translation of the network input by up to this many pixels (zero-filled in "
                             "normalised space, i.e. with the data set mean); CIFAR's standard is 4")
    hflip: bool = _opt(False, "random horizontal flips (on for CIFAR, off for digits, which flipping changes)")
    # Speed
    device: str = _opt("auto", "auto (CUDA if available, else CPU), cpu or cuda; torchrun processes take their "
                               "LOCAL_RANK's GPU")
    amp: str = _opt("auto", "mixed precision: auto (bf16 on a GPU that supports it, off on CPU), off, bf16 or fp16 "
                            "(fp16 uses a gradient scaler)")
    channels_last: bool = _opt(False, "NHWC memory format (faster convolutions on tensor-core GPUs)")
    compile: bool = _opt(False, "torch.compile the model (slower start, faster steps on GPUs)")
    sync_bn: bool = _opt(False, "SyncBatchNorm across torchrun processes")
    workers: int = _opt(min(4, usable_cpus()), "image-folder decoding processes per training process (the default: "
                                               "4, or fewer where fewer CPUs are usable)")
    # Bookkeeping
    seed: int = _opt(0, "fixes the initial weights and every epoch's order and augmentation (resume stays exact)")
    output: str = _opt("runs/digits", "folder for best/last checkpoints, metrics.jsonl, config.json and "
                                      "TensorBoard events")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> TrainConfig:
        return cls(**_checked(d, source))

    def replace(self, overrides: dict[str, Any], source: str = "overrides") -> TrainConfig:
        return TrainConfig(**(self.to_dict() | _checked(overrides, source)))

    def validate(self, check_data: bool = True) -> None:
        """Raise one ValueError naming every problem: the model, the data (its folder, unless ``check_data`` is
        False for data handed over in memory), then the numbers. Checks only; nothing is loaded or written."""
        from ganet.models import model_info
        from ganet.train.datasets import DATASETS, dataset_location_problem

        problems = []
        try:
            size_problem = model_info(self.model).input_size_problem(self.input_size)
            if size_problem:
                problems.append(size_problem)
        except ValueError as e:  # an unknown model: the message lists the valid names
            problems.append(str(e))
        if self.data not in DATASETS:
            problems.append(f"data must be one of {', '.join(DATASETS)}; got {self.data!r}")
        elif check_data and (where := dataset_location_problem(self.data, self.data_dir, self.download)):
            problems.append(where)
        for name in ("epochs", "batch_size", "input_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.warmup_epochs < 0:
            problems.append(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}")
        if self.amp not in AMP_MODES:
            problems.append(f"amp must be one of {', '.join(AMP_MODES)}; got {self.amp!r}")
        if self.device not in DEVICES:
            problems.append(f"device must be one of {', '.join(DEVICES)}; got {self.device!r}")
        if self.max_shift < 0 or self.workers < 0:
            problems.append("max_shift and workers must be >= 0")
        if self.init and not Path(self.init).is_file():
            problems.append(f"init checkpoint {self.init} does not exist")
        if Path(self.output).exists() and not Path(self.output).is_dir():
            problems.append(f"output {self.output} exists and is not a folder")
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))

    def fitted_schedule(self) -> tuple[TrainConfig, str | None]:
        """This config with a warm-up that fits the run: one of ``epochs`` or more becomes half the run (so that
        ``--epochs 1`` trains with the default warm-up); returns (config, the line to log, or None)."""
        if self.epochs < 1 or self.warmup_epochs < self.epochs:
            return self, None
        half = self.epochs / 2
        return (self.replace({"warmup_epochs": half}),
                f"warm-up of {self.warmup_epochs:g} epochs does not fit a {self.epochs}-epoch run: warming up over "
                f"the first {half:g} epochs")


_FIELD_TYPES = {f.name: type(f.default) for f in fields(TrainConfig)}


def _checked(d: dict[str, Any], source: str) -> dict[str, Any]:
    """Keys known and values of the field's type (ints accepted for floats), else a ValueError naming ``source``."""
    unknown = set(d) - set(_FIELD_TYPES)
    if unknown:
        raise ValueError(f"{source}: unknown config keys {sorted(unknown)}; valid keys: {sorted(_FIELD_TYPES)}")
    out = {}
    for k, v in d.items():
        want = _FIELD_TYPES[k]
        if want is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if type(v) is not want:
            raise ValueError(f"{source}: {k} must be a {want.__name__}, got {v!r}")
        out[k] = v
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A flat mapping of config keys from a .yaml/.yml/.toml/.json file (``preset:`` allowed as a key)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    text = path.read_text()
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml", ".json"):
        raise ValueError(f"config file {path}: expected a .yaml, .yml, .toml or .json file")
    try:
        if suffix == ".toml":
            import tomllib

            d = tomllib.loads(text)
        elif suffix == ".json":
            d = json.loads(text)
        else:
            import yaml

            d = yaml.safe_load(text) or {}
    except Exception as e:  # yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError: name the file
        raise ValueError(f"config file {path} could not be parsed: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"config file {path}: expected a mapping of keys to values, got {type(d).__name__}")
    return {k.replace("-", "_"): v for k, v in d.items()}


def resolve_config(preset: str | None = None, config_file: str | None = None,
                   overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the preset, then the config file, then command-line ``overrides``."""
    from ganet.train.presets import get_preset

    file_values = read_config_file(config_file) if config_file else {}
    file_preset = file_values.pop("preset", None)
    preset = preset or file_preset  # the command line's --preset wins over the file's
    cfg = TrainConfig()
    if preset:
        cfg = cfg.replace(get_preset(preset), source=f"preset {preset}")
    if file_values:
        cfg = cfg.replace(file_values, source=f"config file {config_file}")
    cfg = cfg.replace(overrides or {}, source="command line")
    if preset == "nl-finetune" and not cfg.init:
        raise ValueError("preset nl-finetune fine-tunes a baseline: pass --init CHECKPOINT (e.g. the best.safetensors "
                         "of --preset cifar100 --model shufflenet_v2_cifar)")
    return cfg
