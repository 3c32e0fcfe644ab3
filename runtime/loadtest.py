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
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import random
import re
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import grpc

from .client import AsyncGruserveClient, Connection, build_request

log = logging.getLogger(__name__)

OK = "OK"
# an exception that is not a gRPC status (a harness bug, a broken connection object)
CLIENT_ERROR = "CLIENT_ERROR"


class LoadTestError(RuntimeError):
    """The run could not take place (server unreachable, nothing measured)."""


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


# --- one request -------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class RequestRecord:
    """What happened to one request; times are time.monotonic() seconds."""

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

    @property
    def start_s(self) -> float:
        """Where latency counts from: the scheduled time in open loop, else the send time."""
        return self.sent_s if self.scheduled_s is None else self.scheduled_s

    @property
    def ok(self) -> bool:
        return self.code == OK


# fills code, num_tokens, chunk_s and the server timings; the generator stamps sent/done
Caller = Callable[[RequestRecord], Awaitable[None]]


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


# --- the load generator ------------------------------------------------------------------------


@dataclass(frozen=True)
class ProgressSnapshot:
    elapsed_s: float
    phase: str  # "warm-up", "measuring", "draining", "done" (rates: whole-run averages)
    num_sent: int
    num_ok: int
    num_failed: int
    num_in_flight: int
    recent_rps: float  # successful completions per second since the previous snapshot
    recent_tokens_per_s: float
    recent_p50_ms: float | None


@dataclass
class LoadRun:
    """Raw outcome of a run: every record, and where the measured window starts."""

    records: list[RequestRecord]
    measure_start_s: float
    # open loop: span of the measured arrivals (for the scheduled rate)
    arrival_span_s: float | None = None
    num_in_flight_waits: int = 0  # open loop: sends delayed by max_in_flight

    @property
    def measured(self) -> list[RequestRecord]:
        return [r for r in self.records if not r.warmup]


