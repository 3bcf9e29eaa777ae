"""The application factory: ``create_app(settings)`` -> FastAPI (model loaded and warmed up in the lifespan)."""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware

from ganet.serve.backends import Backend, BackendError, ModelSpec, load_backend
from ganet.serve.batcher import BatchResult, DeadlineExceededError, DynamicBatcher, QueueFullError
from ganet.serve.budget import ByteBudget
from ganet.serve.decode import Decoder, deadline_error
from ganet.serve.errors import ServeError, install_error_handlers
from ganet.serve.images import resizer
from ganet.serve.metrics import Metrics
from ganet.serve.middleware import ServeMiddleware
from ganet.serve.settings import ServeSettings
from ganet.system import usable_cpus

__all__ = ["ServeState", "create_app", "default_top_k", "load_backends", "make_gpu_decoder", "prepare", "warm_up",
           "warmup_sizes", "StateDep", "require_api_key", "deadline_of"]

log = logging.getLogger("ganet.serve")


@dataclass
class ServeState:
    settings: ServeSettings
    metrics: Metrics
    spec: ModelSpec | None = None
    backends: list[Backend] = field(default_factory=list)
    batcher: DynamicBatcher | None = None
    decode_pool: ThreadPoolExecutor | None = None
    decoder: Decoder | None = None
    budget: ByteBudget | None = None
    ready: bool = False
    warmed: bool = False  # the backends were warmed up before the app was created (ganet-serve does it)
    draining: bool = False  # a stop signal arrived: /v2/health/ready answers 503 while requests are still served
    gpu_decoder: Any = None  # ganet.serve.gpu_decode.GpuDecoder with --decode gpu

    async def decode(self, data: bytes, deadline: float | None = None) -> tuple[np.ndarray, float]:
        """(3, S, S) uint8 and the seconds it took, decoded in the pool (never on the event loop), inside the
        decode budget and before ``deadline`` (time.monotonic(); default: --timeout-ms from now)."""
        (image, seconds), = await self.decode_all([data], deadline)
        return image, seconds

    async def decode_all(self, datas: list[bytes], deadline: float | None = None,
                         names: list[str | None] | None = None) -> list[tuple[np.ndarray, float]]:
        deadline = deadline if deadline is not None else time.monotonic() + self.settings.timeout_ms / 1e3
        decoded = await self.decoder.decode_all(datas, deadline, names)
        for _, seconds in decoded:
            self.metrics.decode_seconds.observe(seconds)
        return decoded

    async def infer(self, images: list[np.ndarray], deadline: float | None = None) -> list[BatchResult]:
        """Each image through the dynamic batcher; 503 when the queue is full, 504 past the request's deadline
        (time.monotonic(); default: --timeout-ms from now)."""
        if not self.ready or self.batcher is None:
            raise ServeError(503, "not_ready", "the model is not ready yet (warming up or shutting down)",
                             {"Retry-After": "1"})
        timeout_s = self.settings.timeout_ms / 1e3
        left = timeout_s if deadline is None else deadline - time.monotonic()
        if left <= 0:
            raise deadline_error(self.settings.timeout_ms, "before inference (reading and decoding took it all)")
        tasks = [asyncio.ensure_future(self.batcher.submit(im, left)) for im in images]
        try:
            return list(await asyncio.gather(*tasks))
        except QueueFullError as e:
            raise ServeError(503, "queue_full", f"server overloaded: {e}; retry later", {"Retry-After": "1"}) from None
        except DeadlineExceededError as e:
            raise deadline_error(self.settings.timeout_ms, f"before inference finished: {e}") from None
        finally:
            for t in tasks:
                t.cancel()  # no-op for finished ones; siblings of a failed image stop waiting (and are dropped)


def deadline_of(request: Request) -> float:
    """The request's deadline (time.monotonic()), set by the middleware when the request arrived."""
    deadline = getattr(request.state, "deadline", None)
    return deadline if deadline is not None else time.monotonic() + request.app.state.serve.settings.timeout_ms / 1e3


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


# ONNX Runtime on the CPU, default --max-batch: per image, this network costs the same at batch 4 as at 8 or 16
# (4.01, 3.98, 4.03 ms on one core; 4.25 at 1), so a larger batch buys nothing, and one instance that takes 10
# queued images leaves the others idle while its batch runs. With 16 clients on 2 cores (2 instances), a cap of 4
# instead of the export's 32 served ~6% more images per second and cut p99 at half the peak from 44-62 to 43-46 ms.
CPU_MAX_BATCH = 4


