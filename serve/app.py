"""The application factory: ``create_app(settings)`` -> FastAPI (model loaded and warmed up in the lifespan)."""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware

from ganet.serve.backends import Backend, ModelSpec, load_backend
from ganet.serve.batcher import BatchResult, DeadlineExceededError, DynamicBatcher, QueueFullError
from ganet.serve.errors import ServeError, install_error_handlers
from ganet.serve.images import decode_image, resizer
from ganet.serve.metrics import Metrics
from ganet.serve.settings import ServeSettings
from ganet.system import usable_cpus

__all__ = ["ServeState", "create_app", "load_backends", "warmup_sizes", "StateDep", "require_api_key"]

log = logging.getLogger("ganet.serve")
access_log = logging.getLogger("ganet.serve.access")


@dataclass
class ServeState:
    settings: ServeSettings
    metrics: Metrics
    spec: ModelSpec | None = None
    backends: list[Backend] = field(default_factory=list)
    batcher: DynamicBatcher | None = None
    decode_pool: ThreadPoolExecutor | None = None
    ready: bool = False

    async def decode(self, data: bytes) -> tuple[np.ndarray, float]:
        """(3, S, S) uint8 and the seconds it took, decoded in the pool (never on the event loop)."""
        def run() -> tuple[np.ndarray, float]:
            start = time.perf_counter()
            image = decode_image(data, self.spec.preprocessing, self.settings.max_pixels)
            return image, time.perf_counter() - start

        image, seconds = await asyncio.get_running_loop().run_in_executor(self.decode_pool, run)
        self.metrics.decode_seconds.observe(seconds)
        return image, seconds

    async def infer(self, images: list[np.ndarray]) -> list[BatchResult]:
        """Each image through the dynamic batcher; 503 when the queue is full, 504 past the deadline."""
        if not self.ready or self.batcher is None:
            raise ServeError(503, "not_ready", "the model is not ready yet (warming up or shutting down)",
                             {"Retry-After": "1"})
        timeout_s = self.settings.timeout_ms / 1e3
        tasks = [asyncio.ensure_future(self.batcher.submit(im, timeout_s)) for im in images]
        try:
            return list(await asyncio.gather(*tasks))
        except QueueFullError as e:
            raise ServeError(503, "queue_full", f"server overloaded: {e}; retry later", {"Retry-After": "1"}) from None
        except DeadlineExceededError as e:
            raise ServeError(504, "deadline_exceeded", f"inference deadline of {self.settings.timeout_ms:g} ms "
                                                       f"exceeded: {e}") from None
        finally:
            for t in tasks:
                t.cancel()  # no-op for finished ones; siblings of a failed image stop waiting


# async dependencies: FastAPI runs plain `def` ones in its threadpool, a thread hop per request for nothing.
async def get_state(request: Request) -> ServeState:
    return request.app.state.serve


StateDep = Annotated[ServeState, Depends(get_state)]


async def require_api_key(request: Request, state: StateDep) -> None:
    """Inference routes only: ``Authorization: Bearer KEY`` when --api-key is set, compared in constant time."""
    key = state.settings.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.get_secret_value().encode()):
        raise ServeError(401, "unauthorized", "missing or wrong API key: send `Authorization: Bearer <key>`",
                         {"WWW-Authenticate": "Bearer"})


