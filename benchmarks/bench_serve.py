"""Serving throughput: ganet-serve (dynamic batching, ONNX Runtime CPU) against naive FastAPI servers.

Targets, GA-ShuffleNetV2 at 224x224, 16 concurrent keep-alive clients POSTing a real 640x427 JPEG
(sklearn's china.jpg, quality 90) to /classify for --duration seconds each:
  * ganet-serve throughput >= 1.4x the naive ONNX Runtime server and >= 8x the naive PyTorch eager server
    (benchmarks/naive_server.py: decode + batch-of-1 inference per request, either in FastAPI's threadpool --
    `ort`, `torch` -- or inline in an async endpoint, as most tutorials write it -- `ort_async`, `torch_async`;
    the targets were set expecting ~95 and ~15 images/s from the naive servers, which matches neither style
    exactly, so both are measured);
  * at half of ganet-serve's peak throughput (open loop, Poisson arrivals), p99 latency <= 3x p50;
  * CPU time per image inside ganet-serve, split into HTTP (the event loop: parsing, multipart, routing, JSON,
    logs, metrics), decode and inference, so that the next bottleneck is visible.

Everything runs on this machine in this run: the export (random init: speed does not depend on the weights),
the servers as real uvicorn subprocesses on 127.0.0.1 (measured one at a time), and the load generator in this process:
asyncio over raw keep-alive sockets with pre-built requests, so that it costs little of the CPU it shares with the
server; its own CPU time per request is measured and reported. Server CPU comes from /proc/PID/stat; the split by
thread (/proc/PID/task/TID/stat) needs py-spy (`pip install py-spy`) to name the threads, otherwise it falls back
to the wall-time sums of ganet-serve's Prometheus /metrics.

    python benchmarks/bench_serve.py                        # all three servers, 15 s each
    python benchmarks/bench_serve.py --servers ours --duration 5 --serve-arg=--intra-op-threads=1
    python benchmarks/bench_serve.py --servers ours,ort --serve-arg=--precision=int8   # exports INT8 too
    python benchmarks/bench_serve.py --servers ours,torch,torch_async --torch-device cuda \
        --serve-arg=--backend=torch --serve-arg=--device=cuda                     # on a GPU: PyTorch on both sides
    python benchmarks/bench_serve.py --servers ours_single,ours_fe1,ours_fe2,ours_reuse2,ort   # process layouts
    python benchmarks/bench_serve.py --servers ours --checkpoint-only --clients 64,128,256 \
        --generator-processes 4 --serve-arg=--backend=torch --serve-arg=--max-batch=256   # GPU serving at scale

On a GPU host each window also samples the GPU's utilisation through NVML (nvidia-ml-py) every 100 ms.

ganet-serve's process layouts, each a server name: `ours` (its defaults), `ours_single` (--frontends 0: one
process), `ours_feN` (--frontends N: N HTTP processes feeding one model owner through shared memory), `ours_reuseN`
(N independent one-process instances sharing the port with --reuse-port). Server CPU is summed over every process
of a layout; for `ours_feN` it is also split between the model owner and the front ends.

Writes benchmarks/results/serve_<date>.json.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import io
import json
import math
import os
import platform
import random
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from _stats import spread  # benchmarks/_stats.py (scripts run from this folder)

from ganet.serve.local import free_port, wait_ready
from ganet.serve.local import stop as stop_process

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"over_naive_ort": 1.4, "over_naive_torch": 8.0, "over_naive_ort_async": 1.4,
           "over_naive_torch_async": 8.0, "p99_over_p50_at_half_peak": 3.0}
BOUNDARY = "ganetbenchboundary"
TICK = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------------------------- the artifacts

def serve_precision(serve_args: list[str]) -> str:
    """The precision ganet-serve will run with these flags (and the environment), read the way ganet-serve reads
    them: whether the export needs its INT8 model."""
    from ganet.serve.cli import build_parser
    from ganet.serve.settings import ServeSettings

    given = vars(build_parser().parse_args(["(model)", *serve_args]))
    return ServeSettings(**{k: v for k, v in given.items() if v is not None}).precision


def make_export(tmp: Path, max_batch: int, int8: bool = False, export: bool = True) -> tuple[Path, Path | None]:
    """A ga_shufflenet_v2 checkpoint (1000 classes, random init) and its ganet-export directory (+ INT8; None
    without ``export``: the torch backend serves the checkpoint itself)."""
    import torch

    from ganet.checkpoint import save_checkpoint
    from ganet.export.pipeline import ExportOptions, export_checkpoint
    from ganet.models import create_model
    from ganet.preprocess import Preprocessing

    torch.manual_seed(0)
    model = create_model("ga_shufflenet_v2").eval()
    checkpoint = save_checkpoint(tmp / "ga.safetensors", model, "ga_shufflenet_v2", [f"class_{i}" for i in range(1000)],
                                 Preprocessing.for_input_size(224))
    if not export:
        return checkpoint, None
    export = export_checkpoint(checkpoint, ExportOptions(output=tmp / "export", max_batch=max_batch, int8=int8,
                                                         benchmark_rounds=0), log=lambda *a, **k: None)
    return checkpoint, export


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def china_jpeg(quality: int) -> bytes:
    """sklearn's china.jpg (640x427), re-encoded once."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    buf = io.BytesIO()
    Image.fromarray(load_sample_image("china.jpg")).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def http_request(port: int, jpeg: bytes, body: str) -> bytes:
    """One keep-alive POST /classify, built once: multipart field `file` or the raw image/jpeg body."""
    if body == "multipart":
        payload = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"china.jpg\"\r\n"
                   f"Content-Type: image/jpeg\r\n\r\n").encode() + jpeg + f"\r\n--{BOUNDARY}--\r\n".encode()
        ctype = f"multipart/form-data; boundary={BOUNDARY}"
    else:
        payload, ctype = jpeg, "image/jpeg"
    head = (f"POST /classify HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode()
    return head + payload


# ------------------------------------------------------------------------------------------------ the servers

@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    port: int
    log: Path
    others: list[subprocess.Popen] = field(default_factory=list)  # more instances on the same port (--reuse-port)

    def pids(self) -> list[int]:
        """Every process of the server: the instances and their children (ganet-serve --frontends' front ends)."""
        tops = [self.proc.pid] + [p.pid for p in self.others]
        return tops + sorted(descendants(tops))

    def cpu_s(self) -> float:
        return sum(process_cpu(self.pids()).values())

    def stop(self) -> None:
        for proc in [self.proc, *self.others]:
            stop_process(proc)


def descendants(pids: list[int]) -> set[int]:
    """Live processes below ``pids`` (from /proc/*/stat's parent field)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            pass
    found, frontier = set(), set(pids)
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def process_cpu(pids: list[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        try:
            out[pid] = proc_cpu_s(f"/proc/{pid}/stat")
        except (OSError, IndexError):  # exited meanwhile
            pass
    return out


def proc_cpu_s(stat_path: str) -> float:
    """utime + stime of a process or thread, in seconds (fields 14 and 15 of /proc/.../stat)."""
    fields = Path(stat_path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def start(name: str, argv: list[str], ready_path: str, tmp: Path, env: dict[str, str] | None = None,
          count: int = 1) -> Server:
    """argv gets --port; wait until GET ready_path answers 200 (the server has loaded and warmed up). ``count``
    processes share the port (argv has --reuse-port): each one's log must also say it is ready."""
    port, procs, logs = free_port(), [], [tmp / f"{name}{f'.{i}' if i else ''}.log" for i in range(count)]
    for log in logs:
        with log.open("wb") as out:  # a file, not a pipe: an undrained pipe would stall the server's logging
            procs.append(subprocess.Popen([*argv, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                          cwd=ROOT, env={**os.environ, **(env or {})}))
    try:
        for proc, log in zip(procs, logs):
            wait_ready(f"http://127.0.0.1:{port}{ready_path}", proc)
            deadline = time.monotonic() + 180
            while count > 1 and '"event": "ready"' not in log.read_text():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"instance {log.name} did not become ready")
                time.sleep(0.2)
    except RuntimeError as e:
        for proc in procs:
            proc.kill()
        raise RuntimeError(f"{name}: {e}:\n{logs[0].read_text()[-3000:]}") from None
    return Server(name, procs[0], port, logs[0], procs[1:])


# ------------------------------------------------------------------------------------------- the load generator

async def _connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    """Send one request, read its whole response; the HTTP status."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)
    return status


@dataclass
class LoadResult:
    duration_s: float
    latencies_s: list[float] = field(default_factory=list)  # of the 200s completed inside the window
    errors: dict[int, int] = field(default_factory=dict)
    per_second: list[int] = field(default_factory=list)  # completions in each 1-s bin of the window
    generator_cpu_s: float = 0.0

    @property
    def ok(self) -> int:
        return len(self.latencies_s)

    def summary(self) -> dict:
        lat = sorted(self.latencies_s)
        pct = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3) if lat else (lambda q: float("nan"))
        sent = self.ok + sum(self.errors.values())
        return {"images_per_s": self.ok / self.duration_s, "completed": self.ok,
                "errors": {str(k): v for k, v in self.errors.items()},
                "latency_ms": {"p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99), "max": lat[-1] * 1e3 if lat
                               else float("nan"), "mean": statistics.fmean(lat) * 1e3 if lat else float("nan")},
                "images_per_s_each_second": spread(self.per_second) if self.per_second else None,
                "generator_cpu_ms_per_request": self.generator_cpu_s / max(sent, 1) * 1e3,
                "generator_cores": self.generator_cpu_s / self.duration_s}


def _record(result: LoadResult, t0: float, t1: float, sent: float, done: float, status: int) -> None:
    if not t0 <= done < t1:  # warm-up and drain are not measured
        return
    if status != 200:
        result.errors[status] = result.errors.get(status, 0) + 1
        return
    result.latencies_s.append(done - sent)
    result.per_second[int(done - t0)] += 1


clock = time.perf_counter  # not loop.time(): uvloop's is cached per loop iteration, in whole milliseconds


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def closed_loop(port: int, request: bytes, clients: int, warmup_s: float, duration_s: float,
                      t0: float | None = None) -> LoadResult:
    """`clients` connections, each sending its next request as soon as the last one is answered (measured from
    `t0`, a perf_counter time -- CLOCK_MONOTONIC, the same in every process --, default now + `warmup_s`)."""
    t0 = clock() + warmup_s if t0 is None else t0
    t1 = t0 + duration_s
    result = LoadResult(duration_s, per_second=[0] * math.ceil(duration_s))
    cpu = [0.0, 0.0]

    async def client() -> None:
        reader, writer = await _connect(port)
        try:
            while (now := clock()) < t1:
                status = await _exchange(reader, writer, request)
                _record(result, t0, t1, now, clock(), status)
        finally:
            writer.close()

    async def edges() -> None:
        await asyncio.sleep(max(0.0, t0 - clock()))
        cpu[0] = _cpu_self()
        await asyncio.sleep(max(0.0, t1 - clock()))
        cpu[1] = _cpu_self()

    await asyncio.gather(edges(), *(client() for _ in range(clients)))
    result.generator_cpu_s = cpu[1] - cpu[0]
    return result


async def open_loop(port: int, request: bytes, rate: float, warmup_s: float, duration_s: float,
                    seed: int = 0) -> LoadResult:
    """Poisson arrivals at `rate`/s whatever the answers do; latency counts from the scheduled arrival (no
    coordinated omission). Idle keep-alive connections are reused; a new one opens when all are busy."""
    rng = random.Random(seed)
    t0 = clock() + warmup_s
    t1 = t0 + duration_s
    result = LoadResult(duration_s, per_second=[0] * math.ceil(duration_s))
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    opened: set[asyncio.StreamWriter] = set()
    tasks: set[asyncio.Task] = set()

    async def one(at: float) -> None:
        reused = bool(idle)
        conn = idle.pop() if reused else await _connect(port)
        try:
            status = await _exchange(*conn, request)
        except (asyncio.IncompleteReadError, ConnectionError):
            if not reused:
                raise
            conn[1].close()  # the server closed it after its keep-alive timeout: reconnect once
            conn = await _connect(port)
            status = await _exchange(*conn, request)
        opened.add(conn[1])
        _record(result, t0, t1, at, clock(), status)
        idle.append(conn)

    at = clock()
    cpu0 = None
    while at < t1:
        at += rng.expovariate(rate)
        await asyncio.sleep(max(0.0, at - clock()))
        if cpu0 is None and at >= t0:
            cpu0 = _cpu_self()
        task = asyncio.ensure_future(one(at))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    result.generator_cpu_s = _cpu_self() - (cpu0 or 0.0)
    await asyncio.gather(*tasks)
    for w in opened:
        w.close()
    return result


def _closed_loop_process(port: int, request: bytes, clients: int, t0: float, duration_s: float) -> LoadResult:
    return run_load(closed_loop(port, request, clients, 0.0, duration_s, t0))


def closed_loop_processes(port: int, request: bytes, clients: int, warmup_s: float, duration_s: float,
                          processes: int) -> LoadResult:
    """The closed loop split over `processes` generator processes (clients spread evenly), merged: one Python
    process tops out at a few thousand requests per second, which a GPU server can exceed."""
    if processes <= 1:
        return run_load(closed_loop(port, request, clients, warmup_s, duration_s))
    import multiprocessing

    t0 = clock() + warmup_s  # the workers start within the warm-up (a fork each)
    shares = [clients // processes + (i < clients % processes) for i in range(processes)]
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        parts = pool.starmap(_closed_loop_process, [(port, request, n, t0, duration_s) for n in shares if n])
    merged = LoadResult(duration_s, per_second=[0] * math.ceil(duration_s))
    for part in parts:
        merged.latencies_s += part.latencies_s
        merged.per_second = [a + b for a, b in zip(merged.per_second, part.per_second)]
        merged.generator_cpu_s += part.generator_cpu_s
        for status, n in part.errors.items():
            merged.errors[status] = merged.errors.get(status, 0) + n
    return merged


def gpu_sampler(stop: "threading.Event", delay_s: float, out: list[float], interval_s: float = 0.1) -> None:
    """GPU utilisation (%) of device 0 every `interval_s` after `delay_s`, into `out`, until `stop` is set; nothing
    without NVML or a GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception:
        return
    if stop.wait(delay_s):
        return
    while not stop.wait(interval_s):
        out.append(float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))


