"""Encoded image bytes -> the network's uint8 input (3, S, S), with limits checked before any pixel is decoded.

Geometry is ``ganet.preprocess.image_to_uint8`` (EXIF orientation, palette, grey, 16-bit, CMYK, alpha), the one
pipeline training, export parity and serving share. Its resize runs in native code here where the kernel library
builds (``ganet.kernels.resample``: Pillow's arithmetic, the same bytes, checked against Pillow on load): 0.27
instead of 0.98 ms for a 640x427 photo at 224, a quarter of what serving spent decoding an image.

Large JPEGs are decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (libjpeg's scaled IDCT, Pillow's ``draft``):
at 224x224, decode + resize + crop of a 3000x2000 photo takes 17 instead of 37 ms (1/2), of a 4032x3024 one 19
instead of 123 ms (1/4). It is not bit-identical to a full decode, so it is used only for large images: the
reduced image keeps at least ``DRAFT_MARGIN`` x the resize target on its shorter side (over 48 large JPEGs made
from real photographs the network's input then moves by 0.32/255 on average, min PSNR 44.7 dB: about what one
more save at JPEG quality 85 does, 0.28/255 and 48.4 dB), and the image has at least ``DRAFT_MIN_PIXELS`` pixels
(smaller ones decode in a few ms and stay exactly what ``image_to_uint8`` gives). benchmarks/bench_jpeg_draft.py.
"""
from __future__ import annotations

import functools
import io
import warnings
from collections.abc import Callable

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from ganet.preprocess import Preprocessing, image_to_uint8
from ganet.serve.errors import ServeError

__all__ = ["FORMATS", "decode_image", "decode_opened", "load_opened", "open_image", "probe_image", "jpeg_draft_scale", "resizer", "DRAFT_MARGIN",
           "DRAFT_MIN_PIXELS"]

FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO")  # MPO: multi-picture JPEG from phone cameras
_EXPECTED = "expected a JPEG, PNG, WebP, BMP, GIF or TIFF image"

DRAFT_MARGIN = 2.0  # reduced shorter side >= 2x resize_size: the final resize still averages >= 2x2 pixels
DRAFT_MIN_PIXELS = 1_000_000  # below 1 MP a full decode costs <= ~6 ms (bench_jpeg_draft.py): keep it exact

# Pillow warns above its own pixel limit; ours (max_pixels, read from the header) decides instead. One filter for the
# process rather than warnings.catch_warnings() per image: that swaps the global filter list, which races when
# several decode threads enter and leave it.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# PNG text chunks are decompressed while the header is read, before any budget applies; Pillow allows 64 MB of
# them. A classifier reads none: 4 MB is ample for real metadata (ICC, XMP) and bounds what a header can cost.
PngImagePlugin.MAX_TEXT_MEMORY = 4 * 2**20


def jpeg_draft_scale(size: tuple[int, int], prep: Preprocessing, margin: float = DRAFT_MARGIN,
                     min_pixels: int = DRAFT_MIN_PIXELS) -> int:
    """The DCT-domain reduction (1, 2, 4 or 8) for a JPEG of ``size`` (w, h): the largest ``s`` that divides both
    sides and leaves the shorter one at least ``margin * prep.resize_size``. 1: decode fully.

    Divisibility keeps the geometry exact: libjpeg rounds a reduced side up, and a partial last row or column
    would shift the center crop by a pixel (mean |delta| 3.7/255 on a 2731x2048 photo). Camera and video sizes
    (4032x3024, 4000x3000, 1920x1080, ...) are multiples of 8."""
    w, h = size
    if w * h < min_pixels:
        return 1
    for s in (8, 4, 2):
        if w % s == 0 and h % s == 0 and min(w, h) // s >= margin * prep.resize_size:
            return s
    return 1


