"""The service's limits on the pixel probe (tests/probe_export.py): the body-size limit with and without
Content-Length, request ids in and out, per-route metrics, not-ready, overload and deadline answers, warm-up sizes
and the CPU defaults of load_backends."""
from __future__ import annotations

import asyncio
import io
import re
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from starlette.requests import Request

from ganet.serve import app as serve_app
from ganet.serve.app import ServeState, create_app, deadline_of, load_backends, warmup_sizes
from ganet.serve.backends import load_backend
from ganet.serve.batcher import DeadlineExceededError, QueueFullError
from ganet.serve.errors import ServeError
from ganet.serve.metrics import Metrics
from ganet.serve.settings import ServeSettings
from probe_export import SIZE, make_probe_export
from test_guard_batching import Recording

LIMIT = 2_000


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory):
    return make_probe_export(tmp_path_factory.mktemp("limits") / "probe", max_batch=8)


def png(side: int = SIZE) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), 77, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def app_for(probe_dir, seconds: float = 0.0, **settings):
    backend, spec = load_backend(probe_dir, "onnxruntime", intra_op_threads=1, max_batch=1)
    recording = Recording(backend, seconds=seconds)
    config = dict(model=probe_dir, warmup=False, workers_decode=1, max_body_bytes=LIMIT, max_delay_us=0) | settings
    return create_app(ServeSettings(**config), backends=[recording], spec=spec), recording


def test_body_limit_with_and_without_content_length(probe_dir):
    app, recording = app_for(probe_dir)
    with TestClient(app) as c:
        at_limit = png() + b"\0" * (LIMIT - len(png()))  # trailing bytes after IEND: still a PNG, exactly LIMIT long
        assert c.post("/classify", content=at_limit, headers={"Content-Type": "image/png"}).status_code == 200
        over = at_limit + b"\0"
        r = c.post("/classify", content=over, headers={"Content-Type": "image/png", "X-Request-ID": "big-1"})
        assert r.status_code == 413 and r.headers["connection"] == "close"
        assert r.json() == {"error": f"request body of {LIMIT + 1} bytes exceeds the limit of {LIMIT} bytes",
                            "code": "body_too_large", "request_id": "big-1"}
        assert r.headers["x-request-id"] == "big-1"
        # answered by the middleware before any route ran: still a well-formed JSON response
        assert r.headers["content-type"] == "application/json"
        assert r.headers["content-length"] == str(len(r.content))

        def chunks(total: int):
            for i in range(0, total, 500):
                yield over[i:i + 500]

        r = c.post("/classify", content=chunks(len(over)), headers={"Content-Type": "image/png"})
        assert r.status_code == 413 and r.json()["code"] == "body_too_large"
        assert f"limit of {LIMIT} bytes" in r.json()["error"]
        r = c.post("/classify", content=chunks(len(at_limit)), headers={"Content-Type": "image/png"})
        assert r.status_code == 200, r.text
    assert recording.calls == [1, 1]  # only the two bodies within the limit reached the model


def test_request_ids_and_per_route_metrics(probe_dir):
    app, _ = app_for(probe_dir)
    with TestClient(app) as c:
        for good in ("abc-123", "A.b_c:9", "x" * 64):
            assert c.get("/v2/health/live", headers={"X-Request-ID": good}).headers["x-request-id"] == good
        for bad in ("x" * 65, "has space", "semi;colon", "é"):
            got = c.get("/v2/health/live", headers={"X-Request-ID": bad.encode("utf-8")}).headers["x-request-id"]
            assert got != bad and re.fullmatch(r"[0-9a-f]{32}", got), bad
        ids = {c.get("/v2/health/live").headers["x-request-id"] for _ in range(3)}
        assert len(ids) == 3  # a fresh id each time
        assert c.post("/classify", content=png(), headers={"Content-Type": "image/png"}).status_code == 200
        c.get("/nope")
        metrics = c.get("/metrics").text
    assert 'ganet_requests_total{route="/classify",status="200"} 1.0' in metrics
    assert 'ganet_requests_total{route="/v2/health/live",status="200"} 10.0' in metrics
    assert 'ganet_requests_total{route="unmatched",status="404"} 1.0' in metrics
    assert 'ganet_request_seconds_count{route="/classify"} 1.0' in metrics


