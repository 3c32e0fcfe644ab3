"""The result of a run (figures by name) and --fail-if thresholds over them."""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from .generator import LoadRun
from .shape import LoadShape
from .stats import Summary

# --- the result --------------------------------------------------------------------------------

_SUMMARIES = {
    "": "end-to-end latency of successful requests (from the scheduled time in open loop)",
    "ttft_": "time to first token (streaming: first message, client side; unary: server ttft_ms)",
    "itl_": "streaming: gap between consecutive messages of a response",
    "server_": "server-reported total_ms (accepted -> finished)",
    "queue_": "server-reported queue_ms (accepted -> admitted into a decode slot)",
    "send_lag_": "open loop: how late the harness sent after the scheduled time",
    "call_": "GenerateBatch: latency of whole calls (the end-to-end figures are per item)",
}
_STATS = ("p50", "p90", "p99", "max", "mean")

METRICS: dict[str, str] = {
    "sent": "measured requests sent (warm-up excluded; GenerateBatch: items)",
    "succeeded": "measured requests answered OK",
    "failed": "measured requests that ended with a non-OK status",
    "error_rate": "failed / sent (0..1)",
    "rps": "successful completions per second inside the measured window",
    "tokens_per_s": "tokens of the successful completions inside the measured window, per second",
    "tokens_per_request": "mean tokens per successful response",
    "offered_rps": "open loop: the rate asked for (GenerateBatch: calls per second)",
    "scheduled_rps": "open loop: arrivals per second actually scheduled in the measured window",
    "rate_ratio": "open loop: rps / scheduled_rps (below 1: the server did not keep up)",
    "harness_cpu_cores": "CPU the harness itself used while sending, in cores",
    "calls_per_s": "GenerateBatch: successful calls per second inside the measured window",
    **{f"{p}{s}_ms": f"{s} of the {d}" for p, d in _SUMMARIES.items() for s in _STATS},
}


@dataclass
class LoadTestResult:
    target: str
    mode: str  # "closed" | "open"
    stream: bool
    concurrency: int | None
    offered_rps: float | None
    burst: float | None
    # the measured window: end of the warm-up -> + duration (or, with a request count, the
    # last measured completion); throughput counts the completions inside it
    window_s: float
    num_sent: int
    num_succeeded: int
    num_failed: int
    errors: dict[str, int]  # status code name -> count, OK excluded
    num_warmup: int  # requests sent during warm-up, excluded from everything else
    num_tokens: int  # in the successful measured responses
    throughput_rps: float
    tokens_per_s: float
    scheduled_rps: float | None
    latency: Summary | None
    ttft: Summary | None
    ttft_source: str  # "client" (streaming) or "server" (unary: the server's ttft_ms)
    itl: Summary | None
    server_total: Summary | None
    server_queue: Summary | None
    send_lag: Summary | None
    num_in_flight_waits: int = 0
    # GenerateBatch: requests per call, calls sent and answered in the window, call latency;
    # every other count and figure is per item (request)
    batch_size: int | None = None
    num_calls: int = 0
    calls_per_s: float | None = None
    call_latency: Summary | None = None
    lengths: str = ""  # the --lengths distribution, if any
    # CPU the harness process used while sending (all threads), in cores: on a small machine
    # this is taken from the server under test
    harness_cpu_cores: float | None = None
    mix: str = ""
    decoding: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    server_metrics: dict[str, float] | None = None
    started_at: str = ""

    @property
    def rate_ratio(self) -> float | None:
        """Open loop: achieved / scheduled arrivals (the Poisson draw, not the nominal rate,
        so that a short run's sampling noise is not mistaken for a server falling behind)."""
        arrivals = self.scheduled_rps or self.offered_rps
        return self.throughput_rps / arrivals if arrivals else None

    @property
    def error_rate(self) -> float:
        return self.num_failed / self.num_sent if self.num_sent else 0.0

    def metrics(self) -> dict[str, float | None]:
        """Flat figures by the names --fail-if accepts (see METRICS)."""
        out: dict[str, float | None] = {
            "sent": self.num_sent, "succeeded": self.num_succeeded, "failed": self.num_failed,
            "error_rate": self.error_rate, "rps": self.throughput_rps,
            "tokens_per_s": self.tokens_per_s,
            "tokens_per_request": (
                self.num_tokens / self.num_succeeded if self.num_succeeded else None
            ),
            "offered_rps": self.offered_rps, "scheduled_rps": self.scheduled_rps,
            "rate_ratio": self.rate_ratio,
            "harness_cpu_cores": self.harness_cpu_cores,
            "calls_per_s": self.calls_per_s,
        }
        for prefix, summary in (
            ("", self.latency), ("ttft_", self.ttft), ("itl_", self.itl),
            ("server_", self.server_total), ("queue_", self.server_queue),
            ("send_lag_", self.send_lag), ("call_", self.call_latency),
        ):
            for stat in _STATS:
                out[f"{prefix}{stat}_ms"] = (
                    None if summary is None else getattr(summary, f"{stat}_ms")
                )
        return out

    def to_dict(self) -> dict:
        data = asdict(self)
        data["error_rate"] = self.error_rate
        data["rate_ratio"] = self.rate_ratio
        data["metrics"] = self.metrics()
        return data


