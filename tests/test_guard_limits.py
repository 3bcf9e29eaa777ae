"""The service's limits on the pixel probe (tests/probe_export.py): the body-size limit with and without
Content-Length, request ids in and out, per-route metrics, not-ready, overload and deadline answers, warm-up sizes
and the CPU defaults of load_backends."""
from __future__ import annotations

import asyncio
import io
import re

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ganet.serve.app import create_app, load_backends, warmup_sizes
from ganet.serve.backends import load_backend
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