def run_load(coro) -> LoadResult:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def _closed_loop_in_process(port: int, request: bytes, clients: int, warmup_s: float, duration_s: float) -> LoadResult:
    return run_load(closed_loop(port, request, clients, warmup_s, duration_s))


def closed_loop_processes(port: int, request: bytes, clients: int, warmup_s: float, duration_s: float,
                          generators: int) -> LoadResult:
    """The closed loop from ``generators`` processes (forked), the clients spread over them, results merged: one
    asyncio process tops out at a few thousand requests per second, below what a GPU host serves."""
    if generators <= 1:
        return _closed_loop_in_process(port, request, clients, warmup_s, duration_s)
    import multiprocessing

    shares = [clients // generators + (i < clients % generators) for i in range(generators)]
    with multiprocessing.get_context("fork").Pool(generators) as pool:
        parts = pool.starmap(_closed_loop_in_process, [(port, request, n, warmup_s, duration_s) for n in shares if n])
    merged = LoadResult(duration_s, per_second=[sum(bins) for bins in zip(*(r.per_second for r in parts))])
    for r in parts:
        merged.latencies_s += r.latencies_s
        merged.generator_cpu_s += r.generator_cpu_s
        for status, n in r.errors.items():
            merged.errors[status] = merged.errors.get(status, 0) + n
    return merged


# ------------------------------------------------------------------------------------- ganet-serve's CPU split

def scrape(port: int) -> dict[str, float]:
    """The unlabelled samples of ganet-serve's /metrics (sums, counts, totals)."""
    import httpx

    out = {}
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def thread_names(pid: int) -> dict[int, str] | None:
    """OS thread id -> Python thread name, from py-spy; None without py-spy (or without ptrace permission)."""
    if shutil.which("py-spy") is None:
        return None
    try:
        dump = subprocess.run(["py-spy", "dump", "--pid", str(pid), "--json"], capture_output=True, text=True,
                              timeout=30)
        return {t["os_thread_id"]: t["thread_name"] for t in json.loads(dump.stdout) if t.get("os_thread_id")}
    except (subprocess.SubprocessError, ValueError, KeyError, TypeError):
        return None


def thread_cpu(pid: int) -> dict[int, float]:
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(task.name)] = proc_cpu_s(str(task / "stat"))
        except (OSError, IndexError):  # the thread ended meanwhile
            pass
    return out


