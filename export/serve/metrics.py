"""Prometheus metrics of the caption server (GET /metrics), in a registry of its own per app.

    sat_requests_total{status}                 requests answered, by HTTP status
    sat_images_total                           images captioned
    sat_batch_size                             histogram: images per batched beam search
    sat_batch_seconds                          histogram: time of one batched beam search (worker thread)
    sat_queue_depth                            gauge: images waiting for the worker
    sat_requests_in_flight                     gauge: HTTP requests received and not yet answered
    sat_request_latency_seconds{endpoint}      histogram: time from request to response

A private registry (not the global one) lets several apps live in one process (tests) without clashes.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("sat_requests", "HTTP requests answered, by status", ["status"], registry=r)
        self.images = Counter("sat_images", "images captioned", registry=r)
        self.batch_size = Histogram("sat_batch_size", "images per batched beam search", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.batch_seconds = Histogram("sat_batch_seconds", "seconds of one batched beam search",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("sat_queue_depth", "images waiting for the worker thread", registry=r)
        self.in_flight = Gauge("sat_requests_in_flight", "HTTP requests received and not yet answered", registry=r)
        self.latency = Histogram("sat_request_latency_seconds", "seconds from request to response", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)

    def on_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
        self.images.inc(size)

    def on_depth(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def parse_histogram(text: str, name: str) -> tuple[float, float]:
    """(count, sum) of an unlabelled histogram in Prometheus text; (0, 0) when absent (bench/serve_load.py)."""
    count = total = 0.0
    for line in text.splitlines():
        if line.startswith(f"{name}_count "):
            count = float(line.split()[1])
        elif line.startswith(f"{name}_sum "):
            total = float(line.split()[1])
    return count, total