async def _posts(app, n: int, **headers) -> list[httpx.Response]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await asyncio.gather(*(c.post("/classify", content=png(), headers={"Content-Type": "image/png"})
                                          for _ in range(n)))


def test_overload_is_503_with_retry_after(probe_dir):
    app, _ = app_for(probe_dir, seconds=0.3, queue_size=1)
    responses = asyncio.run(_posts(app, 5))
    statuses = sorted(r.status_code for r in responses)
    assert 200 in statuses and 503 in statuses, statuses
    for r in responses:
        if r.status_code == 503:
            assert r.json()["code"] == "queue_full" and r.headers["retry-after"] == "1"
            assert "retry later" in r.json()["error"]


def test_deadline_is_504_naming_it(probe_dir):
    app, _ = app_for(probe_dir, seconds=0.5, timeout_ms=100)
    (r,) = asyncio.run(_posts(app, 1))
    assert r.status_code == 504 and r.json()["code"] == "deadline_exceeded"
    assert "deadline of 100 ms (--timeout-ms) passed" in r.json()["error"]


def test_not_ready_is_503(probe_dir):
    app, recording = app_for(probe_dir)
    with TestClient(app) as c:
        app.state.serve.ready = False
        r = c.post("/classify", content=png(), headers={"Content-Type": "image/png"})
        assert r.status_code == 503 and r.json()["code"] == "not_ready" and r.headers["retry-after"] == "1"
        app.state.serve.ready = True
    assert recording.calls == []


def test_warmup_sizes():
    assert warmup_sizes(1) == [1]
    assert warmup_sizes(4) == [1, 2, 3, 4]
    assert warmup_sizes(8) == list(range(1, 9))
    assert warmup_sizes(9) == list(range(1, 10))
    assert warmup_sizes(20) == [1, 2, 3, 4, 5, 6, 7, 8, 16, 20]
    assert warmup_sizes(64) == [1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64]


def test_load_backends_cpu_defaults(probe_dir, monkeypatch):
    monkeypatch.setattr("ganet.serve.app.usable_cpus", lambda: 4)
    monkeypatch.setattr("ganet.serve.backends.usable_cpus", lambda: 4)
    backends, spec = load_backends(ServeSettings(model=probe_dir, intra_op_threads=2))
    assert len(backends) == 2 and spec.max_batch == 4  # 4 CPUs / 2 threads; the CPU cap below the export's 8
    backends, spec = load_backends(ServeSettings(model=probe_dir, intra_op_threads=1, instances=3, max_batch=6))
    assert len(backends) == 3 and spec.max_batch == 6 and len({id(b.session) for b in backends}) == 3
    small = make_probe_export(probe_dir.parent / "small", max_batch=3)
    assert load_backends(ServeSettings(model=small, intra_op_threads=1))[1].max_batch == 3  # never raised


def _events(caplog, event: str) -> list:
    return [r for r in caplog.records if getattr(r, "event", None) == event]


