"""The reliability scenarios against a live ganet-serve process, each sized by its arguments: the bounded CI form
(tests/test_serve_reliability.py asserts on what they return) and the long form (benchmarks/reliability.py reports
it). Every loop is bounded in count and time; all traffic goes to 127.0.0.1.
"""
from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

import hostile
import real_images
from ganet.serve.local import free_port, wait_ready
from ganet.serve.local import stop as stop_process

MODEL = "ga_shufflenet_v2_cifar"


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, grace_s: float = 20) -> int:
        return stop_process(self.proc, grace_s)


def start_server(export: Path, *args: str, nofile: int | None = None, log_dir: Path | None = None) -> Server:
    """``ganet-serve EXPORT`` on a free port, its log in a file (a pipe would fill and block it under load);
    ``nofile``: its RLIMIT_NOFILE."""
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="ganet-serve-", suffix=".log", dir=log_dir)[1])

    def limits() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    proc = subprocess.Popen(["ganet-serve", str(export), "--port", str(port), *args],
                            env={**os.environ, "GANET_INTRA_OP_THREADS": "1"}, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, preexec_fn=limits)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{url}/v2/health/ready", proc, timeout_s=120, interval_s=0.1)
    except RuntimeError as e:
        proc.kill()
        raise AssertionError(f"{e}:\n{log.read_text()[-3000:]}") from None
    return Server(proc, url, log)


def metric(url: str, prefix: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


# --- schemathesis -----------------------------------------------------------------------------------------------

def schemathesis(url: str, seed: int, max_examples: int, model_name: bool, workdir: Path,
                 max_time_s: int = 600) -> dict:
    """schemathesis (its CLI, every check) against the live schema. ``model_name``: requests name the served model,
    so they reach decoding and tensor parsing. A body the schema calls valid (any bytes as ``image/*``, any tensor
    of the declared shape) need not decode as an image or hold consistent tensors, which a JSON Schema cannot say:
    400, 413 and 415 count as accepted for positive data (``positive_data_acceptance``'s expected statuses, which
    otherwise already include 401, 404, 409, 429); every other check, the conformance ones included, is stock."""
    config = workdir / f"schemathesis_{seed}_{int(model_name)}.toml"
    lines = ["[checks.positive_data_acceptance]",
             'expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "409", "413", "415", "429"]', ""]
    if model_name:
        lines += ["[parameters]", f'"path.name" = "{MODEL}"', '"path.version" = "1"']
    config.write_text("\n".join(lines) + "\n")
    report = workdir / f"schemathesis_{seed}_{int(model_name)}.json"
    cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", f"{url}/openapi.json",
           "--checks", "all", "--max-examples", str(max_examples), "--seed", str(seed), "--no-color",
           "--workers", "1", "--request-timeout", "20", "--phases", "examples,coverage,fuzzing",
           "--report", "ndjson", "--report-ndjson-path", str(report)]
    start = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=max_time_s + 120, cwd=workdir)  # its cache
    out = result.stdout + result.stderr
    summary = next((line.strip("= ") for line in reversed(out.splitlines()) if " in " in line and "=" in line), "")
    generated = next((line.strip() for line in out.splitlines() if "generated" in line), "")
    return {"seed": seed, "model_name": model_name, "returncode": result.returncode, "summary": summary,
            "test_cases": generated, "seconds": round(time.monotonic() - start, 1),
            "server_errors": out.count("Server error"),
            "tail": out[out.find("FAILURES"):][:4000] if result.returncode else ""}


# --- images -------------------------------------------------------------------------------------------------------

