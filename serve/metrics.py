"""Prometheus metrics, in a registry of the app's own (two apps in one process never collide).

With ``PROMETHEUS_MULTIPROC_DIR`` set (``ganet-serve --frontends``: a model owner and N front-end processes), every
process writes its samples to files in that directory and ``registry`` aggregates them (prometheus_client's
multiprocess mode): counters and histograms summed, the gauges from the owner, the only process that sets them.
"""
from __future__ import annotations

import os
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.multiprocess import MultiProcessCollector

__all__ = ["Metrics"]

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self._tracked: list[tuple[Gauge, Callable[[], float]]] = []  # multiprocess mode: set by refresh()
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        if self.multiprocess:
            # prometheus_client picks its value class when first imported; the supervisor sets the directory later.
            if values.ValueClass is values.MutexValue:
                values.ValueClass = values.get_value_class()
            r = CollectorRegistry()  # the metrics register here; what /metrics serves is the aggregate of the files
            self.registry.register(_Refresh(self))
            MultiProcessCollector(self.registry)
        self.requests = Counter("ganet_requests", "HTTP requests by route template and status", ["route", "status"],
                                registry=r)
        self.request_seconds = Histogram("ganet_request_seconds", "HTTP request latency, end to end", ["route"],
                                         buckets=_LATENCY, registry=r)
        self.queue_seconds = Histogram("ganet_queue_seconds", "per image: enqueued -> its batch starts",
                                       buckets=_LATENCY, registry=r)
        self.decode_seconds = Histogram("ganet_decode_seconds", "per image: decode + resize + crop",
                                        buckets=_LATENCY, registry=r)
        self.inference_seconds = Histogram("ganet_inference_seconds", "per batch: the backend call",
                                           buckets=_LATENCY, registry=r)
        self.batch_size = Histogram("ganet_batch_size", "images per backend call",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128), registry=r)
        self.queue_depth = Gauge("ganet_queue_depth", "images waiting for inference", registry=r,
                                 multiprocess_mode="livesum")
        self.images = Counter("ganet_images", "images run through the backend", registry=r)
        self.connections = Gauge("ganet_connections", "open client connections", registry=r,
                                 multiprocess_mode="livesum")  # summed over the front ends of --frontends
        self.connections_closed = Counter("ganet_connections_closed", "connections the server closed or refused "
                                          "by policy: header_timeout, evicted_idle, connection_cap", ["reason"],
                                          registry=r)
        self.decode_images = Counter("ganet_decode_images", "images decoded, by path (cpu, gpu) and why that path "
                                     "(--decode gpu: jpeg on the GPU; format, mode, filter, nvjpeg on the CPU)",
                                     ["path", "reason"], registry=r)
        self.gpu_memory = Gauge("ganet_gpu_memory_bytes", "GPU memory in use (only where the backend has a GPU)",
                                registry=r, multiprocess_mode="livemax")

    def on_batch(self, batch_size: int, inference_s: float, queue_s: list[float]) -> None:
        self.batch_size.observe(batch_size)
        self.inference_seconds.observe(inference_s)
        self.images.inc(batch_size)
        for q in queue_s:
            self.queue_seconds.observe(q)
        if self._tracked:
            self.refresh()

    def track_queue(self, depth: Callable[[], float]) -> None:
        self._track(self.queue_depth, depth)

    def track_gpu(self, used_bytes: Callable[[], float]) -> None:
        self._track(self.gpu_memory, used_bytes)

    def _track(self, gauge: Gauge, read: Callable[[], float]) -> None:
        if self.multiprocess:  # a function gauge lives in one process's memory; the files need values
            self._tracked.append((gauge, read))
        else:
            gauge.set_function(read)

    def refresh(self) -> None:
        """Multiprocess mode: write the tracked gauges' current values (after every batch, and before a scrape)."""
        for gauge, read in self._tracked:
            gauge.set(read())


class _Refresh:
    """A collector that yields nothing: it refreshes the tracked gauges before the files are read."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> list:
        self.metrics.refresh()
        return []
