"""Prometheus metrics: the engine and servicer fill plain stats; this module exports them.

Each server owns its registry (tests start several servers in one process). Names follow
Prometheus conventions: a `gruserve_` prefix, base units in the name (`_seconds`), `_total`
on counters only, `_info` for the constant-1 gauges that carry labels. docs/metrics.md lists
every series (a test checks the list against a scrape).

The model and bundle version are labels of `gruserve_model_info` only, not of every series:
one process serves one model, and Prometheus joins labels from an info metric
(`... * on(instance) group_left(model, bundle_version) gruserve_model_info`).
"""

from __future__ import annotations

import logging
import socket
import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from gruserve import __version__

from .requests import FinishReason, RequestOutput
from .result_cache import CacheStats, ResultCache
from .stats import StepStats

log = logging.getLogger(__name__)

# `_created` series (a counter's creation time) double the series count for no use here
disable_created_metrics()

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_STEP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# close() waits for the serving loop to notice, and a shutdown must fit in its grace period:
# prometheus_client's own start_http_server polls every 0.5 s
_POLL_S = 0.05


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        """Scrapes are not logged."""


class ServiceMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        ProcessCollector(registry=r)
        GCCollector(registry=r)
        PlatformCollector(registry=r)
        Gauge(
            "gruserve_build_info", "The gruserve release serving: 1 for its version",
            ["version"], registry=r,
        ).labels(version=__version__).set(1)
        self.model = Gauge(
            "gruserve_model_info", "The bundle being served: 1 for its model and version",
            ["model", "bundle_version"], registry=r,
        )
        self.requests = Counter(
            "gruserve_requests", "RPCs handled, by method and gRPC status code",
            ["rpc", "code"], registry=r,
        )
        self.finished = Counter(
            "gruserve_finished_requests", "Engine requests finished, by finish reason",
            ["finish_reason"], registry=r,
        )
        self.tokens = Counter(
            "gruserve_generated_tokens", "Tokens generated (aborted requests' included)",
            registry=r,
        )
        self.queue_time = Histogram(
            "gruserve_queue_time_seconds", "Accepted to admitted into a slot",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "gruserve_time_to_first_token_seconds", "Accepted to first token",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.itl = Histogram(
            "gruserve_inter_token_latency_seconds",
            "Per request: mean time between consecutive tokens (requests of 2+ tokens)",
            buckets=_STEP_BUCKETS + (0.5, 1), registry=r,
        )
        self.e2e = Histogram(
            "gruserve_request_latency_seconds", "Accepted to finished (engine side)",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.request_tokens = Histogram(
            "gruserve_request_generated_tokens", "Tokens generated per finished request",
            buckets=_TOKEN_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge("gruserve_queue_depth", "Requests waiting for a slot", registry=r)
        self.queue_capacity = Gauge(
            "gruserve_queue_capacity", "Requests that may wait before RESOURCE_EXHAUSTED",
            registry=r,
        )
        self.active_slots = Gauge("gruserve_active_slots", "Decode slots in use", registry=r)
        self.slot_capacity = Gauge(
            "gruserve_slot_capacity", "Decode slots in the state pool", registry=r
        )
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

        self.fallbacks = Counter(
            "gruserve_entity_fallbacks",
            "Unknown users / items conditioned on the fallback embedding (--unknown-entities "
            "fallback): one per request of Generate*, one per pair of PredictRatings",
            ["side"], registry=r,
        )
        for side in ("user", "item"):  # both series exist from the start, at 0
            self.fallbacks.labels(side=side)
        self.rated_pairs = Counter(
            "gruserve_rated_pairs", "(user, item) pairs rated by PredictRatings", registry=r
        )

    def watch_cache(self, cache: ResultCache) -> None:
        """Exports the result cache's stats (read at scrape time)."""
        self.registry.register(_CacheCollector(cache.stats))

    def count_fallbacks(self, *, users: int, items: int) -> None:
        if users:
            self.fallbacks.labels(side="user").inc(users)
        if items:
            self.fallbacks.labels(side="item").inc(items)

    def set_model(self, name: str, version: str) -> None:
        """The bundle being served (an info metric: 1 for the current one only)."""
        self.model.clear()
        self.model.labels(model=name, bundle_version=version).set(1)

    def set_capacity(self, *, num_slots: int, max_queued: int) -> None:
        self.slot_capacity.set(num_slots)
        self.queue_capacity.set(max_queued)

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
        self.finished.labels(finish_reason=output.finish_reason.value).inc()
        num_tokens = len(output.token_ids or ())
        self.request_tokens.observe(num_tokens)
        if output.first_token_s is not None:
            self.ttft.observe(output.first_token_s)
            if num_tokens >= 2 and output.total_s is not None:
                self.itl.observe((output.total_s - output.first_token_s) / (num_tokens - 1))
        if output.queue_s is not None:
            self.queue_time.observe(output.queue_s)
        if output.total_s is not None:
            self.e2e.observe(output.total_s)

    def count_aborted(self, num_requests: int = 1) -> None:
        """Requests that ended early (client cancel, deadline, shutdown): no latency."""
        if num_requests:
            self.finished.labels(finish_reason=FinishReason.ABORTED.value).inc(num_requests)

    def serve_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Starts the /metrics endpoint; returns the bound port (0 picks a free one)."""
        try:
            server = self._http_server_on(host, port)
        except OSError as exc:
            address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise OSError(
                f"cannot serve metrics on {address} (--metrics-host, --metrics-port): "
                f"{exc.strerror or exc}"
            ) from None
        threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": _POLL_S},
            name="gruserve-metrics", daemon=True,
        ).start()
        self._http_server = server
        return server.server_port

    def _http_server_on(self, host: str, port: int) -> ThreadingWSGIServer:
        # an IPv6 host needs an IPv6 socket (the server class decides which)
        family = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0][0]
        server_class = type("MetricsServer", (ThreadingWSGIServer,), {"address_family": family})
        return make_server(
            host, port, make_wsgi_app(self.registry), server_class, handler_class=_QuietHandler
        )

    def close(self) -> None:
        server, self._http_server = getattr(self, "_http_server", None), None
        if server is not None:
            server.shutdown()
            server.server_close()


class _CacheCollector(Collector):
    """The result cache's counters and gauges, from its plain stats."""

    def __init__(self, stats: CacheStats) -> None:
        self._stats = stats

    def collect(self):
        s = self._stats
        for name, doc, value in (
            ("hits", "Requests answered from the result cache", s.hits),
            ("misses", "Cacheable requests not in the result cache (then decoded)", s.misses),
            ("evictions", "Answers dropped from the result cache to stay in its bounds",
             s.evictions),
        ):
            yield CounterMetricFamily(f"gruserve_cache_{name}", doc, value=value)
        yield GaugeMetricFamily("gruserve_cache_entries", "Answers in the result cache",
                                value=s.entries)
        yield GaugeMetricFamily("gruserve_cache_bytes",
                                "Estimated bytes held by the result cache", value=s.bytes)