def fuzz(server: Server, n: int, seed: int, concurrency: int = 8) -> dict:
    """``n`` fuzzed images to /classify (raw bodies and multipart, both) and the first 10% of them as v2 BYTES;
    statuses, and the server's RSS before, at its peak and after."""
    corpus = hostile.fuzz_corpus(n, seed)
    rss0, _ = hostile.rss_bytes(server.proc.pid)
    hostile.reset_peak_rss(server.proc.pid)

    def request(i: int) -> tuple[str, bytes, dict]:
        name, data = corpus[i % n]
        if i >= n:  # the v2 BYTES path for the extra tenth
            body, headers = hostile.v2_binary([data])
            return f"/v2/models/{MODEL}/infer", body, headers
        if i % 3 == 0:
            body, headers = hostile.multipart([(name, data)])
            return "/classify", body, headers
        return "/classify", data, {"Content-Type": "image/" + name.split(".")[1].split(":")[0]}

    total = n + n // 10
    out = asyncio.run(_run_list(server.url, [request(i) for i in range(total)], concurrency, timeout_s=60))
    rss1, peak = hostile.rss_bytes(server.proc.pid)
    return {"requests": total, "outcome": out.summary(), "fivexx": out.fivexx(), "rss_before_mb": rss0 / 2**20,
            "rss_peak_mb": peak / 2**20, "rss_after_mb": rss1 / 2**20}


async def _run_list(url: str, requests: list[tuple[str, bytes, dict]], concurrency: int,
                    timeout_s: float) -> hostile.Outcome:
    out = hostile.Outcome()
    queue = list(reversed(requests))
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s + 5) as client:
        async def worker() -> None:
            while queue:
                path, body, headers = queue.pop()
                await hostile.send(client, "POST", path, body, headers, out, timeout_s)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


def crafted(server: Server, budget_bytes: int, repeat: int = 1) -> dict:
    """Each crafted bomb alone, then all at once ``repeat`` times: statuses, peak RSS against baseline + budget, and
    RSS after (memory given back)."""
    pid = server.proc.pid
    baseline, _ = hostile.rss_bytes(pid)
    cases = []
    with httpx.Client(base_url=server.url, timeout=120) as c:
        for name, data in hostile.crafted():
            hostile.reset_peak_rss(pid)
            start = time.perf_counter()
            r = c.post("/classify", content=data, headers={"Content-Type": "image/png"})
            rss, peak = hostile.rss_bytes(pid)
            cases.append({"case": name, "bytes": len(data), "status": r.status_code,
                          "code": r.json().get("code") if r.status_code != 200 else None,
                          "ms": round((time.perf_counter() - start) * 1e3, 1),
                          "peak_over_baseline_mb": round((peak - baseline) / 2**20, 1),
                          "after_over_baseline_mb": round((rss - baseline) / 2**20, 1)})
    hostile.reset_peak_rss(pid)
    together = [("/classify", data, {"Content-Type": "image/png"}) for _ in range(repeat)
                for _, data in hostile.crafted()]
    out = asyncio.run(_run_list(server.url, together, concurrency=8, timeout_s=120))
    time.sleep(0.5)
    rss, peak = hostile.rss_bytes(pid)
    return {"baseline_mb": round(baseline / 2**20, 1), "budget_mb": budget_bytes / 2**20, "cases": cases,
            "concurrent": out.summary(),  # 504: a bomb that waited for the budget past its deadline
            "fivexx": out.fivexx(allowed=(503, 504)) + sum(c["status"] >= 500 for c in cases),
            "peak_concurrent_over_baseline_mb": round((peak - baseline) / 2**20, 1),
            "after_over_baseline_mb": round((rss - baseline) / 2**20, 1),
            "worst_single_peak_over_baseline_mb": max(c["peak_over_baseline_mb"] for c in cases)}


# --- load ---------------------------------------------------------------------------------------------------------

def normal_request() -> tuple[str, bytes, dict]:
    data = _normal_jpeg()
    return "/classify", data, {"Content-Type": "image/jpeg"}


_JPEG: list[bytes] = []


def _normal_jpeg() -> bytes:
    if not _JPEG:
        _JPEG.append(real_images.jpeg(real_images.photos("china")["china"]))  # 640x427, what a client sends
    return _JPEG[0]


