"""The decode budget: how many bytes decoding an image will touch, read from its header, and a process-wide pool
of bytes (``--max-decode-bytes``) that every decode (and every large JSON parse) reserves before it starts.

An image whose estimate alone exceeds the budget is refused (413) in milliseconds, before any pixel is decoded;
one that fits waits, on the event loop and never on a decode thread, until the bytes are free or its request's
deadline passes (504). So the memory that decoding holds at once stays under the budget, however many requests
arrive together, and a 100 KB file that would expand to gigabytes (a 16-bit 7000x7000 PNG, a 1x50,000,000 one)
cannot multiply itself by the number of decode threads.

The estimate follows what ``ganet.preprocess.image_to_uint8`` and the native resize really allocate (measured in
tests/test_serve_limits.py against the process's peak RSS): Pillow stores 1 byte a pixel for 1/L/P, 2 for 16-bit
grey, 4 for everything else (RGB is padded to RGBX), plus an 8-byte pointer per row (which is what makes a
1-pixel-wide image expensive); the decoder's own buffers (progressive JPEG coefficients, WebP's RGBA frame, a
TIFF strip); the EXIF rotation's copy; each mode conversion of ``to_rgb``; and the packed (H, W, 3) copy plus the
scratch rows of the resize.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import math
import threading
import time

from PIL import ExifTags, Image

from ganet.preprocess import Preprocessing, crop_box
from ganet.serve.errors import ServeError

__all__ = ["ByteBudget", "estimate_decode_bytes", "json_parse_bytes", "release_freed_memory", "TRIM_AFTER_BYTES", "TRIM_EVERY_BYTES",
           "format_bytes"]

log = logging.getLogger("ganet.serve")

ROW_POINTER = 8  # Pillow keeps one pointer per row of every image
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
# JSON numbers of a v2 request become Python objects: a list slot (8 bytes) and, for floats and large integers, a
# 24-32 byte object per value of at least 2 bytes ("0,"), then a float64 copy. 16x the text bounds all of it.
JSON_EXPANSION = 16
TRIM_AFTER_BYTES = 32 * 2**20  # decodes larger than this hand freed heap pages back to the OS (malloc_trim)
TRIM_EVERY_BYTES = 256 * 2**20  # and so does every 256 MiB of smaller ones (fragments of many threads' arenas)


def format_bytes(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n:,} bytes"


def _pixel_bytes(mode: str) -> int:
    if mode in ("1", "L", "P"):
        return 1
    if mode.startswith("I;16"):
        return 2
    return 4


def _image_bytes(mode: str, w: int, h: int) -> int:
    return _pixel_bytes(mode) * w * h + ROW_POINTER * h


def _to_rgb_bytes(mode: str, w: int, h: int) -> int:
    """What ``ganet.preprocess.to_rgb`` allocates for a ``mode`` image of w x h (the conversions it makes)."""
    rgb = _image_bytes("RGB", w, h)
    if mode in _HIGH_BIT_MODES:  # native-dtype array, its uint8 rows (shared with the L image), then L -> RGB
        return _pixel_bytes(mode) * w * h + _image_bytes("L", w, h) + rgb
    if mode == "P":  # -> RGBA (transparency) then the alpha path, or -> RGB
        return _image_bytes("RGBA", w, h) + 3 * _image_bytes("RGBA", w, h) + rgb
    if mode in _ALPHA_MODES:  # -> RGBA (unless it is), a white background, the composite, then RGB
        return 3 * _image_bytes("RGBA", w, h) + rgb
    return 0 if mode == "RGB" else rgb


def estimate_decode_bytes(img: Image.Image, prep: Preprocessing, draft_scale: int = 1) -> int:
    """Bytes that decoding ``img`` (opened, header read, nothing decoded) and turning it into the network's input
    will allocate, at most. ``draft_scale``: the JPEG DCT-domain reduction the decode will use (1, 2, 4, 8)."""
    full_w, full_h = img.size
    w, h = math.ceil(full_w / draft_scale), math.ceil(full_h / draft_scale)
    mode = img.mode
    total = _image_bytes(mode, w, h)
    if img.format in ("JPEG", "MPO") and ("progressive" in img.info or "progression" in img.info):
        bands = len(img.getbands())
        total += 2 * bands * full_w * full_h  # libjpeg keeps every DCT coefficient (16-bit) at full resolution
    elif img.format == "WEBP":
        total += 4 * w * h  # libwebp's decoded RGBA frame, copied into the image
    elif img.format == "TIFF":
        total += _pixel_bytes(mode) * w * h  # libtiff may read the whole image as one strip or tile first
    orientation = img.getexif().get(ExifTags.Base.Orientation, 1) if img.format != "PNG" else None
    if orientation != 1:  # a rotated copy (a PNG may carry its EXIF after the pixels: counted always)
        total += _pixel_bytes(mode) * w * h + ROW_POINTER * max(w, h)
    total += _to_rgb_bytes(mode, w, h)
    box, _ = crop_box((w, h), prep)
    side = max(box[2] - box[0], box[3] - box[1]) + 8  # + the filter's support on both sides
    total += 3 * w * h + 4 * prep.input_size * math.ceil(side) + 3 * prep.input_size ** 2  # (H, W, 3), scratch, out
    return int(total)


def json_parse_bytes(text_bytes: int) -> int:
    """Bytes that parsing ``text_bytes`` of v2 JSON into Python values and a float64 array can take, at most."""
    return JSON_EXPANSION * text_bytes


class ByteBudget:
    """A pool of ``total`` bytes. ``try_acquire`` and ``release`` work from any thread (a decode thread reserves and
    decodes in one step when the bytes are free); ``acquire`` waits on the event loop, never on a thread.
    Reservations do not queue in order: any that fits goes, so a small image never waits behind a large one."""

    def __init__(self, total: int) -> None:
        self.total, self.in_use = total, 0
        self._lock = threading.Lock()
        self._waiters: list[asyncio.Future] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def check(self, n: int, what: str) -> None:
        """413 if ``n`` bytes can never fit."""
        if n > self.total:
            raise ServeError(413, "decode_budget_exceeded",
                             f"{what} needs about {format_bytes(n)} to decode, over the decode budget of "
                             f"{format_bytes(self.total)} (--max-decode-bytes {self.total})")

    def try_acquire(self, n: int) -> bool:
        with self._lock:
            if self.in_use + n > self.total:
                return False
            self.in_use += n
            return True

    async def acquire(self, n: int, deadline: float, what: str) -> None:
        """Reserve ``n`` bytes before the ``deadline`` (time.monotonic()); 413 if ``n`` can never fit, 504 if the
        deadline passes first."""
        self.check(n, what)
        self._loop = asyncio.get_running_loop()
        while not self.try_acquire(n):
            left = deadline - time.monotonic()
            if left <= 0:
                raise ServeError(504, "deadline_exceeded", f"the request's deadline passed while {what} waited "
                                                           f"for {format_bytes(n)} of the decode budget")
            freed = self._loop.create_future()
            self._waiters.append(freed)
            try:
                if self.try_acquire(n):  # released between the first try and the waiter's registration
                    return
                await asyncio.wait_for(freed, left)
            except TimeoutError:
                pass
            finally:
                if freed in self._waiters:
                    self._waiters.remove(freed)

    def release(self, n: int) -> None:
        """Give ``n`` bytes back (from any thread) and wake every waiter to try again."""
        with self._lock:
            self.in_use -= n
        if self._waiters and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._wake)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)


_libc: ctypes.CDLL | None | bool = False


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim(0)``), so that the resident size falls back
    after a large decode instead of staying at its peak. False where there is no glibc."""
    global _libc
    if _libc is False:
        name = ctypes.util.find_library("c")
        try:
            _libc = ctypes.CDLL(name) if name else None
            _libc.malloc_trim  # noqa: B018  (musl has none)
        except (OSError, AttributeError):
            _libc = None
    if _libc is None:
        return False
    _libc.malloc_trim(0)
    return True