def classify_thread(tid: int, pid: int, names: dict[int, str]) -> str:
    """Main thread: the event loop (HTTP). Threads Python does not know: ONNX Runtime's intra-op pool."""
    name = names.get(tid)
    if tid == pid or name == "MainThread":
        return "http"
    if name is None:
        return "inference"
    if name.startswith("ganet-decode"):
        return "decode"
    if name.startswith("ganet-infer"):
        return "inference"
    return "http"  # AnyIO / asyncio helper threads serve the HTTP side


def cpu_split(before: dict, after: dict, pid: int, names: dict[int, str] | None) -> dict:
    """CPU ms per image, by part, over the measured window."""
    m0, m1 = before["metrics"], after["metrics"]
    d = {k: m1.get(k, 0.0) - m0.get(k, 0.0) for k in m1}
    images = d.get("ganet_images_total", 0.0)
    per_image = lambda s: s / images * 1e3 if images else float("nan")  # noqa: E731
    total = after["process_cpu_s"] - before["process_cpu_s"]
    out = {"images": images, "process_cpu_ms": per_image(total),
           "mean_batch_size": d["ganet_batch_size_sum"] / d["ganet_batch_size_count"] if
           d.get("ganet_batch_size_count") else float("nan"),
           "wall_ms": {"decode": per_image(d.get("ganet_decode_seconds_sum", 0.0)),
                       "inference": per_image(d.get("ganet_inference_seconds_sum", 0.0)),
                       "queue": per_image(d.get("ganet_queue_seconds_sum", 0.0))}}
    if names is not None:
        parts = {"http": 0.0, "decode": 0.0, "inference": 0.0}
        t0, t1 = before["threads"], after["threads"]
        for tid, cpu in t1.items():
            parts[classify_thread(tid, pid, names)] += cpu - t0.get(tid, 0.0)
        out["cpu_ms"] = {k: per_image(v) for k, v in parts.items()}
        out["cpu_source"] = "per-thread /proc CPU time, threads named by py-spy"
    else:  # wall time in the decode and inference threads; whatever else the process spent is HTTP
        wall = out["wall_ms"]
        http, inference = out["process_cpu_ms"] - wall["decode"] - wall["inference"], wall["inference"]
        out["cpu_source"] = "process CPU minus /metrics wall-time sums (install py-spy for per-thread CPU)"
        if http < 0:  # the inference thread waited (on a GPU) more than it computed: wall is not CPU there
            http = inference = float("nan")
            out["cpu_source"] += "; no split: the wall times exceed the process CPU (a GPU backend waits)"
        out["cpu_ms"] = {"http": http, "decode": wall["decode"], "inference": inference}
    return out


