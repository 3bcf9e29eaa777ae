"""One front-end process of ``ganet-serve --frontends N``: the whole FastAPI app (routes, limits, API key, decode
pool) on the listening socket the supervisor bound, with a ``RemoteBatcher`` where a single process has its
DynamicBatcher. It imports no backend: the model lives in the supervisor.
"""
from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

from ganet.serve.backends import ModelSpec
from ganet.serve.settings import ServeSettings

__all__ = ["FrontendConfig", "RemoteModel", "run_frontend"]


@dataclass(frozen=True)
class FrontendConfig:
    """What a front end needs to know, pickled to it once at start (no pixel data ever goes this way)."""

    index: int
    settings: ServeSettings
    spec: ModelSpec
    backend: str  # the owner's backend name and device, for /v2/models/NAME
    device: str
    ring_name: str
    ring_slots: int  # slots in the whole ring
    first_slot: int  # this front end's: [first_slot, first_slot + slots)
    slots: int


@dataclass(frozen=True)
class RemoteModel:
    """Stands where a single process keeps its backends: the name and device the v2 metadata reports."""

    name: str
    device: str

    def close(self) -> None:
        """The owner closes the real backends."""


class _Tag(logging.Filter):
    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.frontend = self.index
        return True


def run_frontend(cfg: FrontendConfig, listener: socket.socket, owner: socket.socket) -> None:
    """The process's target: serve HTTP until SIGTERM (drain for --grace-s) or until the owner goes away."""
    import uvicorn

    from ganet.serve.app import ServeState, create_app
    from ganet.serve.cli import make_server
    from ganet.serve.logs import configure_logging
    from ganet.serve.remote_batcher import RemoteBatcher
    from ganet.serve.shm_ring import ImageRing

    configure_logging(cfg.settings.log_level)
    tag = _Tag(cfg.index)
    for name in ("ganet.serve", "uvicorn", "uvicorn.error"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(tag)
    ring = ImageRing.attach(cfg.ring_name, cfg.ring_slots, cfg.spec.input_shape)
    server: uvicorn.Server | None = None

    def owner_lost() -> None:  # the supervisor died (SIGKILL, crash): nothing can be answered any more
        if server is not None:
            server.should_exit = True

    async def attach(state: ServeState) -> None:
        def ready(on: bool) -> None:
            state.ready = on

        state.spec, state.backends = cfg.spec, [RemoteModel(cfg.backend, cfg.device)]
        state.batcher = await RemoteBatcher.connect(owner, ring, cfg.first_slot, cfg.slots, ready, owner_lost)
        state.batcher.started()

    server = make_server(create_app(cfg.settings, attach=attach), cfg.settings, listener)
    try:
        server.run(sockets=[listener])
    finally:
        ring.close()