def probe_image(data: bytes, prep: Preprocessing, max_pixels: int, *, jpeg_draft: bool = True
                ) -> tuple[Image.Image, int]:
    """The opened image (header read, no pixel decoded) and the JPEG DCT scale its decode will use (1: full).
    Raises ServeError 400/413/415 naming the problem."""
    if not data:
        raise ServeError(400, "empty_body", f"the image is empty (0 bytes); {_EXPECTED}")
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as e:
        raise ServeError(413, "image_too_large", f"image too large: {e}") from None
    except UnidentifiedImageError:
        raise ServeError(415, "unsupported_media_type",
                         f"not a recognised image ({len(data)} bytes starting {data[:8]!r}); {_EXPECTED}") from None
    except Exception as e:  # a header Pillow recognises but cannot parse
        raise ServeError(400, "corrupt_image", f"corrupt image header ({type(e).__name__}: {e})") from None
    if img.format not in FORMATS:
        raise ServeError(415, "unsupported_media_type", f"{img.format} images are not served; {_EXPECTED}")
    width, height = img.size
    if width * height > max_pixels:
        raise ServeError(413, "image_too_large", f"{img.format} image of {width}x{height} = {width * height} "
                                                 f"pixels exceeds the limit of {max_pixels} pixels")
    if width < 1 or height < 1:
        raise ServeError(400, "corrupt_image", f"{img.format} image of {width}x{height} pixels has no pixels")
    draft = jpeg_draft_scale(img.size, prep) if jpeg_draft and img.format in ("JPEG", "MPO") else 1
    return img, draft


def load_opened(img: Image.Image, draft: int) -> Image.Image:
    """Decode the pixels of a probed image (at 1/``draft`` scale for a JPEG). ServeError 400 if the stream is
    truncated or corrupt."""
    try:
        if draft > 1:
            width, height = img.size
            img.draft(img.mode, (width // draft, height // draft))  # same mode; libjpeg decodes at 1/scale
        img.load()  # GIF / TIFF: the first frame
    except Exception as e:  # truncated or corrupt stream: bad input, never a 500
        raise _corrupt(img.format, e) from None
    return img


def open_image(data: bytes, prep: Preprocessing, max_pixels: int, *, jpeg_draft: bool = True) -> Image.Image:
    """The checked, decoded PIL image (at the DCT scale ``jpeg_draft_scale`` allows, unless ``jpeg_draft`` is
    False), before ``image_to_uint8``. Raises ServeError 400/413/415 naming the problem."""
    return load_opened(*probe_image(data, prep, max_pixels, jpeg_draft=jpeg_draft))


@functools.lru_cache(maxsize=1)
def resizer() -> tuple[Callable[[Image.Image, Preprocessing], np.ndarray], str]:
    """``image_to_uint8`` with the resize in native code ("native"), or Pillow's ("pillow") where the kernel library
    cannot be built or loaded, or differs from this Pillow. Resolved once per process (the server does it before
    turning ready)."""
    from ganet.kernels.resample import load

    native = load()
    return (native, "native") if native is not None else (image_to_uint8, "pillow")


def decode_opened(img: Image.Image, prep: Preprocessing, draft: int = 1) -> np.ndarray:
    """(3, S, S) uint8 RGB of a probed image (``probe_image``). Raises ServeError 400 naming the problem."""
    load_opened(img, draft)
    try:
        return resizer()[0](img, prep)
    except Exception as e:  # an unsupported mode or a stream that fails late: bad input, never a 500
        raise _corrupt(img.format, e) from None


def decode_image(data: bytes, prep: Preprocessing, max_pixels: int, *, jpeg_draft: bool = True) -> np.ndarray:
    """Decode ``data`` and return (3, S, S) uint8 RGB (``jpeg_draft=False``: always exactly ``image_to_uint8`` of
    the full decode). Raises ServeError 400/413/415 naming the problem. (The service decodes through
    ``ganet.serve.decode``, which adds the decode budget between the header and the pixels.)"""
    img, draft = probe_image(data, prep, max_pixels, jpeg_draft=jpeg_draft)
    return decode_opened(img, prep, draft)


def _corrupt(fmt: str | None, e: Exception) -> ServeError:
    return ServeError(400, "corrupt_image", f"cannot decode the {fmt} image ({type(e).__name__}: {e}); is it "
                                            f"truncated or corrupt?")
