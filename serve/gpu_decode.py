"""``--decode gpu``: JPEGs decoded by nvJPEG in batches (``torchvision.io.decode_jpeg(list, device="cuda")``), then
EXIF-rotated, resized and center-cropped on the GPU with Pillow's arithmetic (``ganet.serve.gpu_resize``).

Every image's header is read and checked first, on the CPU, by the same ``probe_image`` the CPU path uses (format,
pixel limit, corrupt headers -> the same 4xx), so nothing is decoded past a limit. Then it is routed:

* baseline and progressive JPEGs in RGB or greyscale, any EXIF orientation, bilinear/bicubic preprocessing -> the
  GPU: a worker thread gathers them from concurrent requests (up to ``max_batch``, ``max_delay_us`` after the
  first), decodes the batch with one nvJPEG call, resizes images of one size together, and copies the (n, 3, S, S)
  results back in one transfer;
* everything else (PNG, WebP, ..., CMYK/YCCK JPEGs, MPO, nearest-neighbour preprocessing) and every JPEG nvJPEG
  refuses or decodes to another size -> the CPU path (``ganet.serve.decode.Decoder``, inside the decode budget),
  with its answers and errors.

``/metrics`` counts each image by path and reason (``ganet_decode_images_total{path, reason}``); JPEGs that fell
back after nvJPEG refused them are logged (``"event": "decode_fallback"``). nvJPEG's IDCT and chroma upsampling are
not libjpeg-turbo's, so GPU-decoded pixels can differ from Pillow's by a few levels: the agreement is measured
(tests/test_gpu_decode.py, benchmarks/gpu_checks.sh) and this stays an option, never the default.

The pipeline is device-agnostic: with ``device="cpu"`` (torchvision's libjpeg-turbo and the same tensor resize) it
runs in the tests here, and gives Pillow's bytes.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from ganet.preprocess import Preprocessing
from ganet.serve.batcher import gather
from ganet.serve.gpu_resize import TensorResize, exif_transpose
from ganet.serve.images import probe_image

__all__ = ["GpuDecoder", "Route", "REASONS"]

log = logging.getLogger("ganet.serve")

# /metrics reason label: a fixed, small set
REASONS = ("jpeg",  # path gpu
           "option", "format", "mode", "filter", "nvjpeg")  # path cpu: --decode cpu, not a JPEG, CMYK..., nearest,
#                                                              nvJPEG refused it (or decoded another size)
EXIF_ORIENTATION = 0x0112


@dataclass
class Route:
    path: str  # "gpu" or "cpu"
    reason: str  # one of REASONS
    size: tuple[int, int] = (0, 0)  # (w, h) from the header
    orientation: int = 1


@dataclass
class _Item:
    data: bytes
    route: Route
    future: Future = field(default_factory=Future)


class GpuDecoder:
    """``route(data)`` (header checks, on a decode thread), then ``await decoder.submit(data, route)`` -> (3, S, S)
    uint8, or None where nvJPEG refused the image. One worker thread owns the device work; the CPU path is the
    caller's (``ganet.serve.decode.Decoder``)."""

    def __init__(self, prep: Preprocessing, max_pixels: int, device: str = "cuda", max_batch: int = 64,
                 max_delay_us: int = 1000) -> None:
        from torchvision.io import ImageReadMode, decode_jpeg

        self.prep, self.max_pixels, self.device = prep, max_pixels, torch.device(device)
        self.max_batch, self.max_delay_s = max_batch, max_delay_us / 1e6
        self._decode_jpeg, self._rgb = decode_jpeg, ImageReadMode.RGB
        self.resize = TensorResize(prep, self.device) if prep.interpolation != "nearest" else None
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.batches: list[int] = []  # sizes of the last few device batches (tests, logs)
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="ganet-gpu-decode", daemon=True)
        self._thread.start()

    # --- routing (in the caller's pool) ---------------------------------------------------------------------------

    def route(self, data: bytes) -> Route:
        """Check the header (ServeError 400/413/415 as on the CPU path) and choose the path."""
        img, _ = probe_image(data, self.prep, self.max_pixels, jpeg_draft=False)
        if img.format != "JPEG":
            return Route("cpu", "format")
        if img.mode not in ("RGB", "L"):
            return Route("cpu", "mode")
        if self.resize is None:
            return Route("cpu", "filter")
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
        return Route("gpu", "jpeg", img.size, orientation if orientation in range(1, 9) else 1)

    async def submit(self, data: bytes, route: Route) -> np.ndarray | None:
        """The device path for an image ``route`` sent there: (3, S, S) uint8, or None if nvJPEG refused it."""
        item = _Item(data, route)
        self._queue.put(item)
        return await asyncio.wrap_future(item.future)

    # --- the device work (worker thread) --------------------------------------------------------------------------

    def _work(self) -> None:
        while (first := self._queue.get()) is not None:
            batch = gather(self._queue, first, self.max_batch, self.max_delay_s)
            try:
                results = self.decode_batch([it.data for it in batch], [it.route for it in batch])
            except Exception as e:  # a bug here must not hang the requests: each fails on its own future
                log.exception("GPU decode failed", extra={"event": "decode_error"})
                results = [e] * len(batch)
            for item, result in zip(batch, results):
                item.future.set_exception(result) if isinstance(result, Exception) else item.future.set_result(result)

    def decode_batch(self, datas: list[bytes], routes: list[Route]) -> list[np.ndarray | None]:
        """(3, S, S) uint8 for each JPEG, or None where nvJPEG refused it (the caller decodes that one on the CPU)."""
        self.batches = (self.batches + [len(datas)])[-16:]
        if self.stream is None:
            return self._decode_batch(datas, routes)
        with torch.cuda.stream(self.stream):
            return self._decode_batch(datas, routes)

    def _decode_batch(self, datas: list[bytes], routes: list[Route]) -> list[np.ndarray | None]:
        decoded = self._nvjpeg(datas)
        by_shape: dict[tuple, list[int]] = {}  # images of one size (and rotation) are resized together
        for i, (image, route) in enumerate(zip(decoded, routes)):
            if image is not None:
                image = exif_transpose(image, route.orientation)
                w, h = route.size if route.orientation < 5 else route.size[::-1]
                if tuple(image.shape) != (3, h, w):
                    self._fall_back(f"nvJPEG decoded {tuple(image.shape[1:])}, the header says {(h, w)}")
                    image = None
                decoded[i] = image
            if image is not None:
                by_shape.setdefault(tuple(image.shape), []).append(i)
        outputs: list[torch.Tensor | None] = [None] * len(datas)
        for indices in by_shape.values():
            group = torch.stack([decoded[i] for i in indices])  # (n, 3, H, W)
            for i, out in zip(indices, self.resize(group)):
                outputs[i] = out
        done = [i for i, out in enumerate(outputs) if out is not None]
        host = torch.stack([outputs[i] for i in done]).cpu().numpy() if done else None  # one copy back
        results: list[np.ndarray | None] = [None] * len(datas)
        for row, i in enumerate(done):
            results[i] = host[row]
        return results

    def _nvjpeg(self, datas: list[bytes]) -> list[torch.Tensor | None]:
        """One batched decode; if nvJPEG refuses the batch, each image alone, so that one bad image costs only
        itself the GPU path."""
        encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        try:
            return list(self._decode_jpeg(encoded, mode=self._rgb, device=self.device))
        except Exception as e:
            if len(datas) == 1:
                self._fall_back(f"{type(e).__name__}: {e}")
                return [None]
        return [self._nvjpeg([d])[0] for d in datas]

    def warm_up(self) -> None:
        """One small JPEG through the device path (nvJPEG's handles, the first kernels), before serving."""
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (64, 48), (90, 140, 200)).save(buf, "JPEG")
        if self.decode_batch([buf.getvalue()], [self.route(buf.getvalue())])[0] is None:
            log.warning("the GPU decoder refused its warm-up JPEG: JPEGs will take the CPU path",
                        extra={"event": "decode_fallback"})

    def _fall_back(self, why: str) -> None:
        log.info("JPEG decoded on the CPU: %s", why, extra={"event": "decode_fallback", "reason": why})

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(5)