class LoadGenerator:
    """Applies a LoadShape through a Caller; knows nothing of gRPC."""

    def __init__(self, shape: LoadShape, call: Caller, clock: Callable[[], float] = time.monotonic):
        self.shape = shape
        self.call = call
        self.clock = clock
        self.records: list[RequestRecord] = []
        self.completed: list[RequestRecord] = []
        self.in_flight = 0
        self.num_ok = 0
        self.measure_start: float | None = None
        self.num_measured = 0
        self.sending_done = False

    async def run(
        self,
        progress: Callable[[ProgressSnapshot], None] | None = None,
        progress_interval_s: float = 1.0,
    ) -> LoadRun:
        self.t0 = self.clock()
        reporter = (
            asyncio.create_task(self._report(progress, progress_interval_s)) if progress else None
        )
        try:
            if self.shape.mode == "closed":
                run = await self._closed_loop()
            else:
                run = await self._open_loop()
        finally:
            if reporter is not None:
                reporter.cancel()
        if progress is not None:
            # the last line: whole-run averages
            progress(self._snapshot_of(self.completed, self.clock() - self.t0, phase="done"))
        return run

    async def _issue(self, record: RequestRecord) -> None:
        self.in_flight += 1
        record.sent_s = self.clock()
        try:
            await self.call(record)
        except Exception:  # noqa: BLE001 - counted, never fatal to the run
            log.exception("request %d failed in the harness", record.index)
            record.code = CLIENT_ERROR
        finally:
            record.done_s = self.clock()
            self.in_flight -= 1
            self.num_ok += record.ok
            self.completed.append(record)

    def _admit(self, index: int, offset_s: float, window_start_s: float) -> bool | None:
        """Whether request `index`, due `offset_s` after the start, is warm-up (True) or
        measured (False); None once the run has sent enough. The first measured request
        opens the window at `window_start_s` (an offset) unless a timed warm-up fixed it."""
        shape, warmup = self.shape, self.shape.warmup
        if (index < warmup.requests) if warmup.requests else (offset_s < warmup.seconds):
            return True
        if self.measure_start is None:
            self.measure_start = self.t0 + (warmup.seconds or window_start_s)
        if shape.num_requests is not None and self.num_measured >= shape.num_requests:
            return None
        if shape.duration_s is not None and offset_s >= (
            self.measure_start - self.t0 + shape.duration_s
        ):
            return None
        self.num_measured += 1
        return False

    async def _closed_loop(self) -> LoadRun:
        counter = itertools.count()

        async def worker() -> None:
            while True:
                offset = self.clock() - self.t0
                warm = self._admit(next(counter), offset, window_start_s=offset)
                if warm is None:
                    return
                record = RequestRecord(len(self.records), warm)
                self.records.append(record)
                await self._issue(record)

        await asyncio.gather(*(worker() for _ in range(self.shape.concurrency)))
        self.sending_done = True
        return LoadRun(self.records, self.measure_start or self.clock())

    async def _open_loop(self) -> LoadRun:
        shape = self.shape
        slots = asyncio.Semaphore(shape.max_in_flight)
        tasks: set[asyncio.Task] = set()
        num_waits = 0
        last_warm_at = 0.0
        last_measured_at = 0.0

        async def issue(record: RequestRecord) -> None:
            try:
                await self._issue(record)
            finally:
                slots.release()

        offset = 0.0
        for index, gap in enumerate(arrival_gaps(shape.rate, shape.burst, shape.seed)):
            offset += gap
            # the measured arrivals lie in (window start, ...]: the window opens at the
            # previous arrival (or the end of a timed warm-up), so the rate estimate is unbiased
            warm = self._admit(index, offset, window_start_s=last_warm_at)
            if warm is None:
                break
            if warm:
                last_warm_at = offset
            else:
                last_measured_at = offset
            due = self.t0 + offset
            delay = due - self.clock()
            if delay > 0:
                await asyncio.sleep(delay)
            if slots.locked():
                num_waits += 1
            await slots.acquire()
            record = RequestRecord(index, warm, scheduled_s=due)
            self.records.append(record)
            task = asyncio.create_task(issue(record))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        self.sending_done = True
        if tasks:
            await asyncio.gather(*tasks)
        if self.measure_start is None:
            self.measure_start = self.clock()
        if shape.duration_s is not None:
            span = shape.duration_s
        else:
            span = last_measured_at - (self.measure_start - self.t0)
        return LoadRun(
            self.records, self.measure_start, arrival_span_s=span, num_in_flight_waits=num_waits
        )

    async def _report(self, progress, interval_s: float) -> None:
        seen = 0
        last = self.clock()
        while True:
            await asyncio.sleep(interval_s)
            now = self.clock()
            fresh = self.completed[seen:]
            seen += len(fresh)
            progress(self._snapshot_of(fresh, now - last))
            last = now

    def _snapshot_of(
        self, fresh: list[RequestRecord], dt: float, phase: str | None = None
    ) -> ProgressSnapshot:
        now = self.clock()
        ok = [r for r in fresh if r.ok]
        lat = sorted((r.done_s - r.start_s) * 1e3 for r in ok)
        num_ok = self.num_ok
        if phase is None:
            if self.sending_done:
                phase = "draining"
            elif self.measure_start is None or now < self.measure_start:
                phase = "warm-up"
            else:
                phase = "measuring"
        return ProgressSnapshot(
            elapsed_s=now - self.t0, phase=phase, num_sent=len(self.records), num_ok=num_ok,
            num_failed=len(self.completed) - num_ok, num_in_flight=self.in_flight,
            recent_rps=len(ok) / dt if dt > 0 else 0.0,
            recent_tokens_per_s=sum(r.num_tokens for r in ok) / dt if dt > 0 else 0.0,
            recent_p50_ms=percentile(lat, 50) if lat else None,
        )


# --- request mix and the gRPC caller -----------------------------------------------------------


class RequestMix:
    """The conditioning of request i: (user, item) pairs from a file (cycled in file order),
    pairs drawn uniformly from entity lists (seeded), or random raw hidden states."""

    NUM_STATES = 64  # distinct random states, reused round-robin

    def __init__(
        self,
        decoding: dict,
        *,
        pairs: Sequence[tuple[str, str]] | None = None,
        users: Sequence[str] | None = None,
        items: Sequence[str] | None = None,
        state_size: int | None = None,
        seed: int = 0,
        id_prefix: str = "lt",
    ) -> None:
        self.decoding = dict(decoding)
        self.id_prefix = id_prefix
        rng = random.Random(seed)
        if pairs:
            self.kind = "pairs"
            self._pairs = list(pairs)
        elif users and items:
            self.kind = "entities"
            self._pairs = [(rng.choice(users), rng.choice(items)) for _ in range(4096)]
        elif state_size:
            self.kind = "hidden_state"
            self._states = [
                [rng.uniform(-1.0, 1.0) for _ in range(state_size)] for _ in range(self.NUM_STATES)
            ]
        else:
            raise ValueError("a request mix needs pairs, users and items, or a state size")
        build_request(**self.decoding)  # fail now, not per request, on a bad parameter

    def request(self, index: int):
        rid = f"{self.id_prefix}-{index}"
        if self.kind == "hidden_state":
            state = self._states[index % len(self._states)]
            return build_request(hidden_state=state, request_id=rid, **self.decoding)
        user, item = self._pairs[index % len(self._pairs)]
        return build_request(user=user, item=item, request_id=rid, **self.decoding)


