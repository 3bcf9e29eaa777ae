"""The API key, against a live ``ganet-serve --api-key`` on 127.0.0.1: only ``Bearer <the exact key>`` gets in.

Every near miss (prefixes, suffixes, the key with more around it, an empty or missing token, other schemes, the key
sent as Basic credentials, case changes of the key) is a 401 with ``WWW-Authenticate: Bearer`` on every inference
route, and runs no inference. The key appears in no response and in no line of the server's log, even at debug
level; the comparison is hmac.compare_digest (constant time). The model is the pixel probe (tests/probe_export.py):
a real export that starts in a second.
"""
from __future__ import annotations

import base64
import hmac
import io
import json
import re
import secrets
import socket
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ganet.serve import local
from ganet.serve.app import create_app
from ganet.serve.backends import load_backend
from ganet.serve.settings import ServeSettings
from probe_export import NAME, SIZE, make_probe_export

KEY = "gk-" + secrets.token_urlsafe(24)  # never a coincidence in a log line
INFER_ROUTES = ("/classify", f"/v2/models/{NAME}/infer", f"/v2/models/{NAME}/versions/1/infer")


def png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(3 * SIZE * SIZE, dtype=np.uint8).reshape(SIZE, SIZE, 3)).save(buf, "PNG")
    return buf.getvalue()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# Authorization header values that must not get in (None: no header at all).
REFUSED = {
    "no header": None,
    "empty header": "",
    "bare Bearer": "Bearer",
    "Bearer and a space": "Bearer ",
    "Bearer and spaces": "Bearer    ",
    "first character": f"Bearer {KEY[:1]}",
    "prefix": f"Bearer {KEY[:3]}",
    "all but the last character": f"Bearer {KEY[:-1]}",
    "suffix": f"Bearer {KEY[1:]}",
    "last character": f"Bearer {KEY[-1]}",
    "key and more": f"Bearer {KEY}x",
    "more and key": f"Bearer x{KEY}",
    "key twice": f"Bearer {KEY}{KEY}",
    "key, space, key": f"Bearer {KEY} {KEY}",
    "key split by a space": f"Bearer {KEY[:6]} {KEY[6:]}",
    "upper-case key": f"Bearer {KEY.upper()}",
    "swapped-case key": f"Bearer {KEY.swapcase()}",
    "wrong key of the same length": f"Bearer {'x' * len(KEY)}",
    "key without a scheme": KEY,
    "scheme glued to the key": f"Bearer{KEY}",
    "colon after the scheme": f"Bearer: {KEY}",
    "Basic with the key": f"Basic {KEY}",
    "Basic key as user": f"Basic {b64(KEY + ':')}",
    "Basic key as password": f"Basic {b64('user:' + KEY)}",
    "Basic key base64": f"Basic {b64(KEY)}",
    "Token scheme": f"Token {KEY}",
    "Digest scheme": f"Digest {KEY}",
    "ApiKey scheme": f"ApiKey {KEY}",
    "Bearers scheme": f"Bearers {KEY}",
    "key in base64": f"Bearer {b64(KEY)}",
}
# The scheme is case-insensitive (RFC 7235 section 2.1); the key is not.
ACCEPTED = {"Bearer": f"Bearer {KEY}", "lower-case scheme": f"bearer {KEY}", "upper-case scheme": f"BEARER {KEY}"}


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory) -> Path:
    return make_probe_export(tmp_path_factory.mktemp("auth") / "probe")


@pytest.fixture(scope="module")
def server(probe_dir, tmp_path_factory):
    """``ganet-serve PROBE --api-key KEY --log-level debug``; yields (url, path of its log once stopped)."""
    log_path = tmp_path_factory.mktemp("auth-log") / "server.log"
    port = local.free_port()
    with log_path.open("w") as log:
        proc = subprocess.Popen(["ganet-serve", str(probe_dir), "--port", str(port), "--api-key", KEY,
                                 "--log-level", "debug", "--intra-op-threads", "1", "--workers-decode", "1"],
                                stdout=log, stderr=subprocess.STDOUT, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            local.wait_ready(f"{url}/v2/health/ready", proc, timeout_s=60, interval_s=0.1)
            yield url, log_path
        finally:
            local.stop(proc, grace_s=15)


def request_body(route: str) -> tuple[bytes, str]:
    if route == "/classify":
        return png(), "image/png"
    tensor = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(png()).decode()]}
    return json.dumps({"inputs": [tensor]}).encode(), "application/json"


def post(client: httpx.Client | TestClient, route: str, authorization: str | None) -> httpx.Response:
    body, content_type = request_body(route)
    headers = {} if authorization is None else {"Authorization": authorization}
    return client.post(route, content=body, headers={"Content-Type": content_type, **headers})


def raw_post(url: str, route: str, authorization: str | None) -> tuple[int, dict[str, str], dict]:
    """POST over a plain socket, the Authorization line byte for byte as given (httpx refuses trailing blanks):
    (status, headers, JSON body)."""
    host, port = url.removeprefix("http://").split(":")
    body, content_type = request_body(route)
    head = [f"POST {route} HTTP/1.1", f"Host: {host}", f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}", "Connection: close"]
    if authorization is not None:
        head.append(f"Authorization: {authorization}")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        response = b"".join(iter(lambda: s.recv(65536), b""))
    header_block, _, payload = response.partition(b"\r\n\r\n")
    status_line, *lines = header_block.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, json.loads(payload or b"{}")


