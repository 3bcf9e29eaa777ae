"""The pure ASGI middleware every request goes through: request id, deadline, body limit and body timeout, client
disconnects (499), server bugs (500 with the request id), per-route metrics and the JSON access log.

Statuses it decides itself:

* 413 ``body_too_large``: a Content-Length over --max-body-bytes (before the body is read), or a chunked body that
  grows past it;
* 408 ``request_timeout``: the body did not arrive before the request's deadline (--timeout-ms from the first
  byte the server saw of it): slow and stalled uploads are cut, the connection closed;
* 499 (logged and counted, never sent): the client went away before the answer; the request's pending work
  (decodes, queued images) is cancelled, so nothing is inferred for nobody;
* 500 ``internal_error``: an exception no route handled, which is a bug; the trace goes to the log once, with the
  request id, and the answer carries the id.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from starlette.requests import ClientDisconnect

from ganet.serve.errors import ServeError
from ganet.serve.limits import header_int

if TYPE_CHECKING:
    from ganet.serve.app import ServeState

__all__ = ["ServeMiddleware", "CLIENT_CLOSED"]

log = logging.getLogger("ganet.serve")
access_log = logging.getLogger("ganet.serve.access")

CLIENT_CLOSED = 499  # nginx's "client closed request": the status the log and /metrics give a disconnect
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def _json_response(status: int, body: dict, extra: list[tuple[bytes, bytes]] = ()) -> tuple[dict, dict]:
    data = json.dumps(body).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                         *extra]}
    return start, {"type": "http.response.body", "body": data}


class ServeMiddleware:
    def __init__(self, app: Callable, state_of: Callable[[], ServeState]) -> None:
        self.app, self.state_of = app, state_of

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = self.state_of()
        settings = state.settings
        limit = settings.max_body_bytes
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        incoming = headers.get("x-request-id", "")
        request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        start = time.perf_counter()
        deadline = time.monotonic() + settings.timeout_ms / 1e3
        scope.setdefault("state", {}).update(request_id=request_id, deadline=deadline)
        status, received, started = 500, 0, False
        task = asyncio.current_task()
        watcher: asyncio.Task | None = None
        gone = False  # the client disconnected before the answer
        body_done = False  # the app has received the whole body

        async def send_wrapper(message: dict) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                extra = [(b"x-request-id", request_id.encode())]
                if expects_body and not body_done:  # answered early (413, 401, 415): this connection is done
                    extra.append((b"connection", b"close"))
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        async def watch_disconnect() -> None:
            """After the whole body: the next message is a disconnect, which before the answer means the client
            left; cancel the request's work then."""
            nonlocal gone
            message = await receive()
            if message["type"] == "http.disconnect" and not started:
                gone = True
                task.cancel()

        async def receive_wrapper() -> dict:
            nonlocal received, watcher, body_done
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.001)):
                    message = await receive()
            except TimeoutError:
                raise ServeError(408, "request_timeout", f"the request body did not arrive within the deadline of "
                                                         f"{settings.timeout_ms:g} ms (--timeout-ms)",
                                 {"Connection": "close"}) from None
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            received += len(message.get("body", b""))
            if received > limit:  # chunked bodies without Content-Length
                raise ServeError(413, "body_too_large", f"request body exceeds the limit of {limit} bytes")
            if not message.get("more_body", False) and watcher is None:
                body_done = True
                watcher = asyncio.ensure_future(watch_disconnect())
            return message

        length = header_int(headers.get("content-length"))
        expects_body = bool(length) or "chunked" in headers.get("transfer-encoding", "").lower()
        try:
            if length is not None and length > limit:
                status = 413
                for m in _json_response(413, {"error": f"request body of {length} bytes exceeds the limit of "
                                                       f"{limit} bytes", "code": "body_too_large",
                                              "request_id": request_id}):  # the connection lingers
                    await send_wrapper(m)
            else:
                await self.app(scope, receive_wrapper, send_wrapper)
        except asyncio.CancelledError:
            if not gone:  # the shutdown grace period ran out, or the server is going away
                status = CLIENT_CLOSED
                raise
            task.uncancel()
            status = CLIENT_CLOSED
        except ClientDisconnect:
            status = CLIENT_CLOSED
        except Exception:  # a bug: no route turned it into an answer
            log.exception("internal error", extra={"event": "error", "request_id": request_id})
            if not started:
                for m in _json_response(500, {"error": "internal server error (see the server log for this "
                                                       "request_id)", "code": "internal_error",
                                              "request_id": request_id}):
                    await send_wrapper(m)
            status = 500
        finally:
            if watcher is not None:
                watcher.cancel()
            seconds = time.perf_counter() - start
            route = getattr(scope.get("route"), "path", "unmatched")
            state.metrics.requests.labels(route, str(status)).inc()
            state.metrics.request_seconds.labels(route).observe(seconds)
            access_log.info("request", extra={"event": "access", "request_id": request_id,
                                              "method": scope["method"], "path": scope["path"], "status": status,
                                              "ms": round(seconds * 1e3, 3),
                                              "client": (scope.get("client") or ("", 0))[0]})
