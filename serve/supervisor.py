"""``ganet-serve --frontends N``: one process owns the model, N processes serve HTTP.

The supervisor (the process ``ganet-serve`` started) binds the port, loads and warms the backends and runs the
dynamic batcher and its inference threads (``ganet.serve.owner``). N front-end processes (``ganet.serve.frontend``)
accept on that one socket, parse and decode requests with their own interpreter lock, and hand the uint8 images to
the owner through a ring of shared-memory slots (``ganet.serve.shm_ring``), so that batches stay large, the device
has one owner (one CUDA context, one queue), and no single Python process is the limit on HTTP and decoding.

* Readiness: /v2/health/ready turns 200 only when the owner is warm and every front end has started.
* /metrics: prometheus_client's multiprocess mode, in a private directory removed at exit.
* A front end that dies is restarted (its in-flight requests are lost; the others carry on); more than
  RESTART_LIMIT deaths within RESTART_WINDOW_S is a crash loop: the service drains and exits with status 1.
* SIGTERM/SIGINT: the listening socket closes, every front end drains for --grace-s, then the owner finishes its
  queue and exits; no process and no /dev/shm segment is left behind. Status 0.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import deque
from multiprocessing.connection import wait

from ganet.serve.backends import Backend, ModelSpec
from ganet.serve.settings import ServeSettings
from ganet.system import usable_cpus

__all__ = ["run_supervisor", "resolve_frontends", "RESTART_LIMIT", "RESTART_WINDOW_S"]

log = logging.getLogger("ganet.serve")

RESTART_LIMIT, RESTART_WINDOW_S = 5, 60.0
STOP_MARGIN_S = 5.0  # beyond --drain-delay-s + --grace-s: a front end's own shutdown after its drain (lifespan, exit)


def resolve_frontends(settings: ServeSettings, backend: Backend) -> int:
    """--frontends, or its default: 0 (one process) where the model runs on the CPU, whose cores the inference
    threads already use; on a GPU, one front end per two usable CPUs, 2 to 8, so that HTTP and decoding scale
    with the host while one process keeps the device."""
    if settings.frontends is not None:
        return settings.frontends
    if backend.device in ("cpu", "CPUExecutionProvider"):
        return 0
    return min(8, max(2, usable_cpus() // 2))


def run_supervisor(settings: ServeSettings, backends: list[Backend], spec: ModelSpec, frontends: int,
                   listener: socket.socket) -> int:
    """Serve on ``listener`` (bound: ``ganet.serve.cli.bind``) until SIGTERM/SIGINT; the exit status (0 clean, 1
    front ends crash-looping, 2 cannot serve)."""
    from ganet.serve.cli import LISTEN_BACKLOG
    from ganet.serve.shm_ring import ImageRing, ShmSpaceError, slots_per_frontend

    def refuse(message: str) -> int:
        print(f"ganet-serve: error: {message}", file=sys.stderr)
        for backend in backends:
            backend.close()
        return 2

    listener.listen(LISTEN_BACKLOG)  # connections wait in the backlog until a front end accepts
    slots = slots_per_frontend(settings.queue_size, frontends, spec.max_batch * len(backends))
    try:
        ring = ImageRing.create(frontends * slots, spec.input_shape)
    except ShmSpaceError as e:
        listener.close()
        return refuse(str(e))
    metrics_dir = tempfile.mkdtemp(prefix="ganet-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # before any Metrics(); inherited by the front ends
    try:
        return _Supervisor(settings, backends, spec, frontends, slots, listener, ring, metrics_dir).run()
    finally:
        listener.close()
        ring.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


class _Supervisor:
    def __init__(self, settings: ServeSettings, backends: list[Backend], spec: ModelSpec, frontends: int,
                 slots: int, listener: socket.socket, ring, metrics_dir: str) -> None:
        from ganet.serve.owner import ModelOwner

        self.settings, self.spec, self.frontends, self.slots = settings, spec, frontends, slots
        self.listener, self.ring, self.metrics_dir = listener, ring, metrics_dir
        self.owner = ModelOwner(settings, backends, spec, ring, frontends, slots)
        self.backend = backends[0]
        self.context = multiprocessing.get_context("spawn")  # a fresh interpreter: no threads or locks forked
        self.processes: dict[int, multiprocessing.process.BaseProcess] = {}
        self.deaths: deque[float] = deque()
        self.signal: int | None = None
        self.warm_error: BaseException | None = None
        # Each front end decodes with its share of the CPUs unless --workers-decode says otherwise.
        if "workers_decode" in settings.model_fields_set:
            self.frontend_settings = settings
        else:
            self.frontend_settings = settings.model_copy(
                update={"workers_decode": max(1, usable_cpus() // frontends)})

    def run(self) -> int:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        old_wakeup = signal.set_wakeup_fd(wake_w)
        try:
            log.info("front ends", extra={"event": "frontends", "frontends": self.frontends,
                                          "slots_per_frontend": self.slots, "shm": self.ring.name,
                                          "shm_bytes": self.ring.nbytes, "metrics_dir": self.metrics_dir,
                                          "workers_decode": self.frontend_settings.workers_decode})
            warm = threading.Thread(target=self._warm_up, name="ganet-warmup", daemon=True)
            warm.start()  # the front ends import and start meanwhile
            for index in range(self.frontends):
                self._start_frontend(index)
            status = self._watch(wake_r, warm)
            self._stop(warm)
            return status
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(wake_r)
            os.close(wake_w)

    def _on_signal(self, signum: int, frame) -> None:
        self.signal = signum

    def _warm_up(self) -> None:
        try:
            self.owner.warm_up()
        except BaseException as e:  # reported by _watch, which stops the service
            self.warm_error = e

    def _start_frontend(self, index: int) -> None:
        from ganet.serve.frontend import FrontendConfig, run_frontend

        cfg = FrontendConfig(index, self.frontend_settings, self.spec, self.backend.name, self.backend.device,
                             self.ring.name, self.ring.count, index * self.slots, self.slots)
        theirs = self.owner.connect(index)
        process = self.context.Process(target=run_frontend, args=(cfg, self.listener, theirs),
                                       name=f"ganet-frontend-{index}", daemon=True)
        process.start()
        theirs.close()  # the child has its copy: when it dies, the owner's reader sees end of file
        self.processes[index] = process

    def _watch(self, wake_r: int, warm: threading.Thread) -> int:
        """Until a signal: restart front ends that die; the exit status if the service cannot go on."""
        while self.signal is None:
            sentinels = {p.sentinel: i for i, p in self.processes.items()}
            ready = wait([wake_r, *sentinels], timeout=0.5)
            if wake_r in ready:
                os.read(wake_r, 512)
            if self.warm_error is not None:
                log.error("warm-up failed", extra={"event": "warmup_failed", "error": repr(self.warm_error)})
                return 2
            for sentinel in ready:
                if sentinel in sentinels and self.signal is None:
                    if not self._restart(sentinels[sentinel]):
                        return 1
        log.info("draining", extra={"event": "draining", "signal": signal.Signals(self.signal).name,
                                    "grace_s": self.settings.grace_s})
        return 0

    def _restart(self, index: int) -> bool:
        from prometheus_client import multiprocess

        process = self.processes[index]
        process.join()
        multiprocess.mark_process_dead(process.pid, self.metrics_dir)  # its gauges; its counters still count
        now = time.monotonic()
        self.deaths.append(now)
        while self.deaths and self.deaths[0] < now - RESTART_WINDOW_S:
            self.deaths.popleft()
        if len(self.deaths) > RESTART_LIMIT:
            log.error("front ends keep dying", extra={"event": "crash_loop", "frontend": index,
                                                      "exitcode": process.exitcode, "deaths": len(self.deaths),
                                                      "window_s": RESTART_WINDOW_S})
            return False
        log.error("front end died; restarting it", extra={"event": "frontend_restart", "frontend": index,
                                                          "exitcode": process.exitcode, "pid": process.pid})
        self._start_frontend(index)
        return True

    def _stop(self, warm: threading.Thread) -> None:
        """Stop accepting, let every front end drain (--grace-s), then the owner; SIGKILL whatever overstays."""
        self.listener.close()  # the port closes once the front ends close their copies too
        for process in self.processes.values():
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
        deadline = (time.monotonic() + self.settings.drain_delay_s + self.settings.grace_s + STOP_MARGIN_S)
        for index, process in self.processes.items():
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.error("front end did not stop in time; killing it", extra={"event": "frontend_killed",
                                                                                "frontend": index})
                process.kill()
                process.join()
        warm.join()  # a warm-up in progress cannot be interrupted; it is short
        self.owner.close(self.settings.grace_s)
        log.info("stopped", extra={"event": "shutdown", "frontends": self.frontends})