def images_run(client: httpx.Client) -> float:
    """Images the service has sent to its model so far (its Prometheus counter)."""
    match = re.search(r"^ganet_images_total (\S+)$", client.get("/metrics").text, re.M)
    assert match, "ganet_images_total missing from /metrics"
    return float(match.group(1))


def assert_refused(response: httpx.Response | tuple[int, dict[str, str], dict], why: str) -> None:
    if not isinstance(response, tuple):  # an httpx (or TestClient's httpx2) response
        response = (response.status_code, response.headers, response.json())
    status, headers, body = response
    assert status == 401, (why, status, body)
    assert body.get("code") == "unauthorized", (why, body)
    assert headers.get("www-authenticate") == "Bearer", why


def test_near_misses_are_refused_on_every_inference_route_and_run_nothing(server):
    url, _ = server
    with httpx.Client(base_url=url, timeout=30) as c:
        before = images_run(c)
        for route in INFER_ROUTES:
            for why, value in REFUSED.items():
                assert_refused(raw_post(url, route, value), f"{route}: {why}")
        assert images_run(c) == before  # a refused request never reaches the model
        for route in INFER_ROUTES:
            for why, value in ACCEPTED.items():
                r = post(c, route, value)
                assert r.status_code == 200, (route, why, r.text)
        assert images_run(c) == before + len(INFER_ROUTES) * len(ACCEPTED)


def test_the_key_appears_in_no_response_and_no_log_line(server):
    url, log_path = server
    wrong = "Bearer not-the-key-" + secrets.token_hex(8)
    responses = []
    with httpx.Client(base_url=url, timeout=30) as c:
        for route in INFER_ROUTES:
            responses += [post(c, route, f"Bearer {KEY}"), post(c, route, wrong), post(c, route, f"Basic {KEY}")]
        for route in ("/", "/metrics", "/openapi.json", "/docs", "/v2", f"/v2/models/{NAME}", "/v2/health/ready",
                      "/nope"):
            responses.append(c.get(route, headers={"Authorization": f"Bearer {KEY}"}))
    for r in responses:
        assert r.status_code in (200, 401, 404), (r.request.url, r.status_code)
        seen = r.text + "".join(f"{k}: {v}\n" for k, v in r.headers.items())
        assert KEY not in seen and b64(KEY) not in seen, r.request.url
    log = log_path.read_text()
    assert '"event": "access"' in log  # the log was written (debug level), so its silence about the key means something
    assert KEY not in log and b64(KEY) not in log
    assert wrong.split()[1] not in log  # nor what a client sent as a key


def test_the_comparison_is_constant_time(probe_dir, monkeypatch):
    """Every presented token goes through hmac.compare_digest; its answer decides (an `==` would leak timing)."""
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    backend, spec = load_backend(probe_dir, "onnxruntime", intra_op_threads=1)
    app = create_app(ServeSettings(model=probe_dir, api_key=KEY, warmup=False, workers_decode=1), backends=[backend],
                     spec=spec)
    with TestClient(app) as c:
        assert post(c, "/classify", f"Bearer {KEY}").status_code == 200
        assert_refused(post(c, "/classify", f"Bearer {KEY[:-1]}"), "prefix")
    assert [sorted((bytes(a), bytes(b))) for a, b in calls] == [sorted((KEY.encode(), KEY.encode())),
                                                                sorted((KEY[:-1].encode(), KEY.encode()))]


def test_a_refused_client_is_told_how_to_send_the_key(probe_dir):
    """The 401 body names the header to send; WWW-Authenticate: Bearer; the request id is kept."""
    backend, spec = load_backend(probe_dir, "onnxruntime", intra_op_threads=1)
    app = create_app(ServeSettings(model=probe_dir, api_key=KEY, warmup=False, workers_decode=1), backends=[backend],
                     spec=spec)
    with TestClient(app) as c:
        for i, authorization in enumerate((None, f"Bearer {KEY[:-1]}")):
            extra = {} if authorization is None else {"Authorization": authorization}
            r = c.post("/classify", content=png(),
                       headers={"Content-Type": "image/png", "X-Request-ID": f"refused-{i}", **extra})
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", authorization
            assert r.json() == {"error": "missing or wrong API key: send `Authorization: Bearer <key>`",
                                "code": "unauthorized", "request_id": f"refused-{i}"}, authorization


def test_without_a_key_inference_is_open_and_an_empty_key_is_refused(probe_dir):
    backend, spec = load_backend(probe_dir, "onnxruntime", intra_op_threads=1)
    app = create_app(ServeSettings(model=probe_dir, warmup=False, workers_decode=1), backends=[backend], spec=spec)
    with TestClient(app) as c:
        for route in INFER_ROUTES:
            assert post(c, route, None).status_code == 200, route
    # An empty key (GANET_API_KEY= left blank in a deployment) would let a bare "Bearer" in: refused at start.
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="api_key"):
        ServeSettings(model=probe_dir, api_key="")
    result = subprocess.run(["ganet-serve", str(probe_dir), "--api-key", ""], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "--api-key" in result.stderr and "Traceback" not in result.stderr
