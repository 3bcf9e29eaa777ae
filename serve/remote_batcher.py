"""The front end's batcher: ``DynamicBatcher``'s contract (``await submit(image, timeout_s)`` -> BatchResult,
QueueFullError, DeadlineExceededError) over the shared-memory ring and a socket to the model owner.

``submit`` copies the image into one of this front end's slots, writes a 16-byte SUBMIT and awaits a future; one
reader task on the event loop resolves the futures as the owner's answers arrive. No thread and no blocking call:
the loop only ever does non-blocking socket I/O. A slot returns to the free list when its answer arrives, never
earlier (the owner may still be reading it), so a request that gave up (deadline, disconnect) keeps its slot until
the owner has dropped or run its image.
"""
from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

import numpy as np

from ganet.serve.batcher import BatchResult, DeadlineExceededError, QueueFullError
from ganet.serve.errors import ServeError
from ganet.serve.shm_ring import ImageRing
from ganet.serve.wire import (ANSWER, EXPIRED, OK, QUEUE_FULL, READY, REQUEST, RESULT, STARTED, STATUS_NAMES,
                              SUBMIT)

__all__ = ["RemoteBatcher"]

log = logging.getLogger("ganet.serve")


class RemoteBatcher:
    """Submits images to the model owner; ``on_ready(True)`` when the owner says every process is warm,
    ``on_lost()`` when the owner's socket closes (the front end should then exit)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ring: ImageRing, first_slot: int,
                 slots: int, on_ready: Callable[[bool], None], on_lost: Callable[[], None]) -> None:
        self._reader, self._writer, self._ring = reader, writer, ring
        self._free = list(range(first_slot + slots - 1, first_slot - 1, -1))  # LIFO: the warm slots first
        self._slots = slots
        self._pending: dict[int, asyncio.Future] = {}  # slot -> the request awaiting its answer
        self._on_ready, self._on_lost = on_ready, on_lost
        self._lost = False
        self._task = asyncio.ensure_future(self._read_answers())

    @classmethod
    async def connect(cls, sock: socket.socket, ring: ImageRing, first_slot: int, slots: int,
                      on_ready: Callable[[bool], None], on_lost: Callable[[], None]) -> RemoteBatcher:
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        return cls(reader, writer, ring, first_slot, slots, on_ready, on_lost)

    @property
    def depth(self) -> int:
        """Images of this front end the owner has not answered yet."""
        return len(self._pending)

    def started(self) -> None:
        """Tell the owner this front end serves HTTP (readiness waits for every front end)."""
        self._writer.write(REQUEST.pack(STARTED, 0, 0.0))

    async def submit(self, image: np.ndarray, timeout_s: float) -> BatchResult:
        if self._lost:
            raise ServeError(503, "not_ready", "the model owner has stopped; retry", {"Retry-After": "1"})
        if not self._free:
            raise QueueFullError(f"all {self._slots} image slots of this front end wait for inference")
        slot = self._free.pop()
        np.copyto(self._ring.view(slot), image)  # (3, S, S) uint8 into shared memory: the only copy
        future = asyncio.get_running_loop().create_future()
        self._pending[slot] = future
        self._writer.write(REQUEST.pack(SUBMIT, slot, timeout_s))
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise DeadlineExceededError(f"no result within {timeout_s * 1e3:.0f} ms") from None

    async def _read_answers(self) -> None:
        try:
            while True:
                kind, status, slot, batch_size, queue_s, inference_s, length = ANSWER.unpack(
                    await self._reader.readexactly(ANSWER.size))
                payload = await self._reader.readexactly(length) if length else b""
                if kind == READY:
                    self._on_ready(True)
                elif kind == RESULT:
                    self._settle(slot, status, payload, batch_size, queue_s, inference_s)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:  # close()
            return
        self._lose()

    def _settle(self, slot: int, status: int, payload: bytes, batch_size: int, queue_s: float,
                inference_s: float) -> None:
        future = self._pending.pop(slot, None)
        if future is None:  # never ours: a bug on one side; keep the slot out of circulation
            log.error("answer for a slot not in flight", extra={"event": "frontend_protocol_error", "slot": slot})
            return
        self._free.append(slot)
        if future.done():  # the request stopped waiting (deadline, client gone)
            return
        if status == OK:
            future.set_result(BatchResult(np.frombuffer(payload, "<f4"), queue_s, inference_s, batch_size))
        elif status == QUEUE_FULL:
            future.set_exception(QueueFullError(payload.decode()))
        elif status == EXPIRED:
            future.set_exception(DeadlineExceededError(payload.decode()))
        else:  # the backend failed: a server error, as in one process
            future.set_exception(RuntimeError(f"inference {STATUS_NAMES.get(status, status)}: {payload.decode()}"))

    def _lose(self) -> None:
        if self._lost:
            return
        self._lost = True
        log.error("model owner gone", extra={"event": "owner_lost"})
        self._on_ready(False)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ServeError(503, "not_ready", "the model owner stopped before answering; retry",
                                                {"Retry-After": "1"}))
        self._on_lost()

    def close(self, timeout_s: float = 0.0) -> None:
        """(the lifespan's shutdown, after uvicorn has drained) Disconnect; the owner drops what is left."""
        self._lost = True
        self._task.cancel()
        self._writer.close()