def snapshot(server: Server, threads: bool) -> dict:
    processes = process_cpu(server.pids())
    return {"metrics": scrape(server.port), "process_cpu_s": sum(processes.values()), "processes": processes,
            "threads": thread_cpu(server.proc.pid) if threads else {}}


def owner_split(before: dict, after: dict, owner: int) -> dict:
    """--frontends N: CPU ms per image in the model owner (inference, the batcher, the ring's readers) and in the
    front ends (HTTP, decoding), and the mean batch, over the measured window."""
    d = {k: after["metrics"].get(k, 0.0) - before["metrics"].get(k, 0.0) for k in after["metrics"]}
    images = d.get("ganet_images_total", 0.0)
    used = {pid: cpu - before["processes"].get(pid, 0.0) for pid, cpu in after["processes"].items()}
    per_image = lambda s: s / images * 1e3 if images else float("nan")  # noqa: E731
    return {"images": images, "owner_cpu_ms": per_image(used.get(owner, 0.0)),
            "frontends_cpu_ms": per_image(sum(v for pid, v in used.items() if pid != owner)),
            "mean_batch_size": d["ganet_batch_size_sum"] / d["ganet_batch_size_count"] if
            d.get("ganet_batch_size_count") else float("nan")}


# ---------------------------------------------------------------------------------------------------- reporting

