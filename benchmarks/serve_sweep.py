"""Serving against concurrency: throughput and p50/p99 latency of ganet-serve, the naive ONNX Runtime and PyTorch
servers (``naive_server.py``, FastAPI's threadpool endpoint) and LitServe with its own dynamic batching
(``litserve_server.py``, the same ``model.onnx``), at 1 -> 64 concurrent keep-alive clients, on one machine in one
run; and ganet-serve's CPU time per image split into HTTP, decode and inference.

The pieces are ``bench_serve.py``'s: the export (GA-ShuffleNetV2 at 224x224, random weights), the request
(china.jpg, 640x427, JPEG q90, multipart), the servers as real processes on 127.0.0.1, the closed-loop load
generator on raw sockets and the CPU accounting (/proc; the split by thread needs py-spy). Each round measures
every concurrency level on every server in turn, so machine noise hits all alike; ganet-serve's throughput ratio
to each baseline is taken per (level, round) and reported as median and spread. A server's CPU is its whole
process tree (LitServe runs its API servers and workers as child processes). All servers start once; the ones
not being measured are frozen (SIGSTOP, then SIGCONT for their turn): idle LitServe polls its queues with about a
third of a core, which would otherwise tax whichever server is measured.

    python -m benchmarks.serve_sweep --levels 1 16 --rounds 1 --duration 3    # alone; report.py runs it for the page
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import bench_serve
from _stats import spread

LEVELS = (1, 4, 16, 64)
SERVERS = ("ours", "ort", "torch", "litserve")
LABELS = {"ours": "ganet-serve", "ort": "naive ONNX Runtime", "torch": "naive PyTorch", "litserve": "LitServe"}
ROOT = Path(__file__).resolve().parent.parent


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, grandchildren, ...), from /proc."""
    parent_of: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent_of[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parent_of.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


class TreeServer(bench_serve.Server):
    """A server whose CPU time is that of its whole process tree."""

    def cpu_s(self) -> float:
        total = 0.0
        for pid in (self.proc.pid, *descendants(self.proc.pid)):
            try:
                total += bench_serve.proc_cpu_s(f"/proc/{pid}/stat")
            except (OSError, IndexError):  # ended meanwhile
                pass
        return total

    def freeze(self, frozen: bool) -> None:
        """Stop (or continue) the whole process tree: a frozen server takes no CPU from the one measured."""
        for pid in (self.proc.pid, *descendants(self.proc.pid)):
            try:
                os.kill(pid, signal.SIGSTOP if frozen else signal.SIGCONT)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        self.freeze(False)  # a stopped process would hold SIGTERM pending
        children = descendants(self.proc.pid)
        super().stop()
        for pid in children:  # workers the server did not take down with it
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def commands(export: Path, checkpoint: Path, servers: tuple[str, ...]) -> dict[str, tuple[list[str], str]]:
    py = sys.executable
    all_commands = {
        "ours": ([py, str(Path(py).parent / "ganet-serve"), str(export)], "/v2/health/ready"),
        "ort": ([py, "benchmarks/naive_server.py", "--runtime", "onnxruntime", "--model", str(export / "model.onnx"),
                 "--checkpoint", str(checkpoint)], "/health"),
        "torch": ([py, "benchmarks/naive_server.py", "--runtime", "torch", "--model", str(checkpoint)], "/health"),
        "litserve": ([py, "benchmarks/litserve_server.py", "--export", str(export)], "/health"),
    }
    return {name: all_commands[name] for name in servers}


def litserve_missing() -> str | None:
    try:
        import litserve
    except ImportError:
        return "LitServe is not installed (pip install 'ganet[bench]')"
    if not litserve.__version__.startswith("0.2"):
        return f"LitServe {litserve.__version__} is installed; this benchmark is written for 0.2"
    return None


def run(levels: tuple[int, ...], rounds: int, duration: float, warmup: float, servers: tuple[str, ...],
        workdir: Path, log: Callable[[str], None] = print, export: Path | None = None) -> dict:
    skipped = {}
    if "litserve" in servers and (why := litserve_missing()):
        skipped["litserve"] = why
        servers = tuple(s for s in servers if s != "litserve")
        log(f"  skipping LitServe: {why}")
    t0 = time.perf_counter()
    if export is None:
        export = bench_serve.make_export(workdir, max_batch=32)[1]
    from ganet.export.manifest import load_manifest

    manifest = load_manifest(export)
    checkpoint = Path(manifest.checkpoint["path"])
    log(f"  export ready in {time.perf_counter() - t0:.0f} s")
    jpeg = bench_serve.china_jpeg(90)
    result: dict = {"levels": list(levels), "rounds": rounds, "duration_s": duration, "warmup_s": warmup,
                    "servers": {}, "skipped": skipped, "image": "sklearn china.jpg 640x427, JPEG q90, multipart",
                    "model": f"{manifest.model} at {manifest.preprocessing.input_size}x"
                             f"{manifest.preprocessing.input_size}, {manifest.num_classes} classes"}
    running: dict[str, TreeServer] = {}
    try:
        for name, (argv, ready) in commands(export, checkpoint, servers).items():
            s = bench_serve.start(name, argv, ready, workdir)
            running[name] = TreeServer(s.name, s.proc, s.port, s.log)
        result["same_answers"] = bench_serve.same_answers(running, jpeg)
        windows: dict[str, dict[int, list[dict]]] = {name: {c: [] for c in levels} for name in running}
        for r in range(rounds):
            for c in levels:
                args = SimpleNamespace(warmup=warmup, duration=duration, body="multipart", generator_processes=1)
                for name, server in running.items():
                    for other in running.values():
                        other.freeze(other is not server)
                    summary = bench_serve.measure(server, jpeg, args, clients=c)
                    windows[name][c].append(summary)
                    log(f"  round {r + 1}/{rounds}, {c:3d} clients, {LABELS[name]:<20} "
                        f"{summary['images_per_s']:7.1f} img/s  p50 {summary['latency_ms']['p50']:7.1f} ms  "
                        f"p99 {summary['latency_ms']['p99']:7.1f} ms")
        for name, by_level in windows.items():
            result["servers"][name] = {str(c): bench_serve.combine(w) for c, w in by_level.items()}
        if "ours" in windows:
            result["ratios"] = {base: {str(c): spread([o["images_per_s"] / b["images_per_s"] for o, b in
                                                       zip(windows["ours"][c], windows[base][c])]) for c in levels}
                                for base in windows if base != "ours"}
    finally:
        for name, server in running.items():
            server.stop()
            result["servers"].setdefault(name, {})["log_tail"] = server.log.read_text()[-1500:]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--levels", type=int, nargs="+", default=list(LEVELS))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duration", type=float, default=4.0, help="measured seconds per window")
    p.add_argument("--warmup", type=float, default=1.5, help="unmeasured seconds of load before each window")
    p.add_argument("--servers", nargs="+", default=list(SERVERS), choices=list(SERVERS))
    p.add_argument("--export", type=Path, help="reuse this export directory (its manifest names its checkpoint)")
    p.add_argument("--output", type=Path, default=Path("benchmarks/results/serve_sweep.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="serve_sweep.") as tmp:
        result = run(tuple(args.levels), args.rounds, args.duration, args.warmup, tuple(args.servers), Path(tmp),
                     export=args.export)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
