"""Running an HTTP server as a local process: a free port to give it, waiting until it answers ready, stopping it.

Used by ``ganet-demo``, the serving benchmark and the HTTP tests (``docker/smoke_test.py`` keeps its own: it runs
on hosts without ganet installed). Standard library only.
"""
from __future__ import annotations

import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

__all__ = ["free_port", "wait_ready", "stop"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 180, interval_s: float = 0.2) -> None:
    """Poll ``GET url`` until it answers 200. RuntimeError if ``proc`` exits first or ``timeout_s`` passes (the
    process is left running then: the caller owns it and its log)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with status {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):  # not listening yet, or 503 while warming up
            pass
        time.sleep(interval_s)
    raise RuntimeError(f"{url}: not ready after {timeout_s:g} s")


def stop(proc: subprocess.Popen, grace_s: float = 20) -> int:
    """SIGTERM (the service drains its in-flight requests, then exits), SIGKILL after ``grace_s``; the exit status.
    uvicorn re-raises the signal it handled, so a clean stop is 0 or -SIGTERM."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