def same_answers(running: dict[str, Server], jpeg: bytes) -> dict[str, bool]:
    """Every server answers the request image with the same top-5 (indices; scores within 1e-4): the same model."""
    import httpx

    top5 = {}
    for name, server in running.items():
        r = httpx.post(f"http://127.0.0.1:{server.port}/classify", files={"file": ("china.jpg", jpeg, "image/jpeg")},
                       timeout=30)
        r.raise_for_status()
        top5[name] = [(p["index"], p["score"]) for p in r.json()["predictions"][:5]]
    first = next(iter(top5.values()))
    same = {name: [i for i, _ in t] == [i for i, _ in first] and
            all(abs(a - b) <= 1e-4 for (_, a), (_, b) in zip(t, first)) for name, t in top5.items()}
    if not all(same.values()):
        print(f"WARNING: the servers answer differently: {top5}", flush=True)
    return same


def row(name: str, s: dict) -> str:
    lat, each = s["latency_ms"], s["images_per_s_each_second"] or {}
    return (f"{name:<22}{s['images_per_s']:>9.1f}{each.get('median', float('nan')):>9.1f} "
            f"[{each.get('min', float('nan')):>5.1f}, {each.get('max', float('nan')):>5.1f}]"
            f"{lat['p50']:>9.1f}{lat['p90']:>9.1f}{lat['p99']:>9.1f}"
            f"{s.get('server_cpu_ms_per_image', float('nan')):>10.1f}"
            f"{s['generator_cpu_ms_per_request']:>9.2f}{ceiling(s):>9.0f}  {s['errors'] or ''}")


def ceiling(s: dict) -> float:
    """images/s if server and generator had every core to themselves and used them fully: cores / CPU per image."""
    cpu_ms = s.get("server_cpu_ms_per_image", float("nan")) + s["generator_cpu_ms_per_request"]
    return (os.cpu_count() or 1) * 1e3 / cpu_ms


def measure(server: Server, jpeg: bytes, args: argparse.Namespace, clients: int | None = None) -> dict:
    """One closed-loop window; server CPU (and, for ganet-serve, the split) sampled at the window's edges, and the
    GPU's utilisation through the window where NVML sees one."""
    import threading

    clients = clients or args.client_levels[0]
    # ganet-serve has /metrics (one aggregate, except N separate instances); the thread split needs one process
    metrics = server.name.startswith("ours") and not server.others
    one_process = metrics and not descendants([server.proc.pid])
    request = http_request(server.port, jpeg, args.body)
    edges: dict[str, dict] = {}

    def sample(key: str, delay: float) -> None:
        time.sleep(delay)
        edges[key] = snapshot(server, threads=one_process) if metrics else {"process_cpu_s": server.cpu_s()}

    timer = threading.Thread(target=lambda: (sample("before", args.warmup), sample("after", args.duration)),
                             daemon=True)
    timer.start()
    stop, utilisation = threading.Event(), []
    sampler = threading.Thread(target=gpu_sampler, args=(stop, args.warmup, utilisation), daemon=True)
    sampler.start()
    load = closed_loop_processes(server.port, request, clients, args.warmup, args.duration, args.generator_processes)
    stop.set()
    timer.join()
    sampler.join()
    summary = load.summary()
    summary["clients"] = clients
    if utilisation:
        summary["gpu_utilization_pct"] = spread(utilisation) | {"samples": len(utilisation)}
    before, after = edges["before"], edges["after"]
    summary["server_cpu_ms_per_image"] = (after["process_cpu_s"] - before["process_cpu_s"]) / max(load.ok, 1) * 1e3
    if one_process:  # without py-spy, thread_names is None and the split falls back to /metrics wall times
        summary["cpu_split"] = cpu_split(before, after, server.proc.pid, thread_names(server.proc.pid))
    elif metrics:
        summary["owner_split"] = owner_split(before, after, server.proc.pid)
    return summary


