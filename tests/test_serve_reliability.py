"""ganet-serve as an attacker and a careless client would use it, against a real process on 127.0.0.1: the bounded
CI form of the reliability suite (`pytest -m reliability`; `python benchmarks/reliability.py` runs the long form
and writes the report). Every check is on status classes, memory and time, never on one message's wording.

The server runs with RLIMIT_NOFILE 512, a 3 s deadline and a 768 MiB decode budget, on the session's CIFAR export.
"""
from __future__ import annotations

import json

import httpx
import pytest

import hostile
import reliability_scenarios as rs
from test_serve import export_dir  # noqa: F401  (the session's export)

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

DEADLINE_S, BUDGET, HEADER_TIMEOUT_S = 3.0, 768 * 2**20, 2.0
ARGS = ("--timeout-ms", str(int(DEADLINE_S * 1e3)), "--max-decode-bytes", str(BUDGET), "--max-pixels", "60000000",
        "--header-timeout-s", str(HEADER_TIMEOUT_S), "--keep-alive-s", "2", "--workers-decode", "2",
        "--max-files", "16")


@pytest.fixture(scope="module")
def server(export_dir):  # noqa: F811
    srv = rs.start_server(export_dir, *ARGS, nofile=512)
    yield srv
    srv.stop()


def test_start_up_lines_print_once_and_integrity_is_checked(server):
    log = server.log_text()
    for event in ("backend", "graph", "integrity", "listening"):
        assert log.count(f'"event": "{event}"') == 1, (event, log[:3000])
    integrity = json.loads(next(line for line in log.splitlines() if '"event": "integrity"' in line))
    assert integrity["checked"] and set(integrity["files"]) == {"model.onnx", "model.fused.onnx"}
    assert integrity["ms"] < 2000  # milliseconds in practice; generous for a loaded CI host


def test_schemathesis_every_check(server, tmp_path):
    """One seed, a bounded number of examples per operation, every check: no 5xx, no conformance failure (model
    names are schemathesis's own here: the routes' 404s are in the schema)."""
    result = rs.schemathesis(server.url, seed=1, max_examples=12, model_name=False, workdir=tmp_path,
                             max_time_s=120)
    assert result["returncode"] == 0, result["tail"]


def test_schemathesis_reaching_the_model(server, tmp_path):
    """The same with the served model's name, so that requests reach decoding and tensor parsing: still no 5xx and
    no conformance failure (bodies that are schema-valid but not images are refused 4xx, by design)."""
    result = rs.schemathesis(server.url, seed=2, max_examples=12, model_name=True, workdir=tmp_path, max_time_s=120)
    assert result["returncode"] == 0, result["tail"]


def test_fuzzed_images_never_5xx_and_rss_stays_bounded(server):
    result = rs.fuzz(server, n=330, seed=0)
    assert result["fivexx"] == 0 and result["outcome"]["hung"] == 0, result
    assert not result["outcome"]["connection_errors"], result
    assert result["rss_peak_mb"] <= result["rss_before_mb"] + BUDGET / 2**20, result
    assert len(hostile.fuzz_corpus(330)) >= 300 and {n.split(":")[0].split(".")[1] for n, _ in
                                                      hostile.fuzz_corpus(330)} >= {"jpeg", "png", "gif", "tiff",
                                                                                    "webp", "bmp"}


def test_crafted_bombs_stay_inside_the_budget_and_memory_comes_back(server):
    result = rs.crafted(server, BUDGET)
    statuses = {c["case"]: (c["status"], c["code"]) for c in result["cases"]}
    assert result["fivexx"] == 0, result
    assert statuses["png 16-bit grey 1x50000000"] == (413, "decode_budget_exceeded")
    assert statuses["png 100000x100000 header"] == (413, "image_too_large")
    assert statuses["png 16-bit grey 7000x7000 (zeros)"][0] == 200  # within the budget: decoded, no float64 copy
    assert result["peak_concurrent_over_baseline_mb"] <= BUDGET / 2**20, result
    assert result["worst_single_peak_over_baseline_mb"] <= BUDGET / 2**20, result
    assert result["after_over_baseline_mb"] <= 0.1 * result["baseline_mb"], result  # given back (malloc_trim)


def test_big_v2_bodies_do_not_stall_the_loop(server):
    """20 MB of empty BYTES elements is refused before it is unpacked; a 16-image JSON body parses on a thread."""
    body, headers = hostile.v2_empty_elements(19 * 2**20)
    empty = rs.stall_probe(server, body, headers)
    assert empty["status_of_big"] == 400, empty
    body, headers = hostile.v2_json_pixels(16, 32)
    parsed = rs.stall_probe(server, body * 1, headers)
    assert parsed["status_of_big"] == 200, parsed
    assert max(empty["max_ms"], parsed["max_ms"]) < 500, (empty, parsed)


def test_flood_at_twice_capacity_gets_only_defined_answers(server):
    cap = rs.capacity(server, seconds=3)
    result = rs.flood(server, rate=2 * cap["images_per_s"], seconds=4, deadline_s=DEADLINE_S)
    out = result["outcome"]
    assert not result["unexpected"] and out["hung"] == 0 and not out["connection_errors"], result
    assert out["retry_after_missing"] == 0 and out["statuses"].get("200", 0) > 0, result
    # work for requests already answered (504, or the client gone) is dropped before inference
    assert result["inferred_for_answered"] <= max(3, 0.02 * out["requests"]), result


