"""``image_to_uint8`` with the resize in native code: the same bytes as Pillow, about 4x faster.

:func:`ganet.preprocess.image_to_uint8` stays the definition (Pillow's antialiased ``resize`` of the crop's box).
Pillow resamples pixel by pixel in scalar C; ``resample.c`` does the identical 22-bit fixed-point arithmetic with
SIMD and writes the network's (3, S, S) layout directly. The coefficients are computed here exactly as Pillow
computes them (double precision, its order of operations, the box rounded to float32 as Pillow parses it), so the
output is bit-identical, not merely close: :func:`load` checks that against Pillow itself before it is ever used,
and falls back to Pillow (returns None) if a future Pillow resamples differently.

    to_uint8 = load()  # None: no compiler, disabled, or not identical to this Pillow
    x = to_uint8(img, prep) if to_uint8 else image_to_uint8(img, prep)
"""
from __future__ import annotations

import ctypes
import functools
import logging
import math
from collections.abc import Callable

import numpy as np
from PIL import Image

from ganet.kernels import KernelUnavailable, library_path
from ganet.preprocess import Preprocessing, crop_box, image_to_uint8, to_rgb

__all__ = ["load", "coefficients", "resample_rgb_chw", "identical_to_pillow", "PASS_ORDERS"]

log = logging.getLogger("ganet.kernels")

PRECISION_BITS = 32 - 8 - 2  # Pillow's, for 8-bit images


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _bicubic(x: np.ndarray) -> np.ndarray:  # Pillow's a = -0.5, its expressions as written
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


_FILTERS: dict[str, tuple[float, Callable[[np.ndarray], np.ndarray]]] = {  # name -> (support, filter)
    "bilinear": (1.0, _bilinear), "bicubic": (2.0, _bicubic)}

# Which pass Pillow runs first, given the image's (w, h) and the output's: the first pass rounds to 8 bits, so the
# order shows in the result. Recent Pillow (13 here, read off its binary and confirmed on 2,343 random resizes
# where the two orders differ) runs the vertical pass first when the height shrinks by more than twice as many
# pixels as the width; older releases always ran the horizontal pass first. load() finds out which this Pillow does.
PASS_ORDERS: dict[str, Callable[[int, int, int, int], bool]] = {
    "by size": lambda w, h, out_w, out_h: h - out_h > 0 and h - out_h > 2 * (w - out_w),
    "horizontal first": lambda w, h, out_w, out_h: False,
}