def combine(rounds: list[dict]) -> dict:
    """Headline: the median throughput over rounds, latencies and CPU of the (lower) median round; every round kept."""
    ranked = sorted(rounds, key=lambda s: s["images_per_s"])
    out = dict(ranked[(len(ranked) - 1) // 2])
    out["images_per_s_rounds"] = spread([s["images_per_s"] for s in rounds])
    out["images_per_s"] = out["images_per_s_rounds"]["median"]
    out["rounds"] = rounds
    return out


def layout(name: str) -> tuple[list[str], int] | None:
    """ganet-serve's process layout from a server name: (extra flags, processes sharing the port), or None."""
    m = re.fullmatch(r"ours(?:_(single)|_fe(\d+)|_reuse(\d+))?", name)
    if m is None:
        return None
    single, frontends, instances = m.groups()
    if single:
        return ["--frontends", "0"], 1
    if frontends:
        return ["--frontends", frontends], 1
    if instances:
        return ["--reuse-port", "--frontends", "0"], int(instances)
    return [], 1


def label(name: str) -> str:
    fixed = {"ours": "ganet-serve", "ours_single": "ganet-serve, 1 process", "ort": "naive ONNX Runtime",
             "torch": "naive PyTorch eager", "ort_async": "naive ORT, async", "torch_async": "naive PyTorch, async"}
    if name in fixed:
        return fixed[name]
    flags, count = layout(name)
    return f"{count} x ganet-serve, reuse" if count > 1 else f"ganet-serve, {flags[1]} FE"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--duration", type=float, default=15.0, help="measured seconds per server (default 15)")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds of load before each window")
    p.add_argument("--rounds", type=int, default=2, help="interleaved windows per server (default 2)")
    p.add_argument("--clients", default="16", help="concurrent keep-alive connections (default 16); a comma-separated "
                   "list measures each level in turn, and the headline is the level with the most images/s")
    p.add_argument("--generator-processes", type=int, default=1, help="load generator processes sharing the clients "
                   "(default 1; a GPU server can outrun one Python process)")
    p.add_argument("--checkpoint-only", action="store_true", help="no ganet-export: serve the checkpoint (torch "
                   "backend and the naive PyTorch servers only; skips the export's minute of CPU)")
    p.add_argument("--servers", default="ours,ort,torch,ort_async,torch_async",
                   help="comma-separated subset of ours, ort, torch (naive, threadpool endpoint), ort_async, "
                        "torch_async (naive, async endpoint calling the model inline), and ganet-serve's process "
                        "layouts ours_single, ours_feN, ours_reuseN (see above)")
    p.add_argument("--body", choices=["multipart", "raw"], default="multipart",
                   help="the image as multipart field `file` (default; what browsers and `curl -F` send) or the "
                        "raw image/jpeg body (ganet-serve only: the naive servers read multipart)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the request image")
    p.add_argument("--max-batch", type=int, default=32, help="the export's max batch")
    p.add_argument("--serve-arg", action="append", default=[], help="extra ganet-serve flag (repeatable), e.g. "
                                                                     "--serve-arg=--intra-op-threads=1")
    p.add_argument("--torch-device", default="cpu", help="where the naive PyTorch servers run the model (cpu, cuda); "
                   "for ganet-serve on a GPU add --serve-arg=--backend=torch --serve-arg=--device=cuda")
    p.add_argument("--no-open-loop", action="store_true", help="skip the latency run at half the peak")
    p.add_argument("--export", type=Path, help="reuse this export directory (its manifest names its checkpoint)")
    p.add_argument("--output", type=Path, help="JSON path (default benchmarks/results/serve_<date>.json)")
    args = p.parse_args()
    args.client_levels = [int(c) for c in args.clients.split(",")]
    servers = args.servers.split(",")
    naive = {n for n in servers if not n.startswith("ours")}
    if args.checkpoint_only and naive - {"torch", "torch_async"}:
        p.error("--checkpoint-only: the naive ONNX Runtime servers need the export; use --servers ours,torch,...")
    for name in servers:
        if name not in ("ort", "torch", "ort_async", "torch_async") and layout(name) is None:
            p.error(f"--servers: unknown server {name!r}; expected ours, ours_single, ours_feN, ours_reuseN, ort, "
                    "torch, ort_async, torch_async")
    if args.body == "raw" and naive:
        p.error("--body raw: only ganet-serve reads a raw body; use --servers ours")

    tmp = Path(tempfile.mkdtemp(prefix="bench_serve."))
    try:
        start_s = time.perf_counter()
        if args.export:
            from ganet.export.manifest import load_manifest

            export, checkpoint = args.export, Path(load_manifest(args.export).checkpoint["path"])
        else:
            checkpoint, export = make_export(tmp, args.max_batch, int8=serve_precision(args.serve_arg) == "int8",
                                             export=not args.checkpoint_only)
        print(f"export ready in {time.perf_counter() - start_s:.0f} s: {export}", flush=True)
        jpeg = china_jpeg(args.quality)
        results: dict = {"host": {"cpu_count": os.cpu_count(), "machine": platform.machine(), "gpu": gpu_name(),
                                  "python": platform.python_version(), "loadavg_before": os.getloadavg()},
                         "config": {"duration_s": args.duration, "warmup_s": args.warmup,
                                    "clients": args.client_levels, "generator_processes": args.generator_processes,
                                    "body": args.body, "jpeg_bytes": len(jpeg), "image": "sklearn china.jpg 640x427",
                                    "quality": args.quality, "max_batch": args.max_batch,
                                    "serve_args": args.serve_arg, "torch_device": args.torch_device,
                                    "model": "ga_shufflenet_v2 224x224 (random init)"},
                         "servers": {}, "targets": TARGETS}
        py = sys.executable
        commands = {
            "ours": ([py, str(Path(py).parent / "ganet-serve"), str(export or checkpoint), *args.serve_arg],
                     "/v2/health/ready"),
            "ort": ([py, "benchmarks/naive_server.py", "--runtime", "onnxruntime", "--model",
                     str((export or tmp) / "model.onnx"), "--checkpoint", str(checkpoint)], "/health"),
            "torch": ([py, "benchmarks/naive_server.py", "--runtime", "torch", "--model", str(checkpoint),
                       "--device", args.torch_device], "/health"),
        }
        for name in ("ort", "torch"):  # the same servers with an async endpoint that calls the model inline
            commands[f"{name}_async"] = (commands[name][0] + ["--style", "async"], "/health")
        running: dict[str, Server] = {}
        try:
            for name in servers:  # all up at once (idle servers cost nothing), then interleaved windows
                flags, count = layout(name) if name.startswith("ours") else ([], 1)
                argv, ready = commands["ours" if name.startswith("ours") else name]
                running[name] = start(name, argv + flags, ready, tmp, count=count)
            results["same_answers"] = same_answers(running, jpeg)
            rounds: dict[tuple[str, int], list[dict]] = {(n, c): [] for n in servers for c in args.client_levels}
            for clients in args.client_levels:
                for r in range(args.rounds):
                    for name, server in running.items():
                        summary = measure(server, jpeg, args, clients)
                        rounds[name, clients].append(summary)
                        print(row(f"{name} x{clients} round {r + 1}", summary), flush=True)
            for name in servers:
                levels = {c: combine(rounds[name, c]) for c in args.client_levels}
                best = max(levels, key=lambda c: levels[c]["images_per_s"])
                results["servers"][name] = levels[best] | ({"by_clients": levels} if len(levels) > 1 else {})
            if "ours" in running and not args.no_open_loop:
                server = running["ours"]
                rate = results["servers"]["ours"]["images_per_s"] / 2
                request = http_request(server.port, jpeg, args.body)
                half = run_load(open_loop(server.port, request, rate, args.warmup, args.duration)).summary()
                half["rate_per_s"] = rate
                results["servers"]["ours"]["half_peak"] = half
        finally:
            for name, server in running.items():
                server.stop()
                results["servers"].setdefault(name, {})["log_tail"] = server.log.read_text()[-1500:]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(results, args)


def report(results: dict, args: argparse.Namespace) -> None:
    s = results["servers"]
    ratios, cpu_ratios = {}, {}
    for name in ("ort", "torch", "ort_async", "torch_async"):
        if "ours" in s and name in s:
            ratios[f"over_naive_{name}"] = s["ours"]["images_per_s"] / s[name]["images_per_s"]
            # what a CPU-bound host allows: the ratio of CPU per image
            cpu_ratios[f"cpu_{name}_over_ours"] = (s[name]["server_cpu_ms_per_image"]
                                                   / s["ours"]["server_cpu_ms_per_image"])
    half = s.get("ours", {}).get("half_peak")
    if half:
        ratios["p99_over_p50_at_half_peak"] = half["latency_ms"]["p99"] / half["latency_ms"]["p50"]
    layouts = [name for name in s if name.startswith("ours")]
    reference = "ours_single" if "ours_single" in s else "ours"
    for name in layouts:  # process layouts against one process (or the default)
        if name != reference and reference in s:
            cpu_ratios[f"{name}_over_{reference}"] = s[name]["images_per_s"] / s[reference]["images_per_s"]
    ratios |= cpu_ratios  # (after the targets, as the report prints them)
    results["ratios"] = ratios
    results["host"]["loadavg_after"] = os.getloadavg()

    print(f"\n{args.clients} clients ({args.generator_processes} generator processes), {args.duration:g} s each, "
          f"{args.body} POST of a {results['config']['jpeg_bytes']}-byte 640x427 JPEG; images/s: over the window, "
          f"and median [min, max] of its 1-s bins")
    print(f"{'server':<22}{'img/s':>9}{'median':>9}  [ min,   max]{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
          f"{'srv CPU':>10}{'gen CPU':>9}{'ceiling':>9}")
    for name, summary in s.items():
        if "images_per_s" in summary:
            print(row(label(name), summary))
    if half:
        print(row(f"ganet-serve @{half['rate_per_s']:.0f}/s", half) + "  (open loop, Poisson, half the peak)")
    print("(srv CPU: server process CPU ms per image; gen CPU: this load generator's CPU ms per request; ceiling: "
          "cores x 1000 / (srv CPU + gen CPU), the most this CPU cost allows)")
    if not all(results.get("same_answers", {}).values()):
        print(f"WARNING: the servers did not all give the same top-5: {results.get('same_answers')}")
    for key, value in ratios.items():
        if key not in TARGETS:
            why = ("images/s of one process layout over the other" if key.startswith("ours") else
                   "server CPU per image: the most a CPU-bound host lets the throughput ratio be")
            print(f"{key:<28}{value:6.2f}   ({why})")
            continue
        target = TARGETS[key]
        ok = value <= target if key.startswith("p99") else value >= target
        print(f"{key:<28}{value:6.2f}   target {'<=' if key.startswith('p99') else '>='} {target}  "
              f"{'ok' if ok else 'MISSED'}")
    ours = s.get("ours", {})
    for clients, level in ours.get("by_clients", {}).items():
        gpu = level.get("gpu_utilization_pct")
        print(f"ganet-serve x{clients:<5} {level['images_per_s']:9.1f} images/s  p50 {level['latency_ms']['p50']:.1f} "
              f"p99 {level['latency_ms']['p99']:.1f} ms  server CPU {level['server_cpu_ms_per_image']:.2f} ms/image  "
              f"generator {level['generator_cores']:.2f} cores" + (f"  GPU {gpu['median']:.0f}% (median)" if gpu else ""))
    if ours.get("gpu_utilization_pct"):
        g = ours["gpu_utilization_pct"]
        print(f"GPU utilisation at the peak (NVML, every 100 ms): median {g['median']:.0f}%, [{g['min']:.0f}, "
              f"{g['max']:.0f}]%")
    split = s.get("ours", {}).get("cpu_split")
    if split:
        cpu, wall = split["cpu_ms"], split["wall_ms"]
        print(f"\nganet-serve CPU per image ({split['cpu_source']}); mean batch {split['mean_batch_size']:.1f}")
        print(f"{'part':<12}{'CPU ms':>8}{'share':>8}{'wall ms':>9}")
        total = sum(cpu.values())
        for part in ("http", "decode", "inference"):
            w = wall.get(part)
            print(f"{part:<12}{cpu[part]:8.2f}{cpu[part] / total:8.0%}{w if w is not None else float('nan'):9.2f}")
        print(f"{'total':<12}{total:8.2f}{'':>8}   (process: {split['process_cpu_ms']:.2f}; queue wall "
              f"{wall['queue']:.2f} ms/image)")
    splits = {name: v["owner_split"] for name, v in s.items() if v.get("owner_split")}
    if splits:
        print(f"\n{'CPU ms per image':<26}{'owner':>8}{'front ends':>12}{'mean batch':>12}")
        for name, split in splits.items():
            print(f"{label(name):<26}{split['owner_cpu_ms']:8.2f}{split['frontends_cpu_ms']:12.2f}"
                  f"{split['mean_batch_size']:12.1f}")
    out = args.output or ROOT / "benchmarks" / "results" / f"serve_{datetime.date.today():%Y%m%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    from ganet._io import atomic_write_bytes

    atomic_write_bytes(out, (json.dumps(results, indent=2) + "\n").encode())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
