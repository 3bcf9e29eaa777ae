"""A tiny image folder written by the tests: classes a few steps of training can tell apart, any size."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("dark", "light", "striped")


def image_folder(root: Path, per_class: int, val_per_class: int = 2, classes: tuple[str, ...] = CLASSES) -> Path:
    """``root/{train,val}/<class>/<i>.png``: 12x12 flat dark, flat light and striped images with noise."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for k, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                base = np.full((12, 12, 3), 40 + 170 * (k % 3 == 1), np.uint8)
                if k % 3 == 2:
                    base[::2] = 230
                noisy = np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(noisy).save(root / split / cls / f"{i}.png")
    return root