def capacity(server: Server, seconds: float, clients: int = 8) -> dict:
    out = asyncio.run(hostile.closed_loop(server.url, lambda i: normal_request(), clients, seconds, timeout_s=30))
    ok = out.statuses.get(200, 0)
    return {"images_per_s": round(ok / seconds, 1), "outcome": out.summary()}


def flood(server: Server, rate: float, seconds: float, deadline_s: float) -> dict:
    """Open-loop arrivals at ``rate``/s: each must get 200, 503 + Retry-After, or 504, and none may hang (no answer
    within the deadline + 10 s). The client's latency includes time the server never sees (the load generator
    shares the cores, the kernel's accept queue), so the server's own view is reported too: its requests over the
    deadline, from ganet_request_seconds."""
    images_before = metric(server.url, "ganet_images_total")
    within_before = metric(server.url, f'ganet_request_seconds_bucket{{le="{_bucket(deadline_s)}",route="/classify"}}')
    count_before = metric(server.url, 'ganet_request_seconds_count{route="/classify"}')
    out = asyncio.run(hostile.open_loop(server.url, lambda i: normal_request(), rate, seconds,
                                        timeout_s=deadline_s + 10, connections=1024))
    inferred = metric(server.url, "ganet_images_total") - images_before
    server_late = ((metric(server.url, 'ganet_request_seconds_count{route="/classify"}') - count_before)
                   - (metric(server.url, f'ganet_request_seconds_bucket{{le="{_bucket(deadline_s)}",'
                                         f'route="/classify"}}') - within_before))
    unexpected = {s: n for s, n in out.statuses.items() if s not in (200, 503, 504)}
    # every request holds one image: images inferred beyond the 200s were inferred for requests already answered
    return {"rate": rate, "seconds": seconds, "outcome": out.summary(), "unexpected": unexpected,
            "images_inferred": int(inferred), "inferred_for_answered": int(inferred - out.statuses.get(200, 0)),
            "client_past_deadline": sum(1 for t in out.latencies if t > deadline_s),
            "server_past_deadline_bucket": int(server_late), "deadline_bucket_s": _bucket(deadline_s)}


def _bucket(seconds: float) -> str:
    """The smallest ganet_request_seconds bucket at or above ``seconds`` (its label)."""
    from ganet.serve.metrics import _LATENCY

    return str(float(next((b for b in _LATENCY if b >= seconds), _LATENCY[-1])))


def adversarial(server: Server, seconds: float, deadline_s: float, normal_rate: float, max_files: int,
                input_size: int) -> dict:
    """Worst-case requests from 6 adversaries (20 MB of empty BYTES elements, a max-size JSON pixel request,
    16-bit 7000x7000 PNGs alone and as a 16-part multipart, a budget-busting 1x50,000,000 PNG, mid-body
    disconnects) beside normal traffic at ``normal_rate``/s: the normal requests' statuses and latencies."""
    bomb16 = hostile.png_of_zeros(7000, 7000, 16, 0)
    tall = hostile.png_of_zeros(1, 50_000_000, 16, 0)
    empty_elements = hostile.v2_empty_elements(19 * 2**20)
    json_pixels = hostile.v2_json_pixels(max_files, input_size)
    many = hostile.multipart([(f"b{i}.png", bomb16) for i in range(16)])
    adversaries = [("/v2/models/%s/infer" % MODEL, *empty_elements), ("/v2/models/%s/infer" % MODEL, *json_pixels),
                   ("/classify", bomb16, {"Content-Type": "image/png"}), ("/classify", *many),
                   ("/classify", tall, {"Content-Type": "image/png"})]

    async def run() -> tuple[hostile.Outcome, hostile.Outcome, int]:
        adv_out, stop = hostile.Outcome(), time.monotonic() + seconds
        disconnects = 0

        async def adversary(k: int) -> None:
            async with httpx.AsyncClient(base_url=server.url, timeout=deadline_s + 30) as client:
                while time.monotonic() < stop:
                    path, body, headers = adversaries[k % len(adversaries)]
                    await hostile.send(client, "POST", path, body, headers, adv_out, deadline_s + 30)

        async def disconnecter() -> None:
            nonlocal disconnects
            while time.monotonic() < stop:
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                             b"Content-Length: 9000000\r\n\r\n" + bomb16[:50_000])
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.close()
                disconnects += 1
                await asyncio.sleep(0.2)

        tasks = [asyncio.ensure_future(adversary(k)) for k in range(len(adversaries))]
        tasks.append(asyncio.ensure_future(disconnecter()))
        await asyncio.sleep(min(1.0, seconds / 5))  # the adversaries first
        normal = await hostile.open_loop(server.url, lambda i: normal_request(), normal_rate,
                                         seconds - min(1.0, seconds / 5), timeout_s=deadline_s + 5, connections=64)
        await asyncio.gather(*tasks)
        return normal, adv_out, disconnects

    normal, adv, disconnects = asyncio.run(run())
    late = sum(1 for t in normal.latencies if t > deadline_s + 0.5)
    return {"seconds": seconds, "deadline_s": deadline_s, "normal": normal.summary(), "adversaries": adv.summary(),
            "normal_past_deadline": late + normal.hung, "disconnects_sent": disconnects,
            "fivexx": normal.fivexx(allowed=(503, 504)) + adv.fivexx(allowed=(503, 504))}


