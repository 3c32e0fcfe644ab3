"""The load generator: applies a LoadShape through an async callable, knows nothing of gRPC."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .shape import LoadShape, arrival_gaps
from .stats import CLIENT_ERROR, RequestRecord, percentile

log = logging.getLogger(__name__)

# fills code, num_tokens, chunk_s and the server timings; the generator stamps sent/done
Caller = Callable[[RequestRecord], Awaitable[None]]


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