def test_load_backends_says_what_it_chose_and_why(probe_dir, monkeypatch, caplog):
    """The start-up lines an operator reads: how many instances and why, the CPU batch cap and why (only when the
    export's maximum is above it), and which backend was chosen said once however many instances load it."""
    monkeypatch.setattr("ganet.serve.app.usable_cpus", lambda: 4)
    monkeypatch.setattr("ganet.serve.backends.usable_cpus", lambda: 4)
    caplog.set_level("INFO", logger="ganet.serve")
    load_backends(ServeSettings(model=probe_dir, intra_op_threads=2))
    (instances,) = _events(caplog, "instances")
    assert instances.getMessage() == "instances"
    assert (instances.instances, instances.backend, instances.why) == (2, "onnxruntime",
                                                                      "one per intra-op thread group on the CPU")
    (cap,) = _events(caplog, "max_batch")
    assert (cap.getMessage(), cap.max_batch) == ("max batch", 4)
    assert cap.why == "on the CPU larger batches cost as much per image and keep the other instances idle " \
                      "(--max-batch overrides)"
    caplog.clear()
    backends, _ = load_backends(ServeSettings(model=probe_dir, intra_op_threads=1, instances=3))
    assert len(backends) == 3 and len(_events(caplog, "backend")) == 1  # three loads, one line
    caplog.clear()
    one_cpu = make_probe_export(probe_dir.parent / "at-the-cap", max_batch=4)
    monkeypatch.setattr("ganet.serve.app.usable_cpus", lambda: 1)  # fewer CPUs than intra-op threads: still one
    backends, spec = load_backends(ServeSettings(model=one_cpu, intra_op_threads=2))
    assert len(backends) == 1 and _events(caplog, "instances")[0].instances == 1
    assert spec.max_batch == 4 and _events(caplog, "max_batch") == []  # at the cap, not above it: nothing to say


def test_load_backends_gives_an_accelerator_one_instance_and_its_whole_batch(probe_dir, monkeypatch, caplog):
    """ONNX Runtime on CUDA (stood in for: no GPU here) is not 'on the CPU': one instance, the export's maximum
    batch, no cap, and the log says why."""
    _, spec = load_backend(probe_dir, "onnxruntime", intra_op_threads=1)
    gpu = SimpleNamespace(name="onnxruntime", device="CUDAExecutionProvider",
                          session=SimpleNamespace(get_session_options=lambda: SimpleNamespace(intra_op_num_threads=1)))
    monkeypatch.setattr(serve_app, "load_backend", lambda *a, **k: (gpu, spec))
    monkeypatch.setattr("ganet.serve.app.usable_cpus", lambda: 4)
    caplog.set_level("INFO", logger="ganet.serve")
    backends, served = load_backends(ServeSettings(model=probe_dir))
    assert backends == [gpu] and served.max_batch == spec.max_batch > 4
    (instances,) = _events(caplog, "instances")
    assert (instances.instances, instances.why) == (1, "one per GPU") and _events(caplog, "max_batch") == []


def test_warmup_sizes_exactly():
    """Every size up to 8, then the powers of two, and the maximum itself (each warmed once, ascending)."""
    assert warmup_sizes(1) == [1] and warmup_sizes(4) == [1, 2, 3, 4]
    assert warmup_sizes(12) == [1, 2, 3, 4, 5, 6, 7, 8, 12]
    assert warmup_sizes(32) == [1, 2, 3, 4, 5, 6, 7, 8, 16, 32]


def test_not_ready_answer_says_why(probe_dir):
    """A request before the model is ready (or while it shuts down) is told so, and when to retry."""
    app, recording = app_for(probe_dir)
    with TestClient(app) as c:
        app.state.serve.ready = False
        r = c.post("/classify", content=png(), headers={"Content-Type": "image/png", "X-Request-ID": "early-1"})
        app.state.serve.ready = True
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json() == {"error": "the model is not ready yet (warming up or shutting down)", "code": "not_ready",
                        "request_id": "early-1"}
    assert recording.calls == []


# ServeState.infer and deadline_of against a fixed clock: time.monotonic() as ganet.serve.app sees it is NOW.
NOW = 100.0


@pytest.fixture
def clock(monkeypatch):
    monkeypatch.setattr(serve_app, "time", SimpleNamespace(monotonic=lambda: NOW))


