"""Structured logs: one JSON object a line (the access log carries the request id)."""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from logging.handlers import MemoryHandler

__all__ = ["JsonFormatter", "configure_logging", "held_back"]

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                 "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "info") -> logging.Handler:
    """JSON lines on stderr for ganet.serve and uvicorn (whose own access log is replaced by ours); the handler."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    for name in ("ganet.serve", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
    return handler


@contextmanager
def held_back(handler: logging.Handler, logger: str = "ganet.serve") -> Iterator[MemoryHandler]:
    """Hold ``logger``'s records back while the service starts: written when the block ends normally, dropped if it
    raises, so that a refused start prints only its one-line reason (``--log-level debug`` shows them anyway)."""
    target = logging.getLogger(logger)
    buffer = MemoryHandler(capacity=1 << 16, flushLevel=logging.CRITICAL + 1, target=handler, flushOnClose=False)
    target.handlers[:] = [buffer]
    try:
        yield buffer
    except BaseException:
        if target.level > logging.DEBUG:
            buffer.buffer.clear()
        raise
    finally:
        target.handlers[:] = [handler]
        buffer.flush()
