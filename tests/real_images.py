"""Real photographs for the tests (the ones ganet's parity checks use: scikit-learn's and scikit-image's) and
encoding them the way a client would send them."""
from __future__ import annotations

import io

from PIL import Image

from ganet.export.parity import photo_arrays


def photos(*names: str) -> dict[str, Image.Image]:
    """Photographs by short name (``china``, ``flower``, ``astronaut``, ``chelsea``, ``coffee``, ``rocket``, ...):
    the given ones in that order, or all."""
    by_name = {key.split(":", 1)[1].removesuffix(".jpg"): Image.fromarray(a) for key, a in photo_arrays().items()}
    return {n: by_name[n] for n in names} if names else by_name


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    """``img`` as a file of format ``fmt`` (Pillow's save options in ``kw``)."""
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    return encode(img, "JPEG", quality=quality)