def stall_probe(server: Server, body: bytes, headers: dict, probes: int = 20) -> dict:
    """While one worst-case v2 body is parsed, how long does /v2/health/live take? (parsing is off the loop)."""
    async def run() -> tuple[list[float], int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            big = asyncio.ensure_future(client.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers))
            await asyncio.sleep(0.05)
            times = []
            for _ in range(probes):
                start = time.perf_counter()
                await client.get("/v2/health/live")
                times.append(time.perf_counter() - start)
                if big.done():
                    break
                await asyncio.sleep(0.01)
            return times, (await big).status_code

    times, status = asyncio.run(run())
    return {"probes": len(times), "max_ms": round(max(times) * 1e3, 1), "status_of_big": status}


def slow_and_idle(server: Server, idle: int, header_timeout_s: float) -> dict:
    """``idle`` connections that send nothing, a slowloris sending a header byte a second, a body that stalls:
    a real request still answers at once, and every one of them is closed within the timeouts."""
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(idle)]
    slow = socket.create_connection(("127.0.0.1", server.port))
    slow.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\n")
    stalled = socket.create_connection(("127.0.0.1", server.port))
    stalled.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n"
                    b"\x89PNG")
    time.sleep(0.3)
    start = time.perf_counter()
    with httpx.Client(base_url=server.url, timeout=30) as c:
        path, body, headers = normal_request()
        status = c.post(path, content=body, headers=headers).status_code
    real_ms = (time.perf_counter() - start) * 1e3
    for _ in range(int(header_timeout_s) + 1):
        slow.send(b"X")  # one byte a second: the header deadline does not move
        time.sleep(1.0)
    time.sleep(0.5)

    def closed(s: socket.socket) -> bool:
        s.setblocking(False)
        try:
            return s.recv(65536) == b"" or True  # data (a 408) then EOF, or EOF
        except BlockingIOError:
            return False
        except OSError:
            return True

    slow_answer = b""
    try:
        slow.setblocking(True)
        slow.settimeout(5)
        slow_answer = slow.recv(200)
    except OSError:
        pass
    idle_closed = sum(closed(s) for s in socks)
    result = {"idle": idle, "real_request_status": status, "real_request_ms": round(real_ms, 1),
              "idle_closed": idle_closed, "slowloris_answer": slow_answer[:40].decode("latin-1")}
    for s in [*socks, slow, stalled]:
        s.close()
    return result