class GrpcCaller:
    """Sends one request with the async client and records what came back."""

    def __init__(self, client: AsyncGruserveClient, mix: RequestMix, *, stream: bool) -> None:
        self.client = client
        self.mix = mix
        self.stream = stream

    async def __call__(self, record: RequestRecord) -> None:
        request = self.mix.request(record.index)
        try:
            if self.stream:
                async for chunk in self.client.stream_request(request):
                    record.chunk_s.append(time.monotonic())
                    record.num_tokens += len(chunk.token_ids)
                    if chunk.HasField("timing"):
                        _take_timing(record, chunk.timing)
            else:
                reply = await self.client.generate_request(request)
                record.num_tokens = len(reply.token_ids)
                _take_timing(record, reply.timing)
            record.code = OK
        except grpc.aio.AioRpcError as exc:
            record.code = exc.code().name


def _take_timing(record: RequestRecord, timing) -> None:
    record.server_ttft_ms = timing.ttft_ms
    record.server_queue_ms = timing.queue_ms
    record.server_total_ms = timing.total_ms


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """`user,item` per line (comma, tab or spaces); blank lines, '#' comments and a
    `user,item` header are skipped."""
    pairs = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in re.split(r"[,\t ]+", line) if p.strip()]
        if len(parts) != 2:
            raise ValueError(f"{path}:{number}: expected 'user,item', got {line!r}")
        if number == 1 and [p.lower() for p in parts] == ["user", "item"]:
            continue
        pairs.append((parts[0], parts[1]))
    if not pairs:
        raise ValueError(f"{path}: no user,item pairs")
    return pairs


def read_entities(path: str | Path) -> tuple[list[str], list[str]]:
    """(users, items) from a bundle directory (via its manifest) or an entities.json."""
    path = Path(path)
    if path.is_dir():
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        path = path / manifest["files"]["entities"]["file"]
    data = json.loads(path.read_text(encoding="utf-8"))
    users, items = [str(u) for u in data["users"]], [str(i) for i in data["items"]]
    if not users or not items:
        raise ValueError(f"{path}: no users or no items")
    return users, items


# --- Prometheus scrape -------------------------------------------------------------------------


def metrics_url(text: str) -> str:
    """'HOST:PORT' -> 'http://HOST:PORT/metrics'; full URLs pass through."""
    return text if "://" in text else f"http://{text}/metrics"


