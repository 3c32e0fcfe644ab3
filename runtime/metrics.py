"""Prometheus metrics: the engine and servicer fill plain stats; this module exports them.

Each server owns its registry (tests start several servers in one process). Names carry
their unit, per Prometheus conventions.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .requests import RequestOutput
from .stats import StepStats

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_STEP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServiceMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gruserve_requests", "RPCs handled, by method and gRPC status code",
            ["rpc", "code"], registry=r,
        )
        self.ttft = Histogram(
            "gruserve_time_to_first_token_seconds", "Accepted to first token",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.e2e = Histogram(
            "gruserve_request_latency_seconds", "Accepted to finished (engine side)",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.queue_time = Histogram(
            "gruserve_queue_time_seconds", "Accepted to admitted into a slot",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.tokens = Counter(
            "gruserve_generated_tokens", "Tokens generated (aborted requests' included)",
            registry=r,
        )
        self.model = Gauge(
            "gruserve_model_info", "The bundle being served: 1 for its model and version",
            ["model", "bundle_version"], registry=r,
        )
        self.queue_depth = Gauge("gruserve_queue_depth", "Requests waiting for a slot", registry=r)
        self.active_slots = Gauge("gruserve_active_slots", "Decode slots in use", registry=r)
        self.running = Gauge(
            "gruserve_running_requests", "Requests holding decode slots", registry=r
        )
        self.batch_size = Histogram(
            "gruserve_step_batch_size", "Rows per decode step", buckets=_BATCH_BUCKETS, registry=r
        )
        self.step_time = Histogram(
            "gruserve_step_duration_seconds", "Wall time of one decode step (encode included)",
            buckets=_STEP_BUCKETS, registry=r,
        )

    def set_model(self, name: str, version: str) -> None:
        """The bundle being served (an info metric: 1 for the current one only)."""
        self.model.clear()
        self.model.labels(model=name, bundle_version=version).set(1)

    def observe_step(self, stats: StepStats) -> None:
        """Engine observer (decode thread); prometheus_client is thread-safe."""
        self.queue_depth.set(stats.num_waiting)
        self.active_slots.set(stats.num_active_slots)
        self.running.set(stats.num_running)
        if stats.num_tokens:
            self.tokens.inc(stats.num_tokens)
        if stats.batch_size:
            self.batch_size.observe(stats.batch_size)
            self.step_time.observe(stats.step_seconds)

    def observe_finished(self, output: RequestOutput) -> None:
        """A request answered to its client (event-loop thread)."""
        if output.first_token_s is not None:
            self.ttft.observe(output.first_token_s)
        if output.queue_s is not None:
            self.queue_time.observe(output.queue_s)
        if output.total_s is not None:
            self.e2e.observe(output.total_s)

    def count_denied(self, method: str) -> None:
        """An RPC refused by auth; `method` is a known /package.Service/Method path."""
        self.requests.labels(rpc=method.rsplit("/", 1)[-1], code="UNAUTHENTICATED").inc()

    def serve_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Starts the /metrics endpoint; returns the bound port (0 picks a free one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http_server = server
        return server.server_port

    def close(self) -> None:
        server, self._http_server = getattr(self, "_http_server", None), None
        if server is not None:
            server.shutdown()
            server.server_close()
