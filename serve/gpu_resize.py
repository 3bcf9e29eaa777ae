"""Pillow's resize of the crop's box, as tensor operations on any device: the GPU decoder's resize + center crop.

``ganet.preprocess.image_to_uint8`` (Pillow) stays the definition. Pillow resamples in two separable passes, each a
sum of 22-bit fixed-point integer coefficients times 8-bit pixels, rounded and clipped to 8 bits
(``ganet.kernels.resample`` computes the coefficients exactly as Pillow does). Here each pass is one matrix product
of the pixels, as float64, with the band of coefficients laid out densely: every product and partial sum is an
integer below 2^53, so float64 holds them exactly in any summation order, and ``floor((sum + 2^21) / 2^22)``
clipped to 0..255 is Pillow's rounding. The output is Pillow's bytes, on the CPU and on a GPU alike (checked against
this Pillow on load, both pass orders tried, as the native resize does).

    to_uint8 = TensorResize(prep, device="cuda")           # raises ResizeMismatchError if no pass order matches
    out = to_uint8(rgb)                                     # (3, H, W) or (n, 3, H, W) uint8 tensor -> (.., 3, S, S)
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from ganet.kernels.resample import _FILTERS, PASS_ORDERS, coefficients, identical_to_pillow
from ganet.preprocess import Preprocessing, crop_box

__all__ = ["TensorResize", "ResizeMismatchError", "EXIF_TRANSPOSES", "exif_transpose"]

HALF, ONE = float(1 << 21), float(1 << 22)  # Pillow's rounding constant and its fixed-point one (8-bit images)


class ResizeMismatchError(RuntimeError):
    """No pass order reproduces this Pillow's resize with tensor operations."""


@functools.lru_cache(maxsize=64)
def _band(in_size: int, in0: float, in1: float, out_size: int, interpolation: str) -> tuple[int, int, np.ndarray]:
    """(first, last, dense): the source span [first, last) one pass reads and its (out_size, last - first) float64
    coefficient matrix."""
    bounds, coeffs = coefficients(in_size, in0, in1, out_size, interpolation)
    start, count = bounds[:, 0].astype(np.int64), bounds[:, 1].astype(np.int64)
    first, last = int(start.min()), int((start + count).max())
    taps = np.arange(coeffs.shape[1])
    rows, cols = np.nonzero(taps[None, :] < count[:, None])  # only the taps Pillow reads
    dense = np.zeros((out_size, last - first))
    dense[rows, start[rows] - first + cols] = coeffs[rows, cols]
    dense.flags.writeable = False
    return first, last, dense


@functools.lru_cache(maxsize=512)  # photos come in a few sizes: one copy to the device per geometry
def _device_band(in_size: int, in0: float, in1: float, out_size: int, interpolation: str,
                 device: str) -> tuple[int, int, torch.Tensor]:
    first, last, dense = _band(in_size, in0, in1, out_size, interpolation)
    return first, last, torch.from_numpy(np.array(dense)).to(device)  # (a writable copy: torch wants one)


def _round8(sums: torch.Tensor) -> torch.Tensor:
    """Pillow's clip8((1 << 21) + sum) >> 22, in float64."""
    return torch.floor((sums + HALF) / ONE).clamp_(0, 255)


EXIF_TRANSPOSES = {  # EXIF orientation -> what Pillow's exif_transpose does, on (..., 3, H, W)
    2: lambda x: x.flip(-1),  # FLIP_LEFT_RIGHT
    3: lambda x: x.flip(-1, -2),  # ROTATE_180
    4: lambda x: x.flip(-2),  # FLIP_TOP_BOTTOM
    5: lambda x: x.transpose(-1, -2),  # TRANSPOSE
    6: lambda x: torch.rot90(x, -1, (-2, -1)),  # ROTATE_270 (counter-clockwise): 90 degrees clockwise
    7: lambda x: x.transpose(-1, -2).flip(-1, -2),  # TRANSVERSE
    8: lambda x: torch.rot90(x, 1, (-2, -1)),  # ROTATE_90 (counter-clockwise)
}


def exif_transpose(x: torch.Tensor, orientation: int) -> torch.Tensor:
    return EXIF_TRANSPOSES[orientation](x) if orientation in EXIF_TRANSPOSES else x


class TensorResize:
    """``image_to_uint8``'s resize + center crop for RGB uint8 tensors (3, H, W), or (n, 3, H, W) of one size."""

    def __init__(self, prep: Preprocessing, device: str | torch.device = "cpu", order: str | None = None) -> None:
        if prep.interpolation not in _FILTERS:
            raise ResizeMismatchError(f"no tensor resize for {prep.interpolation!r} interpolation (only "
                                      f"{', '.join(_FILTERS)})")
        self.prep, self.device = prep, torch.device(device)
        self.order = order or self._pillows_order()

    @staticmethod
    def _pillows_order() -> str:
        """The pass order with which these tensor passes give this Pillow's bytes (checked on the CPU)."""
        for order in PASS_ORDERS:
            def to_uint8(img, prep, order=order):
                from ganet.preprocess import to_rgb

                rgb = torch.from_numpy(np.array(to_rgb(img))).permute(2, 0, 1)
                return TensorResize(prep, "cpu", order)(rgb).numpy()
            if identical_to_pillow(to_uint8):
                return order
        raise ResizeMismatchError("the tensor resize reproduces neither of Pillow's known pass orders with this "
                                  "Pillow: decode on the CPU (--decode cpu)")

    def _matrix(self, in_size: int, in0: float, in1: float, out_size: int) -> tuple[int, int, torch.Tensor]:
        return _device_band(in_size, in0, in1, out_size, self.prep.interpolation, str(self.device))

    def __call__(self, rgb: torch.Tensor) -> torch.Tensor:
        h, w = rgb.shape[-2:]
        box, resample = crop_box((w, h), self.prep)
        size = self.prep.input_size
        if not resample:  # an integer crop of the image as it is
            left, top = int(box[0]), int(box[1])
            return rgb[..., top:top + size, left:left + size].contiguous()
        box = tuple(float(np.float32(v)) for v in box)  # as Pillow parses it: C floats
        need_h = size != w or box[0] != 0 or box[2] != size  # Pillow skips a pass that maps the image onto itself
        need_v = size != h or box[1] != 0 or box[3] != size
        hx0, hx1, wh = self._matrix(w, box[0], box[2], size)  # (S, span of columns)
        vy0, vy1, wv = self._matrix(h, box[1], box[3], size)  # (S, span of rows)
        x = rgb
        if need_h and need_v and PASS_ORDERS[self.order](w, h, size, size):  # vertical first, on the columns needed
            x = _round8(torch.matmul(wv, x[..., vy0:vy1, hx0:hx1].double()))
            x = _round8(torch.matmul(x, wh.T))
        else:
            if need_h:  # on the rows the vertical pass reads (all of them when there is none)
                rows = slice(vy0, vy1) if need_v else slice(None)
                x = _round8(torch.matmul(x[..., rows, hx0:hx1].double(), wh.T))
                if need_v:
                    x = _round8(torch.matmul(wv, x))
            elif need_v:
                x = _round8(torch.matmul(wv, x[..., vy0:vy1, :].double()))
        return x.to(torch.uint8)