def scrape_metrics(url: str, timeout_s: float = 5.0) -> dict[str, float]:
    """The gruserve_* counters (and histogram _count/_sum) of a /metrics page, keyed
    `name{label="value",...}`. Gauges and buckets are left out: only deltas are reported."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url(url), timeout=timeout_s) as reply:  # noqa: S310
        text = reply.read().decode("utf-8")
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("gruserve_"):
            continue
        for s in family.samples:
            counter = family.type == "counter" and s.name.endswith("_total")
            histogram = family.type in ("histogram", "summary") and s.name.endswith(
                ("_count", "_sum")
            )
            if counter or histogram:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                values[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return values


def metric_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in sorted(after) if after[k] != before.get(k)}


# --- the result --------------------------------------------------------------------------------

_SUMMARIES = {
    "": "end-to-end latency of successful requests (from the scheduled time in open loop)",
    "ttft_": "time to first token (streaming: first message, client side; unary: server ttft_ms)",
    "itl_": "streaming: gap between consecutive messages of a response",
    "server_": "server-reported total_ms (accepted -> finished)",
    "queue_": "server-reported queue_ms (accepted -> admitted into a decode slot)",
    "send_lag_": "open loop: how late the harness sent after the scheduled time",
}
_STATS = ("p50", "p90", "p99", "max", "mean")

METRICS: dict[str, str] = {
    "sent": "measured requests sent (warm-up excluded)",
    "succeeded": "measured requests answered OK",
    "failed": "measured requests that ended with a non-OK status",
    "error_rate": "failed / sent (0..1)",
    "rps": "successful completions per second inside the measured window",
    "tokens_per_s": "tokens of the successful completions inside the measured window, per second",
    "tokens_per_request": "mean tokens per successful response",
    "offered_rps": "open loop: the rate asked for",
    "scheduled_rps": "open loop: arrivals per second actually scheduled in the measured window",
    "rate_ratio": "open loop: rps / scheduled_rps (below 1: the server did not keep up)",
    "harness_cpu_cores": "CPU the harness itself used while sending, in cores",
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
        }
        for prefix, summary in (
            ("", self.latency), ("ttft_", self.ttft), ("itl_", self.itl),
            ("server_", self.server_total), ("queue_", self.server_queue),
            ("send_lag_", self.send_lag),
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
    **extra,
) -> LoadTestResult:
    measured = run.measured
    ok = [r for r in measured if r.ok]
    errors = dict(sorted(Counter(r.code for r in measured if not r.ok).items()))
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
    if stream:
        ttft = Summary.of([(r.chunk_s[0] - r.start_s) * 1e3 for r in ok if r.chunk_s])
        gaps = [
            (b - a) * 1e3 for r in ok for a, b in itertools.pairwise(r.chunk_s)
        ]
        itl = Summary.of(gaps)
    else:
        ttft = Summary.of([r.server_ttft_ms for r in ok if r.server_ttft_ms is not None])
        itl = None
    scheduled = None
    if shape.mode == "open" and run.arrival_span_s:
        scheduled = len(measured) / run.arrival_span_s
    return LoadTestResult(
        target=target, mode=shape.mode, stream=stream, concurrency=shape.concurrency,
        offered_rps=shape.rate, burst=shape.burst if shape.mode == "open" else None,
        window_s=window, num_sent=len(measured), num_succeeded=len(ok),
        num_failed=len(measured) - len(ok), errors=errors,
        num_warmup=len(run.records) - len(measured), num_tokens=num_tokens,
        throughput_rps=len(done_in_window) / window,
        tokens_per_s=sum(r.num_tokens for r in done_in_window) / window,
        scheduled_rps=scheduled,
        latency=Summary.of([(r.done_s - r.start_s) * 1e3 for r in ok]),
        ttft=ttft, ttft_source="client" if stream else "server", itl=itl,
        server_total=Summary.of([r.server_total_ms for r in ok if r.server_total_ms is not None]),
        server_queue=Summary.of([r.server_queue_ms for r in ok if r.server_queue_ms is not None]),
        send_lag=(
            Summary.of([(r.sent_s - r.scheduled_s) * 1e3 for r in measured])
            if shape.mode == "open" else None
        ),
        num_in_flight_waits=run.num_in_flight_waits,
        **extra,
    )


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


# --- the whole run -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadTestConfig:
    connection: Connection
    shape: LoadShape
    stream: bool = False
    decoding: dict = field(default_factory=dict)  # build_request keyword arguments
    pairs: Sequence[tuple[str, str]] | None = None
    users: Sequence[str] | None = None
    items: Sequence[str] | None = None
    timeout_s: float = 30.0  # per-RPC deadline
    metrics_url: str | None = None


async def run_loadtest(
    config: LoadTestConfig, progress: Callable[[ProgressSnapshot], None] | None = None
) -> LoadTestResult:
    """Connects, checks the server answers GetModelInfo, applies the load, builds the result."""
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    target = config.connection.target
    async with AsyncGruserveClient(config.connection, timeout=config.timeout_s) as client:
        try:
            info = await client.model_info(timeout=min(config.timeout_s, 10.0))
        except grpc.aio.AioRpcError as exc:
            raise LoadTestError(
                f"{target}: GetModelInfo failed: {exc.code().name}: {exc.details()}"
            ) from None
        mix = RequestMix(
            config.decoding, pairs=config.pairs, users=config.users, items=config.items,
            state_size=info.num_layers * info.hidden_size or info.hidden_size,
            seed=config.shape.seed,
        )
        before = await _scrape(config.metrics_url)
        caller = GrpcCaller(client, mix, stream=config.stream)
        cpu0, wall0 = time.process_time(), time.monotonic()
        run = await LoadGenerator(config.shape, caller).run(progress)
        harness_cpu = (time.process_time() - cpu0) / max(time.monotonic() - wall0, 1e-9)
        after = await _scrape(config.metrics_url)
    if not run.measured:
        raise LoadTestError("no request was measured (the warm-up took the whole run?)")
    deltas = metric_deltas(before, after) if before is not None and after is not None else None
    return build_result(
        run, config.shape, target=target, stream=config.stream, mix=mix.kind,
        decoding=dict(config.decoding), server_metrics=deltas, started_at=started_at,
        harness_cpu_cores=harness_cpu,
        model={
            "name": info.model_name, "provider": info.provider, "max_slots": info.max_slots,
            "vocab_size": info.vocab_size, "hidden_size": info.hidden_size,
        },
    )


async def _scrape(url: str | None) -> dict[str, float] | None:
    if not url:
        return None
    try:
        return await asyncio.to_thread(scrape_metrics, url)
    except (OSError, ValueError) as exc:
        log.warning("metrics scrape of %s failed: %s", url, exc)
        return None