class _OncePerStart(logging.Filter):
    """Drops repeats of the start-up lines every instance would log again (which backend and why, which graph)."""

    def __init__(self, events: tuple[str, ...]) -> None:
        super().__init__()
        self.events, self.seen = events, set()

    def filter(self, record: logging.LogRecord) -> bool:
        event = getattr(record, "event", None)
        if event not in self.events:
            return True
        key = (event, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def load_backends(s: ServeSettings) -> tuple[list[Backend], ModelSpec]:
    """One backend per --instances (each worker thread owns one: TensorRT contexts are not thread-safe).

    Default instances: ONNX Runtime on the CPU gets one instance per ``intra_op_threads`` CPUs. A CNN this small
    gains little from intra-op threads, and one session leaves cores idle while its worker waits for the next batch;
    two sessions on 2 cores serve ~10% more images per second (benchmarks/bench_serve.py). GPUs: one instance."""
    def load() -> tuple[Backend, ModelSpec]:
        return load_backend(s.model, s.backend, intra_op_threads=s.intra_op_threads, device=s.device,
                            max_batch=s.max_batch, name=s.model_name, precision=s.precision,
                            fused_kernels=s.fused_kernels, engine_cache=s.engine_cache, cuda_graphs=s.cuda_graphs)

    once = _OncePerStart(("backend", "graph"))
    log.addFilter(once)
    try:
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
                                         "why": "on the CPU larger batches cost as much per image and keep the "
                                                "other instances idle (--max-batch overrides)"})
        return [first] + [load()[0] for _ in range(count - 1)], spec
    finally:
        log.removeFilter(once)


def prepare(s: ServeSettings) -> tuple[list[Backend], ModelSpec]:
    """Everything that can refuse a model, before the service turns ready: the SHA-256 of every file it loads
    (unless --skip-verify), loading each instance, the graph's contract against the manifest. Raises
    ``StartupError``, one line naming the file and the problem."""
    from ganet.serve.startup import StartupError, check_contract, verify_integrity

    def one_line(e: BaseException) -> str:
        lines = str(e).strip().splitlines()
        return (lines[0] if lines else type(e).__name__)[:500]

    try:
        if s.skip_verify:
            log.warning("integrity not checked (--skip-verify)", extra={"event": "integrity", "checked": False})
        else:
            checked = verify_integrity(s)
            log.info("integrity", extra={"event": "integrity", "checked": True, **checked})
        backends, spec = load_backends(s)
    except StartupError:
        raise
    except (ValueError, OSError, BackendError) as e:  # manifest, checkpoint, backend choice: they name the file
        raise StartupError(one_line(e)) from None
    except Exception as e:  # ONNX Runtime, TensorRT, torch: a file their parsers refuse
        raise StartupError(f"{s.model}: the model cannot be loaded ({type(e).__name__}: {one_line(e)})") from None
    check_contract(backends, spec, s.model)
    return backends, spec


def warm_up(backends: list[Backend], spec: ModelSpec) -> None:
    """Every batch size the batcher can form, through every instance, before turning ready."""
    start = time.perf_counter()
    # Backends that record fixed batch sizes (CUDA graphs) record every one of them, largest first, then run too.
    sizes = sorted(set(warmup_sizes(spec.max_batch)).union(*(getattr(b, "batch_sizes", ()) for b in backends)))
    for backend in backends:
        if hasattr(backend, "prepare"):
            backend.prepare()
        for n in sizes:
            backend(np.zeros((n, *spec.input_shape), np.uint8))
    log.info("warmed up", extra={"event": "warmup", "batch_sizes": sizes,
                                 "seconds": round(time.perf_counter() - start, 3)})


def make_gpu_decoder(s: ServeSettings, spec: ModelSpec):
    """The --decode gpu decoder (raises RuntimeError naming what is missing: torchvision, CUDA, ...)."""
    try:
        from ganet.serve.gpu_decode import GpuDecoder
        from ganet.serve.gpu_resize import ResizeMismatchError

        import torch
    except ImportError as e:
        raise RuntimeError(f"--decode gpu needs torch and torchvision ({e})") from None
    device = s.device or "cuda"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--decode gpu needs a CUDA GPU, and torch sees none (use --decode cpu)")
    try:
        decoder = GpuDecoder(spec.preprocessing, s.max_pixels, device=device)
    except ResizeMismatchError as e:
        raise RuntimeError(str(e)) from None
    decoder.warm_up()
    log.info("GPU decoder", extra={"event": "decoder", "decode": "gpu", "device": device,
                                   "resize_pass_order": decoder.resize.order if decoder.resize else None})
    return decoder


