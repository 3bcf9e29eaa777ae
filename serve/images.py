"""Encoded image bytes -> the network's uint8 input (3, S, S), with limits checked before any pixel is decoded.

Geometry is ``ganet.preprocess.image_to_uint8`` (EXIF orientation, palette, grey, 16-bit, CMYK, alpha), the one
pipeline training, export parity and serving share.
"""
from __future__ import annotations

import io
import warnings

import numpy as np

from ganet.preprocess import Preprocessing, image_to_uint8
from ganet.serve.errors import ServeError

__all__ = ["FORMATS", "decode_image"]

FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO")  # MPO: multi-picture JPEG from phone cameras
_EXPECTED = "expected a JPEG, PNG, WebP, BMP, GIF or TIFF image"


def decode_image(data: bytes, prep: Preprocessing, max_pixels: int) -> np.ndarray:
    """Decode ``data`` and return (3, S, S) uint8 RGB. Raises ServeError 400/413/415 naming the problem."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ServeError(400, "empty_body", f"the image is empty (0 bytes); {_EXPECTED}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked below
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
        try:
            img.load()  # GIF / TIFF: the first frame
            return image_to_uint8(img, prep)
        except Exception as e:  # truncated, corrupt stream, unsupported mode: all bad input, never a 500
            raise ServeError(400, "corrupt_image", f"cannot decode the {img.format} image ({type(e).__name__}: "
                                                   f"{e}); is it truncated or corrupt?") from None
