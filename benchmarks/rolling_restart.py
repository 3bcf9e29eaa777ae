"""A rolling restart under load: two ganet-serve replicas behind HAProxy, each stopped with SIGTERM and started
again in turn while a closed-loop load runs through the load balancer. Nothing may fail.

Targets: 0 failed requests (any status but 200, or a broken connection), and p99 latency while the replicas
restart <= 3x p99 before. Also measured, for the Kubernetes resource requests: each replica's CPU (cores) and
resident memory (peak) under the load.

How the load balancer learns a replica is going: HAProxy checks GET /v2/health/ready every --check-ms (fall 1,
rise 2). ganet-serve runs with --drain-delay-s: on SIGTERM its readiness turns 503 at once while it keeps serving,
so HAProxy takes it out of rotation before the socket closes; then uvicorn stops accepting, finishes what is in
flight and exits. A replica counts as back when HAProxy reports it UP (its stats socket). `--drain-delay-s 0`
shows what happens without the delay.

    python benchmarks/rolling_restart.py                        # ga_shufflenet_v2 224x224, 8 clients
    python benchmarks/rolling_restart.py --export DIR --clients 4 --baseline-s 4

Needs Debian's haproxy (`apt-get install haproxy`). Prints one JSON object (and writes it with --output).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench_serve import _connect, _exchange, china_jpeg, http_request, make_export, proc_cpu_s

from ganet.serve.local import free_port, wait_ready

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"failed_requests": 0, "p99_during_over_before": 3.0}

HAPROXY_CFG = """\
global
    stats socket {stats} mode 600 level admin
    maxconn 1024
defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    retries 2
    option redispatch
frontend ganet
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance leastconn
    option httpchk GET /v2/health/ready
    http-check expect status 200
    default-server inter {check_ms}ms fastinter {check_ms}ms downinter {check_ms}ms fall 1 rise 2
{servers}
"""


@dataclass
class Replica:
    name: str
    port: int
    argv: list[str]
    log: Path
    proc: subprocess.Popen | None = None
    starts: list[float] = field(default_factory=list)  # seconds from SIGTERM to ready, per restart

    def start(self) -> None:
        with self.log.open("ab") as out:  # a file, not a pipe: an undrained pipe would stall the server
            self.proc = subprocess.Popen([*self.argv, "--port", str(self.port)], stdout=out,
                                         stderr=subprocess.STDOUT, cwd=ROOT)
        wait_ready(f"http://127.0.0.1:{self.port}/v2/health/ready", self.proc, timeout_s=120)

    def rss_peak_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")


class HAProxy:
    def __init__(self, replicas: list[Replica], tmp: Path, check_ms: int) -> None:
        self.port, self.stats = free_port(), tmp / "haproxy.sock"
        servers = "\n".join(f"    server {r.name} 127.0.0.1:{r.port} check" for r in replicas)
        cfg = tmp / "haproxy.cfg"
        cfg.write_text(HAPROXY_CFG.format(stats=self.stats, port=self.port, check_ms=check_ms, servers=servers))
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        check = subprocess.run([haproxy, "-c", "-f", str(cfg)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy refused its configuration: {check.stdout}{check.stderr}")
        self.log = tmp / "haproxy.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([haproxy, "-db", "-f", str(cfg)], stdout=out, stderr=subprocess.STDOUT)

    def status(self) -> dict[str, str]:
        """Each server's state as HAProxy sees it (UP, DOWN, ...), from its stats socket."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.stats))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        lines = data.decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","))) for line in lines[1:] if line]
        return {r["svname"]: r["status"] for r in rows if r["pxname"] == "replicas" and r["svname"] != "BACKEND"}

    def wait_status(self, name: str, wanted: str, timeout_s: float = 60) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            if self.stats.exists() and self.status().get(name, "").startswith(wanted):
                return time.monotonic() - start
            time.sleep(0.05)
        raise RuntimeError(f"haproxy did not see {name} {wanted} within {timeout_s:g} s: {self.status()}")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@dataclass
class Outcome:
    sent: float  # perf_counter
    done: float
    status: int  # 0: the connection broke


async def closed_loop(port: int, request: bytes, clients: int, stop: asyncio.Event, out: list[Outcome]) -> None:
    """`clients` keep-alive connections to the load balancer, each sending its next request when the last one is
    answered, until `stop` is set. A broken connection is a failure (status 0); the client reconnects."""
    async def client() -> None:
        conn = None
        while not stop.is_set():
            sent = time.perf_counter()
            try:
                if conn is None:
                    conn = await _connect(port)
                status = await _exchange(*conn, request)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                status = 0
                if conn is not None:
                    conn[1].close()
                conn = None
            out.append(Outcome(sent, time.perf_counter(), status))
        if conn is not None:
            conn[1].close()

    await asyncio.gather(*(client() for _ in range(clients)))


def _p(latencies: list[float], q: float) -> float:
    lat = sorted(latencies)
    return lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3 if lat else float("nan")


def _window(outcomes: list[Outcome], t0: float, t1: float) -> dict:
    inside = [o for o in outcomes if t0 <= o.sent < t1]
    ok = [o.done - o.sent for o in inside if o.status == 200]
    failed: dict[str, int] = {}
    for o in inside:
        if o.status != 200:
            failed[str(o.status)] = failed.get(str(o.status), 0) + 1
    return {"seconds": t1 - t0, "requests": len(inside), "failed": failed, "images_per_s": len(ok) / (t1 - t0),
            "latency_ms": {"p50": _p(ok, 0.5), "p99": _p(ok, 0.99), "max": max(ok, default=float("nan")) * 1e3}}