def sigterm_under_load(export: Path, clients: int, grace_s: float, *args: str) -> dict:
    """A server under ``clients`` closed-loop clients gets SIGTERM: every request in flight is answered (200),
    new connections are refused, the process exits within the grace period."""
    server = start_server(export, "--grace-s", str(grace_s), *args)
    results: dict = {}

    async def run() -> hostile.Outcome:
        load = asyncio.ensure_future(hostile.closed_loop(server.url, lambda i: normal_request(), clients, 4.0,
                                                         timeout_s=30))
        await asyncio.sleep(1.5)
        results["signaled"] = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        return await load

    out = asyncio.run(run())
    server.proc.wait(grace_s + 15)
    results["exit_s"] = round(time.monotonic() - results.pop("signaled"), 2)
    log = server.log_text()
    return {"clients": clients, "grace_s": grace_s, "outcome": out.summary(), "returncode": server.proc.returncode,
            "exit_after_sigterm_s": results["exit_s"], "shutdown_logged": '"event": "shutdown"' in log,
            "tracebacks": log.count("Traceback")}


# --- start-up integrity -------------------------------------------------------------------------------------------

def integrity_cases(export: Path, workdir: Path) -> list[dict]:
    """Tampered, truncated, missing and mismatched exports, and a port in use: each must exit 2 with one line that
    names the file (or port) and the problem, no traceback, and never answer."""
    def flip(rel: str):
        def m(d: Path) -> None:
            b = bytearray((d / rel).read_bytes())
            b[len(b) // 2] ^= 0x01  # one bit of one weight
            (d / rel).write_bytes(bytes(b))
        return m

    def manifest(change):
        def m(d: Path) -> None:
            j = json.loads((d / "manifest.json").read_text())
            change(j)
            (d / "manifest.json").write_text(json.dumps(j))
        return m

    def labels5(j: dict) -> None:
        j["labels"], j["num_classes"] = j["labels"][:5], 5

    def size64(j: dict) -> None:
        j["preprocessing"].update(input_size=64, resize_size=64)

    def truncate(d: Path) -> None:
        data = (d / "model.onnx").read_bytes()
        (d / "model.onnx").write_bytes(data[: len(data) // 3])

    cases = [("tampered model.fused.onnx", flip("model.fused.onnx"), (), "model.fused.onnx: sha256"),
             ("tampered model.onnx", flip("model.onnx"), (), "model.onnx: sha256"),
             ("labels 5 for a 10-logit graph", manifest(labels5), (), "gives 10 logits, but the manifest has 5"),
             ("input_size 64 for a 32x32 graph", manifest(size64), (), "input_size is 64"),
             ("truncated model.onnx", truncate, (), "model.onnx: size"),
             ("truncated model.onnx, --skip-verify", truncate, ("--skip-verify", "--no-fused-kernels"),
              "cannot be loaded"),
             ("missing model.onnx", lambda d: (d / "model.onnx").unlink(), (), "model.onnx: missing")]
    out = []
    for name, mutate, args, expect in cases:
        d = workdir / name.replace(" ", "_").replace(",", "")
        shutil.copytree(export, d)
        mutate(d)
        start = time.monotonic()
        r = subprocess.run(["ganet-serve", str(d), "--port", str(free_port()), *args], capture_output=True,
                           text=True, timeout=120)
        lines = r.stderr.strip().splitlines()
        out.append({"case": name, "returncode": r.returncode, "lines": len(lines),
                    "message": lines[-1] if lines else "", "expected": expect, "ok": r.returncode == 2 and
                    len(lines) == 1 and expect in lines[0] and "Traceback" not in r.stderr,
                    "seconds": round(time.monotonic() - start, 2)})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run(["ganet-serve", str(export), "--port", str(port)], capture_output=True, text=True,
                           timeout=120)
        lines = r.stderr.strip().splitlines()
        out.append({"case": "port in use", "returncode": r.returncode, "lines": len(lines),
                    "message": lines[-1] if lines else "", "expected": f"{port}: Address already in use",
                    "ok": r.returncode == 2 and len(lines) == 1 and "Address already in use" in lines[0],
                    "seconds": None})
    return out