def warmup_sizes(max_batch: int) -> list[int]:
    """Every batch size up to 8, then powers of two and max_batch itself."""
    sizes = set(range(1, min(max_batch, 8) + 1)) | {2 ** i for i in range(max_batch.bit_length()) if 2 ** i <= max_batch}
    return sorted(sizes | {max_batch})


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class ServeMiddleware:
    """Pure ASGI: request id (X-Request-ID in and out), body-size limit, per-route metrics, a JSON access log."""

    def __init__(self, app: Callable, state_of: Callable[[], ServeState]) -> None:
        self.app, self.state_of = app, state_of

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = self.state_of()
        limit = state.settings.max_body_bytes
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        incoming = headers.get("x-request-id", "")
        request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        start, status, received = time.perf_counter(), 500, 0

        async def send_wrapper(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        async def receive_wrapper() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:  # chunked bodies without Content-Length
                raise ServeError(413, "body_too_large", f"request body exceeds the limit of {limit} bytes")
            return message

        length = headers.get("content-length", "")
        try:
            if length.isdigit() and int(length) > limit:
                await self._too_large(scope, receive, send_wrapper, request_id, int(length), limit)
            else:
                await self.app(scope, receive_wrapper, send_wrapper)
        except asyncio.CancelledError:  # the shutdown grace period ran out, or the server is going away
            status = 499
            raise
        finally:
            seconds = time.perf_counter() - start
            route = getattr(scope.get("route"), "path", "unmatched")
            state.metrics.requests.labels(route, str(status)).inc()
            state.metrics.request_seconds.labels(route).observe(seconds)
            access_log.info("request", extra={"event": "access", "request_id": request_id,
                                              "method": scope["method"], "path": scope["path"], "status": status,
                                              "ms": round(seconds * 1e3, 3), "client": (scope.get("client") or
                                                                                        ("", 0))[0]})

    @staticmethod
    async def _too_large(scope, receive, send, request_id: str, length: int, limit: int) -> None:
        body = json.dumps({"error": f"request body of {length} bytes exceeds the limit of {limit} bytes",
                           "code": "body_too_large", "request_id": request_id}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


# ONNX Runtime on the CPU, default --max-batch: per image, this network costs the same at batch 4 as at 8 or 16
# (4.01, 3.98, 4.03 ms on one core; 4.25 at 1), so a larger batch buys nothing, and one instance that takes 10
# queued images leaves the others idle while its batch runs. With 16 clients on 2 cores (2 instances), a cap of 4
# instead of the export's 32 served ~6% more images per second and cut p99 at half the peak from 44-62 to 43-46 ms.
CPU_MAX_BATCH = 4


def load_backends(s: ServeSettings) -> tuple[list[Backend], ModelSpec]:
    """One backend per --instances (each worker thread owns one: TensorRT contexts are not thread-safe).

    Default instances: ONNX Runtime on the CPU gets one instance per ``intra_op_threads`` CPUs. A CNN this small
    gains little from intra-op threads, and one session leaves cores idle while its worker waits for the next batch;
    two sessions on 2 cores serve ~10% more images per second (benchmarks/bench_serve.py). GPUs: one instance."""
    def load() -> tuple[Backend, ModelSpec]:
        return load_backend(s.model, s.backend, intra_op_threads=s.intra_op_threads, device=s.device,
                            max_batch=s.max_batch, name=s.model_name, precision=s.precision,
                            fused_kernels=s.fused_kernels)

    first, spec = load()
    on_cpu = first.name == "onnxruntime" and first.device == "CPUExecutionProvider"
    count = s.instances
    if count is None:
        count = max(1, usable_cpus() // first.session.get_session_options().intra_op_num_threads) if on_cpu else 1
        log.info("instances", extra={"event": "instances", "instances": count, "backend": first.name,
                                     "why": "one per intra-op thread group on the CPU" if on_cpu else "one per GPU"})
    if on_cpu and s.max_batch is None and spec.max_batch > CPU_MAX_BATCH:
        spec = dataclasses.replace(spec, max_batch=CPU_MAX_BATCH)
        log.info("max batch", extra={"event": "max_batch", "max_batch": CPU_MAX_BATCH,
                                     "why": "on the CPU larger batches cost as much per image and keep the other "
                                            "instances idle (--max-batch overrides)"})
    return [first] + [load()[0] for _ in range(count - 1)], spec


def _start(state: ServeState, backends: list[Backend] | None, spec: ModelSpec | None) -> None:
    """Load (unless given) the backend instances, warm them up at every batch size, start the batcher."""
    s = state.settings
    if backends is None:
        backends, spec = load_backends(s)
    state.backends, state.spec = backends, spec
    log.info("decoder", extra={"event": "decoder", "resize": resizer()[1]})  # builds the kernel library if needed
    if s.warmup:
        start = time.perf_counter()
        sizes = warmup_sizes(spec.max_batch)
        for backend in backends:
            for n in sizes:
                backend(np.zeros((n, *spec.input_shape), np.uint8))
        log.info("warmed up", extra={"event": "warmup", "batch_sizes": sizes,
                                     "seconds": round(time.perf_counter() - start, 3)})
    for backend in backends:
        if hasattr(backend, "gpu_memory_bytes"):
            state.metrics.track_gpu(backend.gpu_memory_bytes)
            break
    state.batcher = DynamicBatcher(backends, spec.max_batch, s.max_delay_us, s.queue_size, state.metrics.on_batch)
    state.metrics.track_queue(lambda: state.batcher.depth)


def create_app(settings: ServeSettings, *, backends: list[Backend] | None = None,
               spec: ModelSpec | None = None,
               attach: Callable[[ServeState], Awaitable[None]] | None = None) -> FastAPI:
    """The service. ``backends`` + ``spec`` inject already-built backends (tests); otherwise settings.model loads.
    ``attach``: another process owns the model (``ganet-serve --frontends``); it sets the state's spec, backends
    and batcher, and turns ``ready`` on when the owner says every process is warm."""
    from ganet.serve.routes_classify import router as classify_router
    from ganet.serve.routes_ops import router as ops_router
    from ganet.serve.routes_v2 import router as v2_router

    state = ServeState(settings, Metrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.decode_pool = ThreadPoolExecutor(settings.workers_decode, thread_name_prefix="ganet-decode")
        if attach is not None:
            await attach(state)
        else:
            await asyncio.get_running_loop().run_in_executor(None, _start, state, backends, spec)
            state.ready = True
            log.info("ready", extra={"event": "ready", "model": state.spec.name, "backend": state.backends[0].name,
                                     "device": state.backends[0].device, "max_batch": state.spec.max_batch})
        try:
            yield
        finally:
            # uvicorn has stopped accepting and waited (--grace-s) for in-flight requests by now.
            state.ready = False
            state.batcher.close(settings.grace_s)
            state.decode_pool.shutdown(wait=False, cancel_futures=True)
            for backend in state.backends:
                backend.close()
            log.info("stopped", extra={"event": "shutdown"})

    app = FastAPI(title="ganet-serve", version=_version(), lifespan=lifespan,
                  description="GA-ShuffleNet image classification: `/classify` for people and browsers, the Open "
                              "Inference Protocol v2 (`/v2/...`) for Triton and KServe clients, `/metrics` for "
                              "Prometheus. Every error has the body `{\"error\": message, \"code\": code, "
                              "\"request_id\": id}`.")
    app.state.serve = state
    app.openapi = lambda: _openapi(app)
    install_error_handlers(app)
    app.include_router(classify_router)
    app.include_router(v2_router)
    app.include_router(ops_router)
    if settings.cors_origin_list:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origin_list, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
                           expose_headers=["X-Request-ID"])
    app.add_middleware(ServeMiddleware, state_of=lambda: state)
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the v2 request body, which the infer route parses itself (JSON or binary)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        from ganet.serve.schemas import V2InferRequest

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        request = V2InferRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(request.pop("$defs", {}))
        components["V2InferRequest"] = request
        app.openapi_schema = schema
    return app.openapi_schema


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("ganet")
    except Exception:
        return "0"
