"""Prometheus metrics, in a registry of the app's own (two apps in one process never collide)."""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
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
        self.queue_depth = Gauge("ganet_queue_depth", "images waiting for inference", registry=r)
        self.images = Counter("ganet_images", "images run through the backend", registry=r)
        self.connections = Gauge("ganet_connections", "open client connections", registry=r)
        self.connections_closed = Counter("ganet_connections_closed", "connections the server closed or refused "
                                          "by policy: header_timeout, evicted_idle, connection_cap", ["reason"],
                                          registry=r)
        self.decode_images = Counter("ganet_decode_images", "images decoded, by path (cpu, gpu) and why that path "
                                     "(--decode gpu: jpeg on the GPU; format, mode, filter, nvjpeg on the CPU)",
                                     ["path", "reason"], registry=r)
        self.gpu_memory = Gauge("ganet_gpu_memory_bytes", "GPU memory in use (only where the backend has a GPU)",
                                registry=r)

    def on_batch(self, batch_size: int, inference_s: float, queue_s: list[float]) -> None:
        self.batch_size.observe(batch_size)
        self.inference_seconds.observe(inference_s)
        self.images.inc(batch_size)
        for q in queue_s:
            self.queue_seconds.observe(q)

    def track_queue(self, depth: Callable[[], float]) -> None:
        self.queue_depth.set_function(depth)

    def track_gpu(self, used_bytes: Callable[[], float]) -> None:
        self.gpu_memory.set_function(used_bytes)