def build_result(
    run: LoadRun,
    shape: LoadShape,
    *,
    target: str = "",
    stream: bool = False,
    batch_size: int | None = None,
    **extra,
) -> LoadTestResult:
    """Figures per request; a GenerateBatch call counts as its items (each with the call's
    latency, as its caller waits for the whole call), and its own figures are the call_*."""
    measured = run.measured
    ok = [r for r in measured if r.ok]
    errors: Counter = Counter()
    for r in measured:
        if not r.ok:
            errors[r.code] += r.num_items
    errors = dict(sorted(errors.items()))
    # Latency covers the requests started after the warm-up; throughput counts what the
    # server completed inside the measured window, whichever phase sent it. (Counting only
    # measured requests would charge the window with the warm-up requests still being served
    # at its start: at high concurrency and long latency that halves the figure.)
    start = run.measure_start_s
    if shape.duration_s is not None:
        end = start + shape.duration_s
    else:
        end = max((r.done_s for r in measured), default=start)
    window = max(end - start, 1e-9)
    done_in_window = [r for r in run.records if r.ok and start < r.done_s <= end]
    num_tokens = sum(r.num_tokens for r in ok)
    num_sent = sum(r.num_items for r in measured)
    num_ok = sum(r.num_items for r in ok)
    if stream:
        ttft = Summary.of([(r.chunk_s[0] - r.start_s) * 1e3 for r in ok if r.chunk_s])
        gaps = [
            (b - a) * 1e3 for r in ok for a, b in itertools.pairwise(r.chunk_s)
        ]
        itl = Summary.of(gaps)
    else:
        ttft = Summary.of(_server_ms(ok, "ttft_ms"))
        itl = None
    scheduled = None
    if shape.mode == "open" and run.arrival_span_s:
        scheduled = num_sent / run.arrival_span_s  # requests (items), like throughput_rps
    return LoadTestResult(
        target=target, mode=shape.mode, stream=stream, concurrency=shape.concurrency,
        offered_rps=shape.rate, burst=shape.burst if shape.mode == "open" else None,
        window_s=window, num_sent=num_sent, num_succeeded=num_ok,
        num_failed=num_sent - num_ok, errors=errors,
        num_warmup=sum(r.num_items for r in run.records) - num_sent, num_tokens=num_tokens,
        throughput_rps=sum(r.num_items for r in done_in_window) / window,
        tokens_per_s=sum(r.num_tokens for r in done_in_window) / window,
        scheduled_rps=scheduled,
        latency=Summary.of([(r.done_s - r.start_s) * 1e3 for r in ok for _ in range(r.num_items)]),
        ttft=ttft, ttft_source="client" if stream else "server", itl=itl,
        server_total=Summary.of(_server_ms(ok, "total_ms")),
        server_queue=Summary.of(_server_ms(ok, "queue_ms")),
        send_lag=(
            Summary.of([(r.sent_s - r.scheduled_s) * 1e3 for r in measured])
            if shape.mode == "open" else None
        ),
        num_in_flight_waits=run.num_in_flight_waits,
        batch_size=batch_size,
        num_calls=len(measured) if batch_size else 0,
        calls_per_s=len(done_in_window) / window if batch_size else None,
        call_latency=Summary.of([(r.done_s - r.start_s) * 1e3 for r in ok]) if batch_size else None,
        **extra,
    )


def _server_ms(records, name: str) -> list[float]:
    """A server timing (`ttft_ms`, `queue_ms`, `total_ms`) of every request: the item timings
    of GenerateBatch calls, the record's own otherwise (where the server sent one)."""
    values = []
    for r in records:
        if r.items:
            values.extend(getattr(item, name) for item in r.items)
        elif (value := getattr(r, f"server_{name}")) is not None:
            values.append(value)
    return values


# --- thresholds --------------------------------------------------------------------------------

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?"
_CONDITION = re.compile(rf"^([a-z0-9_]+)\s*(<=|>=|==|!=|<|>)\s*({_NUMBER})$")
_OPS = {
    "<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b,
}


@dataclass(frozen=True)
class Threshold:
    """A failure condition, e.g. p99_ms > 50: the run fails when it holds."""

    metric: str
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"

    def failure(self, metrics: dict[str, float | None]) -> str | None:
        actual = metrics.get(self.metric)
        if actual is None:
            return f"{self}: no value for {self.metric} in this run"
        if _OPS[self.op](actual, self.value):
            return f"{self}: {self.metric} = {actual:.6g}"
        return None


def parse_thresholds(text: str) -> list[Threshold]:
    """'p99_ms>50,error_rate>0' -> [Threshold, ...]; raises ValueError naming the bad part."""
    thresholds = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        match = _CONDITION.match(part.lower())
        if match is None:
            raise ValueError(f"--fail-if {part!r}: expected METRIC OP NUMBER, e.g. p99_ms>50")
        metric, op, value = match.groups()
        if metric not in METRICS:
            raise ValueError(
                f"--fail-if {part!r}: unknown metric {metric!r}; known: {', '.join(METRICS)}"
            )
        thresholds.append(Threshold(metric, op, float(value)))
    if not thresholds:
        raise ValueError("--fail-if: no condition given")
    return thresholds


def check_thresholds(result: LoadTestResult, thresholds: Sequence[Threshold]) -> list[str]:
    """The conditions that held (each a message); empty when the run passes."""
    metrics = result.metrics()
    return [msg for t in thresholds if (msg := t.failure(metrics)) is not None]
