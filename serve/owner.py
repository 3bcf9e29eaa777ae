"""The model owner of ``ganet-serve --frontends``: the backends, their warm-up and the one dynamic batcher of the
device, fed by front-end processes through the shared-memory ring.

One reader thread per front end turns each 16-byte SUBMIT into a batcher item whose image is a view of the front
end's slot (no copy until the batch is stacked), and the inference thread that runs it answers on that front end's
socket. Readiness: READY goes to every front end once the backends are warmed up and all front ends have said
STARTED; a front end that starts later (a restart) gets it when it says STARTED.
"""
from __future__ import annotations

import functools
import logging
import socket
import struct
import threading

from ganet.serve.app import ServeState, _start
from ganet.serve.backends import Backend, ModelSpec
from ganet.serve.batcher import BatchResult, DeadlineExceededError, QueueFullError
from ganet.serve.metrics import Metrics
from ganet.serve.settings import ServeSettings
from ganet.serve.shm_ring import ImageRing
from ganet.serve.wire import (ANSWER, EXPIRED, FAILED, OK, QUEUE_FULL, READY, REQUEST, RESULT, STARTED, SUBMIT)

__all__ = ["ModelOwner", "SEND_TIMEOUT_S"]

log = logging.getLogger("ganet.serve")

# An answer that cannot be written for this long means the front end has stopped reading (its event loop is stuck):
# the connection is cut, so that the front end exits and is restarted, and no inference thread waits on it.
SEND_TIMEOUT_S = 5


class _Connection:
    """The owner's end of one front end's socketpair."""

    def __init__(self, index: int, sock: socket.socket) -> None:
        self.index, self.sock = index, sock
        self.lock = threading.Lock()  # answers come from every inference thread
        self.closed, self.started, self.told_ready = False, False, False
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", SEND_TIMEOUT_S, 0))

    def send(self, data: bytes) -> None:
        with self.lock:
            if self.closed:  # the front end is gone: its answers are dropped
                return
            try:
                self.sock.sendall(data)
            except OSError as e:  # gone, or not reading for SEND_TIMEOUT_S (a partial write: the stream is lost)
                if not isinstance(e, (BrokenPipeError, ConnectionResetError)):
                    log.error("front end stopped reading", extra={"event": "frontend_stuck", "frontend": self.index,
                                                                  "error": repr(e)})
                self._cut()

    def answer(self, slot: int, result: BatchResult | None, error: BaseException | None) -> None:
        """The batcher's on_done: one RESULT for the image in ``slot``."""
        if error is None:
            payload = result.logits.astype("<f4", copy=False).tobytes()
            head = ANSWER.pack(RESULT, OK, slot, result.batch_size, result.queue_s, result.inference_s, len(payload))
        else:
            status = (EXPIRED if isinstance(error, DeadlineExceededError) else
                      QUEUE_FULL if isinstance(error, QueueFullError) else FAILED)
            payload = (str(error) or type(error).__name__).encode()[:4096]
            head = ANSWER.pack(RESULT, status, slot, 0, 0.0, 0.0, len(payload))
        self.send(head + payload)

    def _cut(self) -> None:
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader thread and tells the front end
        except OSError:
            pass

    def close(self) -> None:
        with self.lock:
            self._cut()
        self.sock.close()


class ModelOwner:
    """Backends + warm-up + DynamicBatcher (reusing ``create_app``'s start-up) behind N front-end connections."""

    def __init__(self, settings: ServeSettings, backends: list[Backend], spec: ModelSpec, ring: ImageRing,
                 frontends: int, slots_per_frontend: int) -> None:
        self.state = ServeState(settings, Metrics())
        self.backends, self.spec, self.ring = backends, spec, ring
        self.frontends, self.slots = frontends, slots_per_frontend
        self._connections: dict[int, _Connection] = {}
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.warm = False
        self.ready = False

    def warm_up(self) -> None:
        """Blocking: warm every backend at every batch size, start the batcher (what a single-process server does
        in its lifespan), then tell the front ends if they are all up."""
        _start(self.state, self.backends, self.spec)
        self.state.metrics.refresh()  # the gauges (GPU memory) before the first batch
        with self._lock:
            self.warm = True
            self._announce()

    def connect(self, index: int) -> socket.socket:
        """A new socketpair for front end ``index``; its end is returned (to pass to the process). A restarted front
        end gets a fresh pair, so that answers for its predecessor's images go nowhere."""
        ours, theirs = socket.socketpair()
        conn = _Connection(index, ours)
        with self._lock:
            old = self._connections.get(index)
            self._connections[index] = conn
        if old is not None:
            old.close()
        thread = threading.Thread(target=self._read, args=(conn,), name=f"ganet-frontend-{index}", daemon=True)
        thread.start()
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        return theirs

    def _read(self, conn: _Connection) -> None:
        first = conn.index * self.slots
        stream = conn.sock.makefile("rb")
        try:
            while len(data := stream.read(REQUEST.size)) == REQUEST.size:
                kind, slot, seconds_left = REQUEST.unpack(data)
                if kind == SUBMIT and first <= slot < first + self.slots:
                    self._submit(conn, slot, seconds_left)
                elif kind == STARTED:
                    with self._lock:
                        conn.started = True
                        log.info("front end started", extra={"event": "frontend_started", "frontend": conn.index})
                        self._announce()
                else:  # a bug in the front end: never run an image from another front end's slots
                    log.error("protocol error", extra={"event": "frontend_protocol_error", "frontend": conn.index,
                                                       "kind": kind, "slot": slot})
                    break
        except (OSError, ValueError):  # the socket was closed under us (shutdown, restart)
            pass
        finally:
            conn.close()

    def _submit(self, conn: _Connection, slot: int, seconds_left: float) -> None:
        batcher = self.state.batcher
        if batcher is None:  # front ends submit only after READY, which comes after the warm-up
            conn.answer(slot, None, RuntimeError("the model is not warmed up yet"))
            return
        try:
            batcher.put(self.ring.view(slot), seconds_left, functools.partial(conn.answer, slot))
        except QueueFullError as e:
            conn.answer(slot, None, e)
        self.state.metrics.queue_depth.set(batcher.depth)

    def _announce(self) -> None:
        """(under the lock) READY to every started front end not yet told, once warm and all have started."""
        started = [c for c in self._connections.values() if c.started and not c.closed]
        if not self.ready:
            if not self.warm or len(started) < self.frontends:
                return
            self.ready = True
            backend = self.backends[0]
            log.info("ready", extra={"event": "ready", "model": self.spec.name, "backend": backend.name,
                                     "device": backend.device, "max_batch": self.spec.max_batch,
                                     "frontends": self.frontends})
        for conn in started:
            if not conn.told_ready:
                conn.told_ready = True
                conn.send(ANSWER.pack(READY, OK, 0, 0, 0.0, 0.0, 0))

    def close(self, grace_s: float) -> None:
        """After the front ends have exited: finish what is queued, stop the inference threads, free the backends."""
        if self.state.batcher is not None:
            self.state.batcher.close(grace_s)
        with self._lock:
            connections = list(self._connections.values())
        for conn in connections:
            conn.close()
        for thread in self._threads:
            thread.join(2)
        for backend in self.backends:
            backend.close()
