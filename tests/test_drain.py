"""--drain-delay-s: the first SIGTERM turns /v2/health/ready to 503 while inference goes on, then uvicorn drains.

A real ganet-serve process on the tiny export of tests/test_engine_cache.py (ONNX Runtime), signalled for real.
"""
from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.request

import numpy as np

from ganet.serve.local import free_port, wait_ready

from test_engine_cache import SIZE, make_tiny_export


def _status(url: str, body: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_readiness_turns_503_first_and_requests_are_still_served(tmp_path):
    export = make_tiny_export(tmp_path)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(["ganet-serve", str(export), "--port", str(port), "--drain-delay-s", "2", "--no-warmup"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    pixels = np.zeros((1, 3, SIZE, SIZE), np.uint8)
    body = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": list(pixels.shape),
                                   "data": pixels.ravel().tolist()}]}).encode()
    try:
        wait_ready(f"{base}/v2/health/ready", proc, timeout_s=60)
        assert _status(f"{base}/v2/models/tiny/infer", body) == 200
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert _status(f"{base}/v2/health/ready") == 503  # out of the load balancer's rotation at once
        assert _status(f"{base}/v2/health/live") == 200
        assert _status(f"{base}/v2/models/tiny/infer", body) == 200  # and still serving
        code = proc.wait(20)
        took = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stderr.read()
    assert code in (0, -signal.SIGTERM), log[-2000:]
    assert 2.0 <= took < 10, took  # the delay, then uvicorn's own (quick) drain
    assert '"event": "draining"' in log and '"delay_s": 2.0' in log