@functools.lru_cache(maxsize=256)  # one entry per (image size, box) seen: photos come in a few sizes
def coefficients(in_size: int, in0: float, in1: float, out_size: int, interpolation: str
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` for one axis: bounds (out, 2) int32 (first
    source pixel, tap count) and coefficients (out, ksize) int32 in 22-bit fixed point."""
    support, kernel = _FILTERS[interpolation]
    in0_f, in1_f = np.float32(in0), np.float32(in1)  # Pillow parses the box as C floats
    scale = float(in1_f - in0_f) / out_size  # (double)(in1 - in0) / outSize: a float subtraction
    filterscale = max(scale, 1.0)
    support *= filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = float(in0_f) + (np.arange(out_size, dtype=np.float64) + 0.5) * scale  # (out,)
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    ss = 1.0 / filterscale
    weights = np.zeros((out_size, ksize))
    total = np.zeros(out_size)
    for x in range(ksize):  # tap by tap, summed in Pillow's order
        w = np.where(x < count, kernel(((x + xmin).astype(np.float64) - center + 0.5) * ss), 0.0)
        weights[:, x] = w
        total = total + w
    weights = np.where(total[:, None] != 0.0, weights / np.where(total == 0.0, 1.0, total)[:, None], weights)
    fixed = weights * (1 << PRECISION_BITS)
    fixed = np.trunc(np.where(weights < 0, -0.5 + fixed, 0.5 + fixed)).astype(np.int32)
    bounds = np.stack([xmin, count], axis=1).astype(np.int32)
    bounds.flags.writeable = fixed.flags.writeable = False  # cached: shared by every call with this geometry
    return bounds, fixed


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(library_path()))
    fn = lib.ganet_resample_rgb_chw
    i, p = ctypes.c_int, ctypes.c_void_p
    fn.argtypes = [p, i, i, ctypes.c_ssize_t, i, p, p, i, i, i, p, p, i, i, i, p]
    fn.restype = i
    return lib


def resample_rgb_chw(rgb: np.ndarray, box: tuple[float, float, float, float], size: int, interpolation: str,
                     order: str = "by size") -> np.ndarray:
    """Pillow's ``Image.resize((size, size), filter, box)`` of an (H, W, 3) uint8 image, as (3, size, size);
    ``order``: the pass order of the Pillow to match (``PASS_ORDERS``)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.strides[1:] != (3, 1):
        raise ValueError(f"expected (H, W, 3) uint8 with packed pixels, got {rgb.dtype} {rgb.shape} "
                         f"strides {rgb.strides}")
    h, w = rgb.shape[:2]
    box = tuple(float(np.float32(v)) for v in box)  # as Pillow parses it: C floats
    bounds_h, coeffs_h = coefficients(w, box[0], box[2], size, interpolation)
    bounds_v, coeffs_v = coefficients(h, box[1], box[3], size, interpolation)
    # Pillow skips a pass that maps the image onto itself
    need_h = size != w or box[0] != 0 or box[2] != size
    need_v = size != h or box[1] != 0 or box[3] != size
    out = np.empty((3, size, size), np.uint8)
    status = _library().ganet_resample_rgb_chw(
        rgb.ctypes.data, h, w, rgb.strides[0],
        int(need_h), bounds_h.ctypes.data, coeffs_h.ctypes.data, coeffs_h.shape[1], size,
        int(need_v), bounds_v.ctypes.data, coeffs_v.ctypes.data, coeffs_v.shape[1], size,
        int(PASS_ORDERS[order](w, h, size, size)), out.ctypes.data)
    if status != 0:
        raise MemoryError("ganet_resample_rgb_chw could not allocate its scratch memory")
    return out


def _to_uint8(img: Image.Image, prep: Preprocessing, order: str) -> np.ndarray:
    """``image_to_uint8(img, prep)``, with the resize in native code where Pillow would resample."""
    rgb = to_rgb(img)
    box, resample = crop_box(rgb.size, prep)
    if not resample or prep.interpolation not in _FILTERS:
        return image_to_uint8(rgb, prep)
    return resample_rgb_chw(np.asarray(rgb), box, prep.input_size, prep.interpolation, order)


def _identical_to_pillow(order: str) -> bool:
    return identical_to_pillow(functools.partial(_to_uint8, order=order))


def identical_to_pillow(to_uint8: Callable[[Image.Image, Preprocessing], np.ndarray]) -> bool:
    """Whether ``to_uint8`` gives ``image_to_uint8``'s bytes: both filters, down- and upscaling, landscape and
    portrait (both pass orders), odd boxes, on noisy images with hard edges (clipping happens)."""
    rng = np.random.default_rng(0)
    for shape in ((61, 150, 3), (150, 61, 3)):
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        pixels[:, ::7] = 255
        pixels[::5] = 0
        image = Image.fromarray(pixels)
        for interpolation in _FILTERS:
            for input_size, resize_size in ((24, 27), (40, 48), (77, 96)):
                prep = Preprocessing(input_size, resize_size, (0.5,) * 3, (0.5,) * 3, interpolation)
                if not np.array_equal(to_uint8(image, prep), image_to_uint8(image, prep)):
                    return False
    return True


@functools.lru_cache(maxsize=1)
def load() -> Callable[[Image.Image, Preprocessing], np.ndarray] | None:
    """``image_to_uint8``'s native twin, or None (no compiler, kernels disabled, or no pass order of ours gives
    this Pillow's bytes: then the caller keeps Pillow, and the log says why)."""
    try:
        _library()
    except (KernelUnavailable, OSError, AttributeError) as e:
        log.info("native resize unavailable: %s", e, extra={"event": "resize_fallback"})
        return None
    for order in PASS_ORDERS:
        if _identical_to_pillow(order):
            return functools.partial(_to_uint8, order=order)
    log.warning("native resize differs from Pillow %s here: resizing with Pillow", Image.__version__,
                extra={"event": "resize_fallback"})
    return None
