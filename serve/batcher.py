"""Dynamic batching: single images from many requests -> one backend call -> each answered on its own.

The event loop enqueues without blocking (a bounded thread-safe queue: full -> QueueFullError -> 503); one worker
thread per model instance takes the first waiting image, then up to ``max_batch - 1`` more that arrive within
``max_delay_us``, runs them as one batch (the graph's batch axis is dynamic: nothing is padded) and resolves each
request's asyncio future on its loop. Images whose deadline passed are dropped before inference (-> 504).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import TypeVar
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

__all__ = ["QueueFullError", "DeadlineExceededError", "BatchResult", "DynamicBatcher", "gather"]

log = logging.getLogger("ganet.serve")
T = TypeVar("T")


class QueueFullError(RuntimeError):
    """More images wait than --queue-size allows."""


class DeadlineExceededError(TimeoutError):
    """The request's deadline passed before its image was run."""


@dataclass(frozen=True)
class BatchResult:
    logits: np.ndarray  # (num_classes,) float32
    queue_s: float  # enqueue -> batch start
    inference_s: float  # the backend call for the whole batch
    batch_size: int


@dataclass
class _Item:
    image: np.ndarray  # (3, S, S) uint8
    future: asyncio.Future | None  # None for put(): on_done answers instead
    loop: asyncio.AbstractEventLoop | None
    enqueued: float = field(default_factory=time.perf_counter)
    deadline: float = float("inf")  # perf_counter time
    on_done: Callable[[BatchResult | None, BaseException | None], None] | None = None


def _resolve(item: _Item, result: BatchResult | None, error: BaseException | None) -> None:
    if item.on_done is not None:
        item.on_done(result, error)
        return

    def settle() -> None:
        if item.future.done():  # the awaiting request gave up (timeout, disconnect)
            return
        item.future.set_exception(error) if error is not None else item.future.set_result(result)

    try:
        item.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # loop closed during shutdown
        pass


class DynamicBatcher:
    """``await batcher.submit(image, deadline)`` -> BatchResult. ``backends``: one per worker thread."""

    def __init__(self, backends: list[Callable[[np.ndarray], np.ndarray]], max_batch: int, max_delay_us: int,
                 queue_size: int, on_batch: Callable[[int, float, list[float]], None] | None = None) -> None:
        self.max_batch, self.max_delay_s = max_batch, max_delay_us / 1e6
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=queue_size)
        self._on_batch = on_batch  # (batch size, inference seconds, queue seconds of each item) -> metrics
        self._threads = [threading.Thread(target=self._work, args=(b,), name=f"ganet-infer-{i}", daemon=True)
                         for i, b in enumerate(backends)]
        for t in self._threads:
            t.start()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    async def submit(self, image: np.ndarray, timeout_s: float) -> BatchResult:
        loop = asyncio.get_running_loop()
        item = _Item(image, loop.create_future(), loop)
        item.deadline = item.enqueued + timeout_s
        self._enqueue(item)
        try:
            return await asyncio.wait_for(item.future, timeout_s)
        except TimeoutError:
            raise DeadlineExceededError(f"no result within {timeout_s * 1e3:.0f} ms") from None

    def put(self, image: np.ndarray, timeout_s: float,
            on_done: Callable[[BatchResult | None, BaseException | None], None]) -> None:
        """``submit`` without an event loop (the model owner of ``ganet-serve --frontends``): QueueFullError here,
        else ``on_done(result, error)`` once, in an inference thread (it must not block or raise)."""
        item = _Item(image, None, None, on_done=on_done)
        item.deadline = item.enqueued + timeout_s
        self._enqueue(item)

    def _enqueue(self, item: _Item) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            raise QueueFullError(f"{self._queue.maxsize} images already wait for inference") from None

    def _work(self, backend: Callable[[np.ndarray], np.ndarray]) -> None:
        while (first := self._queue.get()) is not None:
            batch = gather(self._queue, first, self.max_batch, self.max_delay_s)
            start = time.perf_counter()
            live = []
            for it in batch:
                if it.deadline > start and not (it.future is not None and it.future.done()):
                    live.append(it)
                else:
                    _resolve(it, None, DeadlineExceededError("deadline passed while queued"))
            batch = live
            if not batch:
                continue
            try:
                logits = backend(np.stack([it.image for it in batch]))  # (B, 3, S, S) -> (B, C)
            except Exception as e:  # a backend failure answers every request of the batch
                log.exception("inference failed", extra={"event": "inference_error"})
                for it in batch:
                    _resolve(it, None, e)
                continue
            inference_s = time.perf_counter() - start
            queue_s = [start - it.enqueued for it in batch]
            for it, row, q in zip(batch, logits, queue_s):
                _resolve(it, BatchResult(row, q, inference_s, len(batch)), None)
            if self._on_batch is not None:
                self._on_batch(len(batch), inference_s, queue_s)
        self._queue.put(None)  # wake the next worker

    def close(self, timeout_s: float = 5.0) -> None:
        """Finish what is queued, then stop the workers."""
        self._queue.put(None)
        for t in self._threads:
            t.join(timeout_s)


def gather(q: queue.Queue, first: T, max_batch: int, max_delay_s: float) -> list[T]:
    """``first`` and whatever else ``q`` yields within ``max_delay_s`` of now, up to ``max_batch`` items. A None in
    the queue is the stop signal: it goes back for the other workers, and the batch so far is returned."""
    batch, until = [first], time.perf_counter() + max_delay_s
    while len(batch) < max_batch:
        try:
            left = until - time.perf_counter()
            item = q.get_nowait() if left <= 0 else q.get(timeout=left)
        except queue.Empty:
            break
        if item is None:
            q.put(None)
            break
        batch.append(item)
    return batch
