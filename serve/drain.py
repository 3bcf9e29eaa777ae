"""SIGTERM in two steps: first out of the load balancer's rotation, then uvicorn's graceful shutdown.

uvicorn closes its listening socket the moment SIGTERM arrives. A load balancer that learns about a replica only
from health checks (HAProxy, nginx, a cloud LB, compose) still sends it requests until its next check fails:
those hit a closed port, or a connection that was accepted into the backlog and is then reset. With
``--drain-delay-s D`` the first SIGTERM (or SIGINT) turns ``/v2/health/ready`` to 503 at once and keeps serving for D
seconds; only then does uvicorn stop accepting, finish in-flight requests (``--grace-s``) and exit. A second signal
ends the delay early. On Kubernetes a preStop hook does the same job (the endpoint is removed before SIGTERM), so
the delay stays 0 there.
"""
from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import uvicorn

__all__ = ["DrainingServer"]

log = logging.getLogger("ganet.serve")


class DrainingServer(uvicorn.Server):
    """``uvicorn.Server`` that reports not-ready for ``drain_delay_s`` after the first stop signal, still serving."""

    def __init__(self, config: uvicorn.Config, state, drain_delay_s: float) -> None:
        super().__init__(config)
        self.state = state  # ganet.serve.app.ServeState: its `draining` flag turns readiness to 503
        self.drain_delay_s = drain_delay_s
        self._drain: tuple[float, int] | None = None  # (deadline on the monotonic clock, the signal)
        self._drain_logged = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: set flags only (no logging here: it could re-enter a lock the main thread holds).
        self.state.draining = True
        if self._drain is None and self.drain_delay_s > 0 and self.started and not self.should_exit:
            self._drain = (time.monotonic() + self.drain_delay_s, sig)
            return
        self._drain = None
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._drain is not None:
            deadline, sig = self._drain
            if not self._drain_logged:
                self._drain_logged = True
                log.info("draining", extra={"event": "draining", "signal": signal.Signals(sig).name,
                                            "delay_s": self.drain_delay_s,
                                            "why": "/v2/health/ready answers 503 so that load balancers stop "
                                                   "sending requests before the socket closes"})
            if time.monotonic() >= deadline:
                self._drain = None
                super().handle_exit(sig, None)  # records the signal, which uvicorn re-raises after shutting down
        return await super().on_tick(counter)
