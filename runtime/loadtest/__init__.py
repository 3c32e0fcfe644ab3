"""The load-test harness: drives a gruserve server over gRPC and reports what clients see.

Two ways to apply load (see docs/loadtest.md):

- closed loop (`concurrency`): N workers, each sends its next request as soon as its previous
  one ends. It measures service time at a fixed number of requests in flight, but a slow
  server slows the senders down with it, so it hides queueing (coordinated omission).
- open loop (`rate`): arrival times are drawn in advance (a Poisson process, or gamma gaps
  for bursts) and each request is sent at its time whatever the server is doing. Latency
  counts from the SCHEDULED time, so queueing in the server - or a harness that falls
  behind - shows in the figures instead of disappearing.

Pure asyncio and the gruserve client; no torch, no numpy in the hot path.

The generator, shapes, lengths and results import without the gRPC client (loaded on first
use of a name that needs it): bench/ drives other servers with them from an environment
whose protobuf cannot load gruserve's generated code.
"""

import importlib

from .generator import Caller, LoadGenerator, LoadRun, ProgressSnapshot
from .lengths import LengthDistribution, LengthSequence
from .result import (
    METRICS,
    LoadTestResult,
    Threshold,
    build_result,
    check_thresholds,
    parse_thresholds,
)
from .scrape import metric_deltas, metrics_url, scrape_metrics
from .shape import LoadShape, Warmup, arrival_gaps, arrival_times
from .stats import CLIENT_ERROR, OK, ItemTiming, RequestRecord, Summary, percentile

# name -> submodule, for the names that need the gRPC client (and so gruserve's protobuf code)
_NEEDS_GRPC = {
    **dict.fromkeys(
        ("GrpcBatchCaller", "GrpcCaller", "RequestMix", "read_entities", "read_pairs"), "mix"
    ),
    **dict.fromkeys(("LoadTestConfig", "LoadTestError", "run_loadtest"), "run"),
}


def __getattr__(name: str):
    if name in _NEEDS_GRPC:
        return getattr(importlib.import_module(f".{_NEEDS_GRPC[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CLIENT_ERROR",
    "METRICS",
    "OK",
    "Caller",
    "GrpcBatchCaller",
    "GrpcCaller",
    "ItemTiming",
    "LengthDistribution",
    "LengthSequence",
    "LoadGenerator",
    "LoadRun",
    "LoadShape",
    "LoadTestConfig",
    "LoadTestError",
    "LoadTestResult",
    "ProgressSnapshot",
    "RequestMix",
    "RequestRecord",
    "Summary",
    "Threshold",
    "Warmup",
    "arrival_gaps",
    "arrival_times",
    "build_result",
    "check_thresholds",
    "metric_deltas",
    "metrics_url",
    "parse_thresholds",
    "percentile",
    "read_entities",
    "read_pairs",
    "run_loadtest",
    "scrape_metrics",
]
