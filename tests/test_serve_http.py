"""ganet-serve as a real process (`ganet-serve EXPORT`, uvicorn on 127.0.0.1): the stock tritonclient.http client,
16 concurrent clients (batching happens and changes no answer), SIGTERM with requests in flight.

The export fixture is shared with test_serve.py (one `ganet-export` per session).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from ganet.preprocess import image_to_uint8
from ganet.serve.backends import load_backend
from ganet.serve import local
from ganet.serve.local import free_port, wait_ready
from test_serve import CIFAR10, encode, export_dir, photos, scores_by_index  # noqa: F401  (export_dir: fixture)

MODEL = "ga_shufflenet_v2_cifar"


def start_server(export: Path, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(["ganet-serve", str(export), "--port", str(port), *args],
                            env={**os.environ, "GANET_INTRA_OP_THREADS": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{url}/v2/health/ready", proc, timeout_s=60, interval_s=0.1)
    except RuntimeError as e:
        proc.kill()
        raise AssertionError(f"{e}:\n{proc.stdout.read()}") from None
    return proc, url


def stop(proc: subprocess.Popen) -> str:
    """Stop the server as ganet-demo and the benchmark do; its log."""
    local.stop(proc, grace_s=15)
    return proc.stdout.read()


# Every test of a live server runs against one process and against `--frontends 2` (HTTP in two processes, the
# model in a third): the same answers, limits, errors and drain.
MODES = {"one process": (), "2 front ends": ("--frontends", "2")}


@pytest.fixture(scope="module", params=list(MODES))
def server(request, export_dir):  # noqa: F811
    # max_delay_us from the environment: the GANET_ prefix path of the settings
    proc, url = start_server(export_dir, "--workers-decode", "2", *MODES[request.param],
                             env={"GANET_MAX_DELAY_US": "20000"})
    yield url
    log = stop(proc)
    assert proc.returncode in (0, -signal.SIGTERM), log[-3000:]  # uvicorn re-raises the signal it handled


@pytest.mark.slow
def test_tritonclient_http_unchanged(server, export_dir):  # noqa: F811
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    backend, spec = load_backend(export_dir, "onnxruntime", intra_op_threads=1)
    batch = np.stack([image_to_uint8(img, spec.preprocessing) for img in list(photos().values())[:4]])  # (4,3,32,32)
    want = backend(batch)
    client = httpclient.InferenceServerClient(url=server.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    assert client.get_server_metadata()["name"] == "ganet-serve"
    meta = client.get_model_metadata(MODEL)
    assert meta["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, 3, 32, 32]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]

    image = httpclient.InferInput("image", list(batch.shape), "UINT8")
    image.set_data_from_numpy(batch)  # binary tensor extension (the client's default)
    got = client.infer(MODEL, [image]).as_numpy("logits")
    assert got.dtype == np.float32 and got.shape == (4, 10)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)

    image.set_data_from_numpy(batch, binary_data=False)  # plain JSON both ways
    result = client.infer(MODEL, [image], outputs=[httpclient.InferRequestedOutput("logits", binary_data=False)],
                          request_id="r-7")
    np.testing.assert_allclose(result.as_numpy("logits"), want, rtol=0, atol=1e-5)
    assert result.get_response()["id"] == "r-7"

    pngs = np.array([encode(img, "PNG") for img in list(photos().values())[:4]], dtype=np.object_)  # (4,)
    encoded = httpclient.InferInput("image", [4], "BYTES")
    encoded.set_data_from_numpy(pngs)
    np.testing.assert_allclose(client.infer(MODEL, [encoded]).as_numpy("logits"), want, rtol=0, atol=1e-5)

    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        client.infer("nope", [image])
    bad = httpclient.InferInput("image", [1, 3, 8, 8], "UINT8")
    bad.set_data_from_numpy(np.zeros((1, 3, 8, 8), np.uint8))
    with pytest.raises(InferenceServerException, match="expected shape"):
        client.infer(MODEL, [bad])
    client.close()


@pytest.mark.slow
def test_concurrent_clients_are_batched_and_answers_unchanged(server):
    images = [encode(img, "PNG") for img in photos().values()]
    with httpx.Client(base_url=server) as c:
        alone = [scores_by_index(c.post("/classify?top_k=10", content=d, headers={"Content-Type": "image/png"})
                                 .json()) for d in images]
    results: list[tuple[int, int, dict]] = []
    errors: list[BaseException] = []

    def client_thread(t: int) -> None:
        try:
            with httpx.Client(base_url=server, timeout=30) as c:
                for i in range(4):
                    k = (t + i) % len(images)
                    r = c.post("/classify?top_k=10", content=images[k], headers={"Content-Type": "image/png"})
                    results.append((k, r.status_code, r.json()))
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=client_thread, args=(t,)) for t in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(results) == 64 and all(status == 200 for _, status, _ in results)
    for k, _, body in results:
        np.testing.assert_allclose(scores_by_index(body), alone[k], rtol=0, atol=1e-6)
    assert max(body["batch_size"] for _, _, body in results) > 1
    metrics = httpx.get(f"{server}/metrics").text
    count = float(next(l.split()[-1] for l in metrics.splitlines() if l.startswith("ganet_batch_size_count")))
    ones = float(next(l.split()[-1] for l in metrics.splitlines() if l.startswith('ganet_batch_size_bucket{le="1.0"}')))
    assert count > ones, "every backend call ran a single image: no batching happened"


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_api_key_limits_and_error_shapes_are_the_same_in_every_mode(export_dir, mode):  # noqa: F811
    from test_serve import assert_error, bad_inputs

    proc, url = start_server(export_dir, "--max-body-bytes", "200000", "--max-files", "2", "--max-pixels",
                             "20000000", *MODES[mode], env={"GANET_API_KEY": "s3cret"})
    key = {"Authorization": "Bearer s3cret"}
    png = encode(photos()["coffee"].resize((200, 150)), "PNG")  # under the body limit
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            r = c.post("/classify", content=png, headers={"Content-Type": "image/png"})
            assert_error(r, 401, "unauthorized", "Bearer")
            assert r.headers["www-authenticate"] == "Bearer"
            assert_error(c.post("/classify", content=png, headers={"Content-Type": "image/png",
                                                                    "Authorization": "Bearer nope"}), 401, "unauthorized")
            r = c.post("/classify", content=png, headers={"Content-Type": "image/png", **key, "X-Request-ID": "r-1"})
            assert r.status_code == 200 and r.headers["x-request-id"] == "r-1"
            assert c.get("/metrics").status_code == 200 and c.get("/v2/health/ready").status_code == 200  # open
            for name, body, content_type, status, code in bad_inputs():
                if len(body) <= 200_000:
                    headers = {"Content-Type": content_type} if content_type else {}
                    assert_error(c.post("/classify", content=body, headers={**headers, **key}), status, code)
            assert_error(c.post("/classify", content=b"x" * 300_000, headers={"Content-Type": "image/png", **key}),
                         413, "body_too_large", "200000")
            files = [("file", (f"{i}.png", png, "image/png")) for i in range(3)]
            assert_error(c.post("/classify", files=files, headers=key), 413, "too_many_files")
            assert_error(c.post("/classify?top_k=11", content=png, headers={"Content-Type": "image/png", **key}),
                         422, "validation_error")
            assert_error(c.post("/v2/models/nope/infer", json={"inputs": []}, headers=key), 404, "not_found")
    finally:
        log = stop(proc)
    assert proc.returncode in (0, -signal.SIGTERM), log[-3000:]


def _raw_post(port: int, body: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    head = (f"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    sock.sendall(head + body[: len(body) // 2])  # the request is in flight: half its body sent
    return sock


def _read_response(sock: socket.socket) -> tuple[int, dict]:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
        if b"\r\n\r\n" in data:
            head, _, rest = data.partition(b"\r\n\r\n")
            length = int(next(l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")))
            if len(rest) >= length:
                return int(head.split()[1]), json.loads(rest[:length])
    raise AssertionError(f"connection closed before a full response: {data[:200]!r}")


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_sigterm_finishes_in_flight_requests_then_exits_within_grace(export_dir, mode):  # noqa: F811
    proc, url = start_server(export_dir, "--grace-s", "3", *MODES[mode])
    children = descendants(proc.pid)  # front ends, the resource tracker
    port = int(url.rsplit(":", 1)[1])
    body = encode(photos()["chelsea"], "PNG")
    try:
        finishing = _raw_post(port, body)
        stalled = _raw_post(port, body)  # never completes: the grace period must cut it
        time.sleep(0.5)
        signaled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(OSError):  # no longer accepting
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        finishing.sendall(body[len(body) // 2:])
        status, answer = _read_response(finishing)
        assert status == 200 and answer["predictions"][0]["label"] in CIFAR10
        proc.wait(10)
        elapsed = time.monotonic() - signaled
        assert 2.5 <= elapsed <= 3 + 2.5, f"exited {elapsed:.1f} s after SIGTERM with --grace-s 3"
        stalled.close()
        finishing.close()
    finally:
        log = stop(proc)
    assert proc.returncode in (0, -signal.SIGTERM), log[-3000:]  # uvicorn re-raises the signal it handled
    assert '"event": "shutdown"' in log
    assert gone(children, timeout_s=5), "processes outlived the server"
    setups = [json.loads(line) for line in log.splitlines() if '"event": "frontends"' in line]
    assert len(setups) == (mode != "one process")
    for setup in setups:  # nothing left in /dev/shm or in the metrics directory
        assert not Path("/dev/shm", setup["shm"]).exists() and not Path(setup["metrics_dir"]).exists()


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc: no psutil here)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            pass
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for whoever reaps in this container, not for us)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except (OSError, IndexError):
        return False


def gone(pids: set[int], timeout_s: float = 10) -> bool:
    deadline = time.monotonic() + timeout_s
    while any(running(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True