def _start(state: ServeState, backends: list[Backend] | None, spec: ModelSpec | None) -> None:
    """Prepare (unless given) the backend instances, warm them up (unless done), start the batcher (in one process,
    or in the model owner of --frontends)."""
    s = state.settings
    if backends is None:
        backends, spec = prepare(s)
    state.backends, state.spec = backends, spec
    if s.warmup and not state.warmed:
        warm_up(backends, spec)
    for backend in backends:
        if hasattr(backend, "gpu_memory_bytes"):
            state.metrics.track_gpu(backend.gpu_memory_bytes)
            break
    state.batcher = DynamicBatcher(backends, spec.max_batch, s.max_delay_us, s.queue_size, state.metrics.on_batch)
    state.metrics.track_queue(lambda: state.batcher.depth)


def _start_decoder(state: ServeState) -> None:
    """The decoder of this process (in every front end of --frontends too): the native resize, the decode budget,
    and with --decode gpu the GPU decoder."""
    s, spec = state.settings, state.spec
    log.info("decoder", extra={"event": "decoder", "resize": resizer()[1],
                               "max_decode_bytes": s.max_decode_bytes})  # builds the kernel library if needed
    if s.decode == "gpu" and state.gpu_decoder is None:
        state.gpu_decoder = make_gpu_decoder(s, spec)
    state.decoder = Decoder(state.decode_pool, s.workers_decode, state.budget, spec.preprocessing, s.max_pixels,
                            s.timeout_ms, gpu=state.gpu_decoder,
                            on_path=lambda path, reason: state.metrics.decode_images.labels(path, reason).inc())


def create_app(settings: ServeSettings, *, backends: list[Backend] | None = None,
               spec: ModelSpec | None = None, warmed: bool = False, gpu_decoder: Any = None,
               attach: Callable[[ServeState], Awaitable[None]] | None = None) -> FastAPI:
    """The service. ``backends`` + ``spec`` inject already-prepared backends (``prepare``; ``warmed``: and warmed
    up, as ganet-serve does before it binds); otherwise the lifespan prepares settings.model. ``gpu_decoder``: a
    ``GpuDecoder`` (--decode gpu; made by ``make_gpu_decoder`` when not given). ``attach``: another process owns the
    model (``ganet-serve --frontends``); it sets the state's spec, backends and batcher, and turns ``ready`` on
    when the owner says every process is warm."""
    from ganet.serve.routes_classify import router as classify_router
    from ganet.serve.routes_ops import router as ops_router
    from ganet.serve.routes_v2 import router as v2_router

    state = ServeState(settings, Metrics(), warmed=warmed, budget=ByteBudget(settings.max_decode_bytes),
                       gpu_decoder=gpu_decoder)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.decode_pool = ThreadPoolExecutor(settings.workers_decode, thread_name_prefix="ganet-decode")
        loop = asyncio.get_running_loop()
        if attach is not None:
            await attach(state)
            await loop.run_in_executor(None, _start_decoder, state)
        else:
            await loop.run_in_executor(None, _start, state, backends, spec)
            await loop.run_in_executor(None, _start_decoder, state)
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
            if state.gpu_decoder is not None:
                state.gpu_decoder.close()
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
    """FastAPI's schema plus what the routes enforce beyond their signatures: the v2 request body (the infer routes
    parse it themselves, JSON or binary) and the model's own bounds of ``top_k`` (1..num_classes, default
    min(5, num_classes)), known once the model is loaded."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    from ganet.serve.schemas import V2InferRequest

    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    request = V2InferRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(request.pop("$defs", {}))
    components["V2InferRequest"] = request
    spec = app.state.serve.spec
    if spec is None:
        return schema  # not cached: the bounds of top_k are added once the model is loaded
    for parameter in schema["paths"]["/classify"]["post"].get("parameters", []):
        if parameter["name"] == "top_k":
            parameter["schema"] = {"type": "integer", "minimum": 1, "maximum": spec.num_classes,
                                   "default": default_top_k(spec.num_classes), "title": "Top K"}
    app.openapi_schema = schema
    return schema


def default_top_k(num_classes: int) -> int:
    """``top_k`` when the request gives none: 5, or every class of a model with fewer."""
    return min(5, num_classes)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("ganet")
    except Exception:
        return "0"