def test_normal_requests_keep_their_deadline_beside_an_adversarial_flood(server):
    result = rs.adversarial(server, seconds=8, deadline_s=DEADLINE_S, normal_rate=10, max_files=16, input_size=32)
    assert result["fivexx"] == 0 and result["normal_past_deadline"] == 0, result
    normal = result["normal"]["statuses"]
    assert normal.get("200", 0) >= 0.8 * sum(normal.values()), result
    assert rs.metric(server.url, 'ganet_requests_total{route="/classify",status="499"}') >= 1
    assert "Traceback" not in server.log_text()


def test_idle_and_slow_connections_are_closed_and_do_not_block(server):
    """600 idle sockets under RLIMIT_NOFILE 512 (the server caps itself below it and evicts the idlest), a
    slowloris and a stalled body: a real request answers at once, all are closed within the timeouts."""
    result = rs.slow_and_idle(server, idle=600, header_timeout_s=HEADER_TIMEOUT_S)
    assert result["real_request_status"] == 200 and result["real_request_ms"] < 2000, result
    assert result["idle_closed"] == 600, result
    assert result["slowloris_answer"].startswith("HTTP/1.1 408"), result


def test_sigterm_under_load_answers_everything_in_flight(export_dir):  # noqa: F811
    result = rs.sigterm_under_load(export_dir, clients=16, grace_s=5.0)
    out = result["outcome"]
    assert out["statuses"].get("200", 0) > 0 and out["hung"] == 0, result
    assert set(out["statuses"]) <= {"200"}, result  # in-flight requests finish; later ones cannot connect
    assert result["exit_after_sigterm_s"] <= 5.0 + 2.0 and result["shutdown_logged"], result
    assert result["tracebacks"] == 0, result


def test_a_tampered_or_mismatched_model_never_answers(export_dir, tmp_path):  # noqa: F811
    for case in rs.integrity_cases(export_dir, tmp_path):
        assert case["ok"], case


def test_disconnect_mid_body_is_499_without_a_traceback(server):
    import socket
    import time

    before = rs.metric(server.url, 'ganet_requests_total{route="/classify",status="499"}')
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
              + b"\x89PNG" * 100)
    time.sleep(0.2)
    s.close()
    time.sleep(0.3)
    assert rs.metric(server.url, 'ganet_requests_total{route="/classify",status="499"}') == before + 1
    assert rs.metric(server.url, 'ganet_requests_total{route="/classify",status="500"}') == 0
    assert "Traceback" not in server.log_text()
    with httpx.Client(base_url=server.url) as c:
        assert c.get("/v2/health/ready").status_code == 200


def test_early_answers_reach_the_client_before_the_body_is_read(server):
    """A 413 on Content-Length and a 415 are sent before the body is read; the connection lingers (half-closed,
    the rest dropped) instead of resetting, so the client reads the answer, and the next request works."""
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for _ in range(2):
            r = c.post("/classify", content=b"\x00" * (21 * 2**20), headers={"Content-Type": "image/png"})
            assert r.status_code == 413 and r.json()["code"] == "body_too_large"
            assert r.headers["connection"] == "close"
            r = c.post("/classify", content=b"x" * 5_000_000, headers={"Content-Type": "text/plain"})
            assert r.status_code == 415 and r.json()["code"] == "unsupported_media_type"
            path, body, headers = rs.normal_request()
            assert c.post(path, content=body, headers=headers).status_code == 200


def test_past_the_connection_cap_the_idlest_goes_and_a_fresh_keep_alive_stays(export_dir):  # noqa: F811
    """--max-connections 2. A socket that never sent a request is evicted for a newcomer; a kept-alive connection
    that answered under a second ago is spared (its client may be sending on it now), so the newcomer gets 503 +
    Retry-After; once that connection has been quiet for the grace period, it is the one evicted."""
    import socket
    import time

    from ganet.serve.connections import EVICT_GRACE_S

    srv = rs.start_server(export_dir, "--max-connections", "2", "--keep-alive-s", "30", "--header-timeout-s", "30")
    get = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"

    def connect() -> socket.socket:
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        time.sleep(0.1)  # the server has accepted it (or answered it) before the next step
        return s

    def ask(s: socket.socket) -> bytes:
        """One keep-alive GET, read to the end of its body."""
        s.sendall(get)
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + int(
                data.lower().split(b"content-length: ")[1].split(b"\r\n")[0]):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data

    try:
        time.sleep(0.5)  # the readiness probe's connection is gone
        kept = connect()
        assert ask(kept).startswith(b"HTTP/1.1 200")
        silent = connect()  # never sends a byte
        newcomer = connect()  # third: the silent one is evicted, not the one that just answered
        assert silent.recv(100) == b"" and ask(newcomer).startswith(b"HTTP/1.1 200")
        refused = connect()  # both open connections answered moments ago: no one to evict
        answer = refused.recv(65536)
        assert answer.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in answer.lower(), answer
        assert b'"too_many_connections"' in answer and ask(kept).startswith(b"HTTP/1.1 200")
        time.sleep(EVICT_GRACE_S + 0.2)
        newcomer.close()
        time.sleep(0.1)
        late = connect()
        assert ask(late).startswith(b"HTTP/1.1 200")
        last = connect()  # `kept` has been quiet past the grace; `late` answered just now
        assert kept.recv(100) == b"" and ask(last).startswith(b"HTTP/1.1 200")
        for s in (kept, silent, refused, late, last):
            s.close()
    finally:
        srv.stop()