def run(export: Path, clients: int = 8, baseline_s: float = 8.0, settle_s: float = 2.0, drain_delay_s: float = 1.0,
        check_ms: int = 200, serve_args: list[str] = (), body: str = "multipart") -> dict:
    """Start everything, load it, restart each replica in turn; the measurements (see the module docstring)."""
    tmp = Path(tempfile.mkdtemp(prefix="rolling_restart."))
    py = sys.executable
    argv = [py, str(Path(py).parent / "ganet-serve"), str(export), "--drain-delay-s", str(drain_delay_s),
            *serve_args]
    replicas = [Replica(f"r{i}", free_port(), argv, tmp / f"r{i}.log") for i in range(2)]
    lb = None
    try:
        for r in replicas:
            r.start()
        lb = HAProxy(replicas, tmp, check_ms)
        for r in replicas:
            lb.wait_status(r.name, "UP")
        request = http_request(lb.port, china_jpeg(90), body)
        outcomes: list[Outcome] = []
        marks: dict[str, float] = {}
        usage: dict[str, dict] = {}

        async def scenario() -> None:
            stop = asyncio.Event()
            load = asyncio.ensure_future(closed_loop(lb.port, request, clients, stop, outcomes))
            await asyncio.sleep(settle_s)  # connections open, batches settle
            marks["before"] = time.perf_counter()
            cpu0 = {r.name: proc_cpu_s(f"/proc/{r.proc.pid}/stat") for r in replicas}
            await asyncio.sleep(baseline_s)
            for r in replicas:
                usage[r.name] = {"cpu_cores": (proc_cpu_s(f"/proc/{r.proc.pid}/stat") - cpu0[r.name]) / baseline_s,
                                 "rss_peak_mb": r.rss_peak_mb()}
            marks["restart"] = time.perf_counter()
            for r in replicas:  # in turn, as a Deployment's rolling update or a node drain would
                t = time.perf_counter()
                r.proc.send_signal(signal.SIGTERM)
                down_s = await asyncio.to_thread(lb.wait_status, r.name, "DOWN")
                code = await asyncio.to_thread(r.proc.wait, 60)
                stopped_s = time.perf_counter() - t
                if code not in (0, -signal.SIGTERM):
                    raise RuntimeError(f"{r.name} exited {code} after SIGTERM:\n{r.log.read_text()[-2000:]}")
                await asyncio.to_thread(r.start)
                await asyncio.to_thread(lb.wait_status, r.name, "UP")
                r.starts.append(time.perf_counter() - t)
                marks[f"{r.name}_lb_down_s"], marks[f"{r.name}_stopped_s"] = down_s, stopped_s
            marks["after"] = time.perf_counter()
            await asyncio.sleep(settle_s)
            stop.set()
            await load

        asyncio.run(scenario())
        before = _window(outcomes, marks["before"], marks["restart"])
        during = _window(outcomes, marks["restart"], marks["after"])
        all_failed = sum(1 for o in outcomes if o.status != 200)
        return {
            "host": {"cpu": _cpu_name(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                     "loadavg_before": None},
            "config": {"clients": clients, "baseline_s": baseline_s, "drain_delay_s": drain_delay_s,
                       "check_ms": check_ms, "serve_args": list(serve_args), "body": body,
                       "load_balancer": subprocess.run(["haproxy", "-v"], capture_output=True,
                                                       text=True).stdout.splitlines()[0]},
            "before": before, "during_restart": during,
            "failed_requests": all_failed, "requests": len(outcomes),
            "p99_during_over_before": during["latency_ms"]["p99"] / before["latency_ms"]["p99"],
            "replica_under_load": usage,
            "restart_s": {r.name: r.starts for r in replicas},
            "lb_down_after_sigterm_s": {r.name: marks[f"{r.name}_lb_down_s"] for r in replicas},
            "exit_after_sigterm_s": {r.name: marks[f"{r.name}_stopped_s"] for r in replicas},
            "targets": TARGETS,
        }
    finally:
        if lb is not None:
            lb.close()
        for r in replicas:
            if r.proc is not None and r.proc.poll() is None:
                r.proc.kill()
                r.proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--export", type=Path, help="export directory (default: a ga_shufflenet_v2 224x224 export)")
    p.add_argument("--clients", type=int, default=8, help="closed-loop connections (default 8)")
    p.add_argument("--baseline-s", type=float, default=8.0, help="measured seconds before the restarts")
    p.add_argument("--drain-delay-s", type=float, default=1.0, help="each replica's --drain-delay-s (default 1)")
    p.add_argument("--check-ms", type=int, default=200, help="HAProxy's health-check interval (default 200)")
    p.add_argument("--serve-arg", action="append", default=[], help="extra ganet-serve flag (repeatable)")
    p.add_argument("--output", type=Path, help="also write the JSON here")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="rolling_restart_export."))
    try:
        export = args.export or make_export(tmp, 32)[1]
        load_before = os.getloadavg()
        result = run(export, args.clients, args.baseline_s, drain_delay_s=args.drain_delay_s,
                     check_ms=args.check_ms, serve_args=args.serve_arg)
        result["host"]["loadavg_before"] = load_before
        result["config"]["model"] = "ga_shufflenet_v2 224x224" if args.export is None else str(args.export)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = json.dumps(result, indent=1)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
