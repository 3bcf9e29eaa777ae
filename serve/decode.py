"""Decoding a request's images in the decode thread pool, inside the decode budget and the request's deadline.

Each image goes through two steps on a decode thread: the header (format, size, mode: the limits and the budget
estimate, ``ganet.serve.budget``), then, once its bytes are reserved in the budget (on the event loop, never
holding a thread), the pixels. Between and before the steps the request's deadline is checked, so an image whose
request has already been answered 504, or whose client left, is never decoded. With ``--decode gpu`` a JPEG the
GPU decoder takes (``ganet.serve.gpu_decode``) is decoded there after the same header checks; every other image,
and every JPEG nvJPEG refuses, takes the CPU path below. One request runs at most
``per_request`` images at once (half the threads), so a multipart of sixteen expensive images leaves the other
threads to the requests that arrive beside it. The budget is released when the thread really finishes, even if
the request stopped waiting for it, so the memory bound holds.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import numpy as np

from ganet.preprocess import Preprocessing
from ganet.serve.budget import TRIM_AFTER_BYTES, TRIM_EVERY_BYTES, ByteBudget, estimate_decode_bytes, release_freed_memory
from ganet.serve.errors import ServeError
from ganet.serve.images import decode_opened, probe_image

__all__ = ["Decoder", "run_budgeted", "first_error_cancels", "deadline_error"]

T = TypeVar("T")


def deadline_error(timeout_ms: float, where: str) -> ServeError:
    return ServeError(504, "deadline_exceeded", f"the request's deadline of {timeout_ms:g} ms (--timeout-ms) passed "
                                                f"{where}")


async def first_error_cancels(coros: Sequence[Awaitable[T]]) -> list[T]:
    """``asyncio.gather``, except that the first failure cancels the others (their decodes never start)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise t.exception()
        return [t.result() for t in tasks]
    finally:
        for t in tasks:
            t.cancel()


async def run_budgeted(pool: concurrent.futures.Executor, budget: ByteBudget, nbytes: int, deadline: float,
                       what: str, fn: Callable[..., T], *args) -> T:
    """``fn(*args)`` on ``pool`` once ``nbytes`` are reserved in ``budget``; released when ``fn`` returns (or is
    cancelled before it starts), not when the caller stops waiting."""
    await budget.acquire(nbytes, deadline, what)

    def run() -> T:
        try:
            return fn(*args)
        finally:
            budget.release(nbytes)

    try:
        future = pool.submit(run)
    except BaseException:
        budget.release(nbytes)
        raise
    future.add_done_callback(lambda f: budget.release(nbytes) if f.cancelled() else None)
    return await asyncio.wrap_future(future)


class Decoder:
    """``await decoder.decode_all(datas, deadline)`` -> [((3, S, S) uint8, seconds), ...] in request order."""

    def __init__(self, pool: concurrent.futures.ThreadPoolExecutor, threads: int, budget: ByteBudget,
                 prep: Preprocessing, max_pixels: int, timeout_ms: float, *, gpu=None,
                 on_path: Callable[[str, str], None] | None = None) -> None:
        """``gpu``: a ``GpuDecoder`` (--decode gpu) or None; ``on_path(path, reason)`` is told which path each
        decoded image took (the /metrics counter)."""
        self.pool, self.budget, self.prep = pool, budget, prep
        self.max_pixels, self.timeout_ms = max_pixels, timeout_ms
        self.gpu, self.on_path = gpu, on_path or (lambda path, reason: None)
        self.per_request = max(1, threads // 2)
        self._since_trim = 0  # bytes decoded since the last malloc_trim

    def _probe(self, data: bytes, deadline: float, what: str):
        """On a decode thread: the header, the estimate, and the decode itself when its bytes are free now (one
        thread hop for the common case); else the probed image, to wait for the budget on the event loop."""
        if time.monotonic() >= deadline:  # queued behind other work past the deadline: not started
            raise deadline_error(self.timeout_ms, "before the image was decoded")
        img, draft = probe_image(data, self.prep, self.max_pixels)
        estimate = estimate_decode_bytes(img, self.prep, draft)
        self.budget.check(estimate, what)
        if not self.budget.try_acquire(estimate):
            return None, (img, draft, estimate)
        try:
            return self._decode(img, draft, estimate, deadline), None
        finally:
            self.budget.release(estimate)

    def _decode(self, img, draft: int, estimate: int, deadline: float) -> tuple[np.ndarray, float]:
        if time.monotonic() >= deadline:
            raise deadline_error(self.timeout_ms, "before the image was decoded")
        start = time.perf_counter()
        try:
            return decode_opened(img, self.prep, draft), time.perf_counter() - start
        finally:
            img.close()
            self._since_trim += estimate
            if estimate > TRIM_AFTER_BYTES or self._since_trim > TRIM_EVERY_BYTES:
                self._since_trim = 0
                del img
                release_freed_memory()

    def _route(self, data: bytes, deadline: float):
        """On a decode thread: the GPU decoder's header checks and choice of path."""
        if time.monotonic() >= deadline:
            raise deadline_error(self.timeout_ms, "before the image was decoded")
        return self.gpu.route(data)

    async def decode_one(self, data: bytes, deadline: float, what: str = "the image",
                         gate: asyncio.Semaphore | None = None) -> tuple[np.ndarray, float]:
        """One image. ``gate`` bounds the decode threads this request holds; the GPU step holds none."""
        loop = asyncio.get_running_loop()
        gate = gate if gate is not None else contextlib.nullcontext()
        reason = "option"
        if self.gpu is not None:
            start = time.perf_counter()
            async with gate:
                route = await loop.run_in_executor(self.pool, self._route, data, deadline)
            reason = route.reason
            if route.path == "gpu":
                image = await self.gpu.submit(data, route)  # None: nvJPEG refused it, the CPU path decides
                if image is not None:
                    self.on_path("gpu", reason)
                    return image, time.perf_counter() - start
                reason = "nvjpeg"
        async with gate:
            done, waiting = await loop.run_in_executor(self.pool, self._probe, data, deadline, what)
            if done is None:
                img, draft, estimate = waiting
                done = await run_budgeted(self.pool, self.budget, estimate, deadline, what, self._decode, img,
                                          draft, estimate, deadline)
        self.on_path("cpu", reason)
        return done

    async def decode_all(self, datas: Sequence[bytes], deadline: float,
                         names: Sequence[str | None] | None = None) -> list[tuple[np.ndarray, float]]:
        """Every image, at most ``per_request`` on decode threads at a time; the first failure cancels the rest. With several images
        an error names the one it is about."""
        gate = asyncio.Semaphore(self.per_request)

        async def one(i: int, data: bytes) -> tuple[np.ndarray, float]:
            what = "the image" if len(datas) == 1 else f"image {i + 1}"
            try:
                return await self.decode_one(data, deadline, what, gate)
            except ServeError as e:
                if len(datas) > 1 and e.status != 504:
                    name = names[i] if names else None
                    e.message = f"file {i + 1}" + (f" ({name})" if name else "") + f": {e.message}"
                raise

        return await first_error_cancels([one(i, d) for i, d in enumerate(datas)])
