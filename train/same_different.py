"""The same-different data set (``ganet-train --data same-different``): two glyphs far apart in a 32x32 image; the
label says whether they are the same glyph. Only a network that relates distant pixels can read it.

Every image holds two of the eight 5x5 glyphs in :data:`GLYPHS`, each in a random colour, on black. The glyphs' boxes
lie at least :data:`MIN_CORNER_DISTANCE` = 15 pixels apart (Chebyshev distance of their corners), so no 11x11 window,
the receptive field of the plain :class:`~ganet.models.relnet.RelNet`, holds pixels of both.

No statistic of one glyph alone can tell the classes apart, because images are made in quadruples from two glyphs
a != b, two positions P, Q and four colours, one per (glyph, position)::

    same:       a@P  a@Q        b@P  b@Q
    different:  a@P  b@Q        b@P  a@Q        (each glyph keeps its colour at each position)

Each (glyph, colour, position) occurs exactly once in each class, so the two classes have the same glyph counts,
the same ink, the same colour histogram, the same positions and the same mean image, exactly, in every split. A model
whose pooled features are a sum of one term per glyph (the plain RelNet) therefore has the same mean features on
both classes, for any weights: the best cross-entropy a linear classifier on them can reach is that of a constant
guess, log 2, even on the training set. Labels are balanced exactly (half of every quadruple).

Deterministic from a seed: the training split draws from ``numpy.random.default_rng([seed, 0])``, the held-out split
from ``[seed, 1]``; a quadruple holding an image already drawn (in either split) is dropped and drawn again, so the
splits share no image. 10,000 images take about a second.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from ganet.models.relnet import RECEPTIVE_FIELD
from ganet.preprocess import Preprocessing
from ganet.train.data import DataSplit, ImageTensors

__all__ = ["GLYPHS", "GLYPH_SIZE", "IMAGE_SIZE", "MIN_CORNER_DISTANCE", "LABELS", "TRAIN_SIZE", "HOLDOUT",
           "SameDifferentImages", "generate_same_different", "load_same_different"]

# Eight 5x5 glyphs, rows separated by "|". Their ink differs (8 to 16 pixels); the quadruples make that harmless.
GLYPHS = (
    "#####|#...#|#...#|#...#|#####",  # square
    "..#..|..#..|#####|..#..|..#..",  # plus
    "#...#|.#.#.|..#..|.#.#.|#...#",  # x
    "..#..|.#.#.|#...#|.#.#.|..#..",  # diamond
    "#####|..#..|..#..|..#..|..#..",  # T
    "#....|#....|#....|#....|#####",  # L
    "#...#|#...#|#####|#...#|#...#",  # H
    "#####|#....|###..|#....|#....",  # F
)
GLYPH_SIZE = 5
IMAGE_SIZE = 32
# Corners this far apart (max of |dy|, |dx|) leave a gap of RECEPTIVE_FIELD pixels between the glyphs' boxes.
MIN_CORNER_DISTANCE = RECEPTIVE_FIELD + GLYPH_SIZE - 1
LABELS = ("different", "same")
TRAIN_SIZE = 8000
HOLDOUT = 2000

_MASKS = np.array([[[c == "#" for c in row] for row in g.split("|")] for g in GLYPHS])  # (8, 5, 5) bool


@dataclass
class SameDifferentImages:
    """Images and what they were drawn from, object 0 and object 1 of each image."""

    images: torch.Tensor  # (N, 3, 32, 32) uint8 RGB
    targets: torch.Tensor  # (N,) int64: 1 = same glyph, 0 = different
    glyphs: torch.Tensor  # (N, 2) int64, indices into GLYPHS
    corners: torch.Tensor  # (N, 2, 2) int64, (row, column) of each glyph's top-left pixel
    colours: torch.Tensor  # (N, 2, 3) uint8 RGB

    def __len__(self) -> int:
        return len(self.targets)


def _draw_quadruples(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """``n`` quadruples as (4n, ...) arrays, in the order same(a), same(b), different(a@P), different(b@P)."""
    span = IMAGE_SIZE - GLYPH_SIZE + 1
    corners = np.empty((0, 2, 2), dtype=np.int64)
    while len(corners) < n:  # rejection sampling; about 40% of random pairs are far enough apart
        c = rng.integers(0, span, size=(2 * n, 2, 2))
        far = np.abs(c[:, 0] - c[:, 1]).max(axis=1) >= MIN_CORNER_DISTANCE
        corners = np.concatenate([corners, c[far]])
    corners = corners[:n]  # (n, 2, 2): P, Q
    a = rng.integers(0, len(GLYPHS), size=n)
    b = (a + rng.integers(1, len(GLYPHS), size=n)) % len(GLYPHS)  # uniform over the glyphs other than a
    colour = rng.integers(64, 256, size=(n, 2, 2, 3), dtype=np.uint8)  # [glyph a/b, position P/Q]
    glyphs = np.stack([np.stack([a, a], 1), np.stack([b, b], 1), np.stack([a, b], 1), np.stack([b, a], 1)], 1)
    colours = np.stack([colour[:, 0], colour[:, 1],
                        np.stack([colour[:, 0, 0], colour[:, 1, 1]], 1),
                        np.stack([colour[:, 1, 0], colour[:, 0, 1]], 1)], 1)  # (n, 4, 2, 3)
    return {"glyphs": glyphs.reshape(4 * n, 2), "colours": colours.reshape(4 * n, 2, 3),
            "corners": np.repeat(corners, 4, axis=0), "targets": np.tile([1, 1, 0, 0], n).astype(np.int64)}


def _paint(glyphs: np.ndarray, corners: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) uint8 canvases, black, with each glyph's 5x5 box written at its corner (boxes never overlap)."""
    n = len(glyphs)
    canvas = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    offsets = np.arange(GLYPH_SIZE)
    image = np.arange(n)[:, None, None]
    for obj in range(2):
        rows = corners[:, obj, 0, None, None] + offsets[None, :, None]  # (N, 5, 1)
        cols = corners[:, obj, 1, None, None] + offsets[None, None, :]  # (N, 1, 5)
        box = _MASKS[glyphs[:, obj]][..., None] * colours[:, obj, None, None, :]  # (N, 5, 5, 3)
        canvas[image, rows, cols] = box
    return canvas