class StubBatcher:
    """Stands in for DynamicBatcher: records the timeout_s of every submit and answers the image back (or raises)."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error, self.timeouts = error, []

    async def submit(self, image: np.ndarray, timeout_s: float) -> np.ndarray:
        self.timeouts.append(timeout_s)
        if self.error is not None:
            raise self.error
        return image


def serve_state(batcher=None, timeout_ms: float = 1000) -> ServeState:
    settings = ServeSettings(model="unused", timeout_ms=timeout_ms, workers_decode=1)
    return ServeState(settings, Metrics(), batcher=batcher, ready=batcher is not None)


def infer_refusal(state: ServeState, deadline: float | None) -> ServeError:
    with pytest.raises(ServeError) as e:
        asyncio.run(state.infer([np.zeros((3, SIZE, SIZE), np.uint8)], deadline))
    return e.value


def test_infer_without_a_deadline_waits_timeout_ms(clock):
    """No deadline given: every image may wait the whole --timeout-ms in the batcher, in seconds."""
    for timeout_ms, seconds in ((1000, 1.0), (250, 0.25)):
        batcher = StubBatcher()
        first, second = np.zeros((3, SIZE, SIZE), np.uint8), np.ones((3, SIZE, SIZE), np.uint8)
        assert asyncio.run(serve_state(batcher, timeout_ms).infer([first, second])) == [first, second]
        assert batcher.timeouts == [seconds, seconds]


def test_infer_waits_what_is_left_of_the_deadline(clock):
    """An explicit deadline: the batcher gets deadline - now, not --timeout-ms, even when under a second is left."""
    for left in (0.25, 0.5):
        batcher = StubBatcher()
        image = np.zeros((3, SIZE, SIZE), np.uint8)
        assert asyncio.run(serve_state(batcher).infer([image], NOW + left)) == [image]
        assert batcher.timeouts == [left]


def test_infer_refuses_a_deadline_already_reached(clock):
    """A deadline at (or before) now is a 504 naming where it passed, and nothing is queued."""
    for deadline in (NOW, NOW - 1):
        batcher = StubBatcher()
        e = infer_refusal(serve_state(batcher), deadline)
        assert (e.status, e.code, e.headers) == (504, "deadline_exceeded", {})
        assert e.message == ("the request's deadline of 1000 ms (--timeout-ms) passed before inference (reading and "
                             "decoding took it all)")
        assert batcher.timeouts == []


def test_infer_queue_full_is_503_saying_why(clock):
    """The batcher's queue is full: 503 + Retry-After, with the batcher's reason in the message."""
    e = infer_refusal(serve_state(StubBatcher(QueueFullError("256 images already wait for inference"))), None)
    assert (e.status, e.code, e.headers) == (503, "queue_full", {"Retry-After": "1"})
    assert e.message == "server overloaded: 256 images already wait for inference; retry later"


def test_infer_deadline_passed_in_the_batcher_is_504_saying_why(clock):
    """The deadline passes while the image waits in the batcher: 504 naming --timeout-ms and the batcher's reason."""
    e = infer_refusal(serve_state(StubBatcher(DeadlineExceededError("deadline passed while queued"))), None)
    assert (e.status, e.code, e.headers) == (504, "deadline_exceeded", {})
    assert e.message == ("the request's deadline of 1000 ms (--timeout-ms) passed before inference finished: "
                         "deadline passed while queued")


def request_with(state: dict, timeout_ms: float = 1000) -> Request:
    """A request whose state is ``state`` (the middleware sets ``deadline`` there), of an app with --timeout-ms."""
    app = SimpleNamespace(state=SimpleNamespace(serve=serve_state(timeout_ms=timeout_ms)))
    return Request({"type": "http", "app": app, "state": state})


def test_deadline_of_is_the_one_set_when_the_request_arrived(clock):
    """The middleware's deadline is used as it is, not recomputed from now."""
    assert deadline_of(request_with({"deadline": 123.5})) == 123.5
    assert deadline_of(request_with({"deadline": NOW - 2})) == NOW - 2  # already passed: still that one


def test_deadline_of_defaults_to_timeout_ms_from_now(clock):
    """A request the middleware set no deadline on: --timeout-ms from now, in time.monotonic() seconds."""
    assert deadline_of(request_with({})) == NOW + 1.0
    assert deadline_of(request_with({}, timeout_ms=250)) == NOW + 0.25
