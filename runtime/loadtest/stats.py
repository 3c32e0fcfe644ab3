"""What happened to one request, and latency statistics over many."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

OK = "OK"
# an exception that is not a gRPC status (a harness bug, a broken connection object)
CLIENT_ERROR = "CLIENT_ERROR"


# --- one request -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ItemTiming:
    """The server's timing of one item of a GenerateBatch call (milliseconds)."""

    ttft_ms: float
    queue_ms: float
    total_ms: float


@dataclass(slots=True, eq=False)
class RequestRecord:
    """What happened to one request - or one GenerateBatch call of `num_items` requests,
    which succeed or fail together; times are time.monotonic() seconds."""

    index: int
    warmup: bool
    scheduled_s: float | None = None  # open loop: when it was due
    sent_s: float = 0.0
    done_s: float = 0.0
    code: str = ""
    num_tokens: int = 0
    chunk_s: list[float] = field(default_factory=list)  # streaming: arrival of each message
    server_ttft_ms: float | None = None
    server_queue_ms: float | None = None
    server_total_ms: float | None = None
    num_items: int = 1  # GenerateBatch: requests in the call; num_tokens is their sum
    items: list[ItemTiming] = field(default_factory=list)  # GenerateBatch: one per item

    @property
    def start_s(self) -> float:
        """Where latency counts from: the scheduled time in open loop, else the send time."""
        return self.sent_s if self.scheduled_s is None else self.scheduled_s

    @property
    def ok(self) -> bool:
        return self.code == OK


# --- statistics --------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks (numpy's
    default). `sorted_values` must be sorted and non-empty."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError("q must be in 0..100")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass(frozen=True)
class Summary:
    """Distribution of one latency, in milliseconds."""

    count: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    min_ms: float

    @classmethod
    def of(cls, values_ms: Sequence[float]) -> Summary | None:
        if not values_ms:
            return None
        v = sorted(values_ms)
        return cls(
            count=len(v), mean_ms=math.fsum(v) / len(v), p50_ms=percentile(v, 50),
            p90_ms=percentile(v, 90), p99_ms=percentile(v, 99), max_ms=v[-1], min_ms=v[0],
        )
