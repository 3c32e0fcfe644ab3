"""The load shape: closed or open loop, warm-up, and the open-loop arrival schedule."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

# --- load shape --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Warmup:
    """Leading traffic sent but excluded from every figure: a time span or a request count."""

    seconds: float = 0.0
    requests: int = 0

    @classmethod
    def parse(cls, text: str) -> Warmup:
        """'2s', '1.5s', '500ms' -> seconds; '100' -> requests; '0' -> none."""
        text = text.strip().lower()
        try:
            if text.endswith("ms"):
                return cls(seconds=float(text[:-2]) / 1e3)._checked()
            if text.endswith("s"):
                return cls(seconds=float(text[:-1]))._checked()
            return cls(requests=int(text))._checked()
        except ValueError:
            raise ValueError(
                f"warm-up {text!r}: give seconds ('2s', '500ms') or a request count ('100')"
            ) from None

    def _checked(self) -> Warmup:
        if not (self.seconds >= 0 and math.isfinite(self.seconds)) or self.requests < 0:
            raise ValueError("negative warm-up")
        return self

    def __str__(self) -> str:
        return f"{self.requests} requests" if self.requests else f"{self.seconds:g} s"


@dataclass(frozen=True)
class LoadShape:
    """How much load, for how long. Exactly one of concurrency/rate, one of duration/requests."""

    concurrency: int | None = None  # closed loop: requests in flight
    rate: float | None = None  # open loop: mean arrivals per second
    burst: float = 1.0  # open loop: squared coefficient of variation of the gaps (1 = Poisson)
    duration_s: float | None = None
    num_requests: int | None = None
    warmup: Warmup = Warmup()
    # open loop: the most requests in flight; past it sending waits (and shows as send lag)
    max_in_flight: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("give exactly one of concurrency (closed loop) or rate (open loop)")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError("rate must be a positive number of requests per second")
        if not (self.burst >= 0 and math.isfinite(self.burst)):
            raise ValueError("burst must be >= 0 (1 = Poisson, 0 = evenly spaced)")
        if (self.duration_s is None) == (self.num_requests is None):
            raise ValueError("give exactly one of duration or a number of requests")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError("duration must be > 0")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError("number of requests must be >= 1")
        if self.max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")

    @property
    def mode(self) -> str:
        return "closed" if self.concurrency is not None else "open"


def arrival_gaps(rate: float, burst: float = 1.0, seed: int = 0) -> Iterator[float]:
    """Endless inter-arrival gaps (seconds) with mean 1/rate.

    The gaps are gamma distributed with shape 1/burst, so `burst` is their squared
    coefficient of variation: 1 gives exponential gaps (a Poisson process), > 1 clusters
    arrivals into bursts separated by lulls at the same mean rate, 0 spaces them evenly.
    (vLLM's `--burstiness` is 1/burst.)
    """
    mean = 1.0 / rate
    if burst == 0:
        while True:
            yield mean
    rng = random.Random(seed)
    if burst == 1:
        while True:
            yield rng.expovariate(rate)
    shape, scale = 1.0 / burst, mean * burst
    while True:
        yield rng.gammavariate(shape, scale)


def arrival_times(
    rate: float,
    *,
    burst: float = 1.0,
    seed: int = 0,
    count: int | None = None,
    horizon_s: float | None = None,
) -> list[float]:
    """Arrival offsets from 0: the first `count`, or all before `horizon_s`."""
    if count is None and horizon_s is None:
        raise ValueError("give count or horizon_s")
    times: list[float] = []
    t = 0.0
    for gap in arrival_gaps(rate, burst, seed):
        t += gap
        if count is not None and len(times) >= count:
            break
        if horizon_s is not None and t >= horizon_s:
            break
        times.append(t)
    return times