def generate_same_different(n: int, seed: int | list[int] = 0,
                            exclude: set[bytes] | None = None) -> SameDifferentImages:
    """``n`` images (a multiple of 4) drawn from ``numpy.random.default_rng(seed)``, in a random order.

    A quadruple holding an image whose digest is in ``exclude``, or that repeats an earlier image, is drawn again;
    the digests of the images kept are added to ``exclude``.
    """
    if n < 4 or n % 4:
        raise ValueError(f"same-different: the number of images must be a positive multiple of 4, got {n}")
    rng = np.random.default_rng(seed)
    seen = exclude if exclude is not None else set()
    parts: dict[str, list[np.ndarray]] = {"glyphs": [], "colours": [], "corners": [], "targets": [], "images": []}
    need = n // 4
    while need:
        drawn = _draw_quadruples(rng, need)
        images = _paint(drawn["glyphs"], drawn["corners"], drawn["colours"])
        keep = np.zeros(need, dtype=bool)
        for q in range(need):
            digests = [hashlib.blake2b(images[4 * q + i].tobytes(), digest_size=16).digest() for i in range(4)]
            if len(set(digests)) == 4 and not seen.intersection(digests):
                seen.update(digests)
                keep[q] = True
        rows = np.repeat(keep, 4)
        for key, value in drawn.items():
            parts[key].append(value[rows])
        parts["images"].append(images[rows])
        need -= int(keep.sum())
    order = rng.permutation(n)
    out = {key: np.concatenate(value)[order] for key, value in parts.items()}
    return SameDifferentImages(
        images=torch.from_numpy(np.ascontiguousarray(out["images"].transpose(0, 3, 1, 2))),  # (N, 3, 32, 32)
        targets=torch.from_numpy(out["targets"]),
        glyphs=torch.from_numpy(out["glyphs"]),
        corners=torch.from_numpy(out["corners"]),
        colours=torch.from_numpy(out["colours"]),
    )


def load_same_different(input_size: int = IMAGE_SIZE, *, train_size: int = TRAIN_SIZE, holdout: int = HOLDOUT,
                        seed: int = 0) -> DataSplit:
    """The training and held-out splits, with a preprocessing definition whose mean and std are the training
    images'. Only ``input_size`` 32 is accepted: resized, the glyphs would no longer lie farther apart than the
    plain backbone sees."""
    if input_size != IMAGE_SIZE:
        raise ValueError(f"same-different images are {IMAGE_SIZE}x{IMAGE_SIZE} and must be read at that size (the "
                         f"glyphs' distance is set by it); got input size {input_size}: pass --input-size "
                         f"{IMAGE_SIZE} or --preset same-different")
    digests: set[bytes] = set()
    train = generate_same_different(train_size, [seed, 0], digests)
    val = generate_same_different(holdout, [seed, 1], digests)
    pixels = train.images.float().div_(255)
    mean = tuple(round(v, 4) for v in pixels.mean(dim=(0, 2, 3)).tolist())
    std = tuple(round(v, 4) for v in pixels.std(dim=(0, 2, 3)).tolist())
    return DataSplit(train=ImageTensors(train.images, train.targets), val=ImageTensors(val.images, val.targets),
                     labels=LABELS, preprocessing=Preprocessing(IMAGE_SIZE, IMAGE_SIZE, mean, std, "bilinear"))
