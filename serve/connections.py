"""Connection hygiene for uvicorn: header and idle timeouts, and a cap on open connections with a defined answer.

uvicorn times out only the keep-alive wait after a response. A connection that never sends a byte, or sends its
headers one byte a minute (slowloris), or stops half-way through a body after an early answer, stays open for
ever, and enough of them exhaust the process's file descriptors, after which accept() fails and real clients wait
in the kernel's backlog. :func:`guarded_protocol` wraps uvicorn's httptools protocol so that:

* a connection has ``header_timeout_s`` from its first byte (or from being accepted) to finish a request's
  headers; past that it gets ``408`` (if it sent anything) and is closed;
* after a response, ``keep_alive_s`` of silence closes it (uvicorn's own timer); a connection whose request body
  was not read to the end (an early 4xx: 413, 401, 415) is half-closed, its incoming bytes dropped unparsed for
  ``LINGER_S``, then closed (nginx's lingering close: closing at once would reset the connection and could destroy
  the answer before the client reads it);
* at most ``max_connections`` are open. A new connection past the cap closes the connection that has been idle
  longest (no request in progress: waiting for its first headers, or kept alive for ``EVICT_GRACE_S`` at least),
  as nginx reuses idle keep-alive connections; if none qualifies, the new one is answered ``503`` with
  ``Retry-After`` and closed. A connection that answered a moment ago is spared: its client is likely sending the
  next request on it right now, and a POST lost that way reaches the client as a reset, not an answer.
  uvicorn's ``limit_concurrency`` is not used: it answers plain text and counts idle sockets as load.

The body itself is bounded by the request's deadline in ``ganet.serve.middleware`` (408).
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["ConnectionLimits", "guarded_protocol"]

log = logging.getLogger("ganet.serve")

LINGER_S = 2.0  # after an early answer, how long the unread rest of a request body is drained before closing
EVICT_GRACE_S = 1.0  # a kept-alive connection is evicted for a new one only after this long without a request


@dataclass
class ConnectionLimits:
    header_timeout_s: float
    keep_alive_s: float
    max_connections: int
    on_change: Callable[[int], None] = lambda open_now: None  # the open-connections gauge
    on_refused: Callable[[str], None] = lambda why: None  # counts closed-by-policy connections, by reason
    open: dict = field(default_factory=dict)  # protocol -> monotonic time it last became idle (insertion order)


def _raw_response(status: int, reason: str, code: str, message: str, extra: str = "") -> bytes:
    body = json.dumps({"error": message, "code": code, "request_id": None}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"{extra}connection: close\r\n\r\n")
    return head.encode() + body


class _LingeringClose:
    """The transport as a request/response cycle sees it: ``close()`` lingers while the request's body is unread."""

    def __init__(self, transport, protocol) -> None:  # noqa: ANN001
        self._transport, self._protocol = transport, protocol

    def close(self) -> None:
        self._protocol.close_or_linger()

    def __getattr__(self, name: str):  # noqa: ANN204  (write, is_closing, get_extra_info, ...)
        return getattr(self._transport, name)


def guarded_protocol(limits: ConnectionLimits) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with ``limits`` (pass as ``uvicorn.Config(http=...)``)."""

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _header_timer = None

        def _busy(self) -> bool:  # a request's headers are in and its response is not complete
            return self.cycle is not None and not self.cycle.response_complete

        def _arm_header_timer(self) -> None:
            self._disarm_header_timer()
            self._header_timer = self.loop.call_later(limits.header_timeout_s, self._header_timeout)

        def _disarm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or self._busy():
                return
            if self._began:  # a request began and its headers never finished
                self.transport.write(_raw_response(408, "Request Timeout", "request_timeout",
                                                   f"request headers not complete within {limits.header_timeout_s:g} "
                                                   "s (--header-timeout-s)"))
            limits.on_refused("header_timeout")
            self.transport.close()

        def connection_made(self, transport) -> None:  # noqa: ANN001
            super().connection_made(transport)
            self._began = self._lingering = self._answered = False
            if len(limits.open) >= limits.max_connections and not self._evict_idle():
                limits.on_refused("connection_cap")
                transport.write(_raw_response(503, "Service Unavailable", "too_many_connections",
                                              f"all {len(limits.open)} connections allowed (--max-connections "
                                              f"{limits.max_connections}) are busy or answered under "
                                              f"{EVICT_GRACE_S:g} s ago; retry later",
                                              "retry-after: 1\r\n"))
                transport.close()
                return
            limits.open[self] = time.monotonic()
            limits.on_change(len(limits.open))
            self._arm_header_timer()  # from accept: an idle socket is closed as a slow one is

        def _evict_idle(self) -> bool:
            spare_after = time.monotonic() - EVICT_GRACE_S
            for other, idle_since in limits.open.items():  # idlest first: insertion order, refreshed when idle again
                if other._answered and idle_since > spare_after:
                    continue  # answered a moment ago: its next request may be on its way
                if not other._busy() and not other.transport.is_closing():
                    limits.on_refused("evicted_idle")
                    other.transport.close()
                    limits.open.pop(other, None)
                    return True
            return False

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_timer()
            if limits.open.pop(self, None) is not None:
                limits.on_change(len(limits.open))
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._lingering:  # the rest of a body nobody reads: dropped unparsed
                return
            if self._header_timer is None and not self._busy():  # a new request on a kept-alive connection
                self._arm_header_timer()
            super().data_received(data)

        def close_or_linger(self) -> None:
            if self.cycle is not None and self.cycle.more_body and not self.transport.is_closing():
                self._linger()
            else:
                self.transport.close()

        def _linger(self) -> None:
            """The answer went out before the request's body was read (413, 401, 415, ...). Closing now, with the
            client's bytes unread in the socket, makes the kernel send a reset that can destroy the answer before
            the client reads it; so, as nginx's lingering close: end our side (FIN), drop whatever still arrives,
            close after ``LINGER_S``."""
            if self._lingering:
                return
            self._lingering = True
            self._disarm_header_timer()
            self._unset_keepalive_if_required()
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._began = True

        def on_headers_complete(self) -> None:
            self._disarm_header_timer()
            self._began = False
            super().on_headers_complete()
            if self.cycle is not None:  # uvicorn closes through the cycle's transport: linger instead if need be
                self.cycle.transport = _LingeringClose(self.transport, self)

        def on_response_complete(self) -> None:
            unread = self.cycle is not None and self.cycle.more_body
            if self._lingering:
                return
            super().on_response_complete()
            if unread and not self.transport.is_closing():  # the rest of the body would only trickle in
                self._linger()
                return
            self._answered = True
            if self in limits.open:  # idle again: move to the end of the eviction order
                limits.open.pop(self)
                limits.open[self] = time.monotonic()

    GuardedHttpToolsProtocol.__name__ = "GuardedHttpToolsProtocol"
    return GuardedHttpToolsProtocol
