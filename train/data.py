"""Data sets for ``ganet-train``, as in-memory uint8 RGB tensors, and the transforms built from the checkpoint's
:class:`~ganet.preprocess.Preprocessing` (the same definition export and serving read).

The embedded default is scikit-learn's handwritten digits: 1,797 8x8 grey images of 10 classes, shipped inside
scikit-learn, so nothing is downloaded. Its held-out split is fixed: a permutation of all images drawn with
``torch.Generator().manual_seed(0)``; the first 360 (20%) are held out, the other 1,437 train.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ganet.preprocess import Preprocessing, normalize

__all__ = ["ImageTensors", "DataSplit", "load_digits", "DIGITS_HOLDOUT", "preprocess_batch", "draw_augmentation",
           "augment"]

DIGITS_HOLDOUT = 360
DIGITS_MEAN = (0.3053,) * 3  # digits scaled to [0, 1]
DIGITS_STD = (0.3760,) * 3


@dataclass
class ImageTensors:
    images: torch.Tensor  # (N, 3, H, W) uint8, RGB
    targets: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.targets)


@dataclass
class DataSplit:
    train: ImageTensors
    val: ImageTensors
    labels: tuple[str, ...]
    preprocessing: Preprocessing


def load_digits(input_size: int = 16) -> DataSplit:
    """scikit-learn's digits as RGB uint8 (grey replicated), with the fixed split of the module docstring."""
    from sklearn.datasets import load_digits as sk_load_digits

    digits = sk_load_digits()
    grey = torch.from_numpy(digits.images).float().mul(255 / 16).round().to(torch.uint8)  # (N, 8, 8), 0..16 -> 0..255
    images = grey.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()  # (N, 3, 8, 8)
    targets = torch.from_numpy(digits.target).long()
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(0))
    val, train = order[:DIGITS_HOLDOUT], order[DIGITS_HOLDOUT:]
    prep = Preprocessing(input_size, input_size, DIGITS_MEAN, DIGITS_STD, "bilinear")
    return DataSplit(
        train=ImageTensors(images[train], targets[train]),
        val=ImageTensors(images[val], targets[val]),
        labels=tuple(str(name) for name in digits.target_names),
        preprocessing=prep,
    )


def preprocess_batch(images: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """Apply ``prep`` to a uint8 batch: resize the shorter side, center-crop, scale to [0, 1], normalise.

    (B, 3, H, W) uint8 -> (B, 3, S, S) float32, S = ``prep.input_size``.
    """
    x = images.float().div_(255)
    h, w = x.shape[-2:]
    scale = prep.resize_size / min(h, w)
    size = (max(prep.resize_size, round(h * scale)), max(prep.resize_size, round(w * scale)))
    if size != (h, w):
        mode = prep.interpolation
        x = F.interpolate(x, size=size, mode=mode, antialias=mode != "nearest" and scale < 1,
                          **({} if mode == "nearest" else {"align_corners": False}))
    top, left = (size[0] - prep.input_size) // 2, (size[1] - prep.input_size) // 2
    return normalize(x[..., top:top + prep.input_size, left:left + prep.input_size], prep)


def draw_augmentation(n: int, max_shift: int, hflip: bool,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (dy, dx) offsets in [0, 2 * max_shift] (n, 2) and flip flags (n,), drawn on the CPU ``generator``.

    Drawn for a whole global batch, so that every torchrun process slices the same numbers and a resumed run replays
    them exactly, whatever the device.
    """
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5 if hflip else torch.zeros(n, dtype=torch.bool)
    return offsets, flips


def augment(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Mirror the flagged images, then translate each by its offset minus ``max_shift`` (zero fill):
    (B, C, S, S) -> (B, C, S, S) on ``x``'s device, one gather for the whole batch.

    Works on the normalised batch, where zero is the data set's mean, a neutral fill.
    """
    if max_shift == 0 and not flips.any():
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)  # (B, C, S + 2m, S + 2m)
    offsets, flips = offsets.to(x.device), flips.to(x.device)
    rows = offsets[:, :1] + torch.arange(h, device=x.device)  # (B, S)
    base, dx = torch.arange(w, device=x.device), offsets[:, 1:]
    # A mirrored image's column c sits at padded column (w - 1 + 2m) - c; its window starts dx further in.
    cols = torch.where(flips[:, None], (w - 1 + 2 * max_shift) - dx - base, base + dx)  # (B, S)
    batch = torch.arange(b, device=x.device)[:, None, None]
    # Advanced indexing on dims 0, 2, 3 puts the indexed dims first: (B, S, S, C) -> (B, C, S, S).
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
