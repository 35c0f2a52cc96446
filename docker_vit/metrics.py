"""Prometheus metrics, one registry per service so several apps can live in one process (tests, Ray)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
QUEUE_BUCKETS = (0.001, 0.0025, 0.005, *LATENCY_BUCKETS)  # --max-wait-ms is 5 by default
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """What an operator needs to see: traffic, latency, batching, queueing, model time, load time."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("docker_vit_requests", "HTTP requests", ["route", "status"], registry=r)
        self.latency = Histogram(
            "docker_vit_request_seconds", "request latency", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "docker_vit_batch_size", "images per model call", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_seconds = Histogram(
            "docker_vit_queue_seconds",
            "seconds an image waited for its model call, once decoded",
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.model_seconds = Histogram(
            "docker_vit_model_seconds",
            "seconds per model call (a batch)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "docker_vit_queue_depth",
            "images admitted, decoding or queued, not yet in a model call",
            registry=r,
        )
        self.images = Counter("docker_vit_images", "images captioned", registry=r)
        self.load_seconds = Gauge(
            "docker_vit_model_load_seconds", "seconds spent loading the model", registry=r
        )

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def batch_started(self, waits: list[float]) -> None:
        """A model call starts with one image per wait: its size, and how long each image queued."""
        self.batch_size.observe(len(waits))
        for seconds in waits:
            self.queue_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
