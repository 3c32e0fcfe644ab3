"""EngineCore: the synchronous engine. One `step()` = schedule -> run the graphs -> update.

It owns the scheduler and a runner (anything that satisfies `ModelRunner`), and knows
nothing of threads, asyncio or gRPC: the threaded `Engine` drives it from its decode thread,
tests drive it with a fake runner, benchmarks drive it directly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .bundle import ModelInfo
from .config import RecommenderConfig, SchedulerConfig
from .model_runner import ModelRunner
from .request_builder import RequestBuilder
from .requests import Limits, RatingOutput, RatingRequest, Request, RequestOutput
from .scheduler import Scheduler, StepPlan
from .stats import StepStats


@dataclass(frozen=True)
class StepResult:
    outputs: list[RequestOutput]  # finals of finished requests, deltas of streaming ones
    stats: StepStats
    plan: StepPlan  # what the step ran (for tests and debugging)


class EngineCore:
    def __init__(
        self, runner: ModelRunner, info: ModelInfo, config: SchedulerConfig,
        *, recommender: RecommenderConfig | None = None, clock=time.monotonic,
    ) -> None:
        if not isinstance(runner, ModelRunner):
            raise TypeError(f"{type(runner).__name__} does not implement ModelRunner")
        if config.num_slots != runner.num_slots:
            raise ValueError(
                f"scheduler ({config.num_slots}) and runner ({runner.num_slots}) disagree on "
                "the number of slots"
            )
        self.runner = runner
        self.info = info
        self.config = config
        self.limits = Limits.of(
            config, vocab_size=len(info.vocab), model_max_len=info.max_len,
            sampling_top_k=runner.top_k, recommender=recommender,
        )
        recommender = recommender or RecommenderConfig()
        self.requests = RequestBuilder(
            info, self.limits, can_write_states=runner.can_write_states,
            fallback=recommender.unknown_entities == "fallback",
        )
        self.scheduler = Scheduler(
            config, bos_id=info.bos_id, eos_id=info.eos_id, clock=clock,
            candidates=runner.candidates if runner.head_top_k else None,
        )

    def add(self, request: Request) -> None:
        """Queues a built request; raises QueueFullError (or InvalidRequestError for one the
        scheduler could never hold)."""
        self.scheduler.add(request)

    def abort(self, request_id: str) -> None:
        """Aborted at the next step; its final output says ABORTED."""
        self.scheduler.abort(request_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> StepResult:
        t0 = time.perf_counter()
        plan = self.scheduler.schedule()
        ratings = None
        if plan.encode is not None:
            e = plan.encode
            ratings = self.runner.encode(e.slots, e.users, e.items)
        if plan.write_states is not None:
            self.runner.write_states(*plan.write_states)
        out = None
        if plan.step is not None:
            s = plan.step
            out = self.runner.step(
                s.read_slots, s.write_slots, s.tokens, want_topk=s.want_topk,
                topk_rows=s.topk_rows,
            )
        outputs = self.scheduler.update(plan, ratings, out)
        return StepResult(outputs, self._stats(plan, outputs, time.perf_counter() - t0), plan)

    def rating_spans(self, request: RatingRequest) -> list[tuple[int, int]]:
        """[lo, hi) of each encoder run a rating request takes (the rating chunk size)."""
        n, chunk = request.num_pairs, self.limits.rating_chunk_size
        return [(lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]

    def rate_span(self, request: RatingRequest, span: tuple[int, int]) -> np.ndarray:
        """One encoder run: the ratings of request pairs [lo, hi). No decoding, no slot
        written: safe beside step() on another thread (only the runner's rating path runs,
        never the scheduler)."""
        lo, hi = span
        return self.runner.rate(request.users[lo:hi], request.items[lo:hi])

    def rating_output(
        self, request: RatingRequest, ratings: np.ndarray, *, queue_s: float, total_s: float
    ) -> RatingOutput:
        """All ratings in order, or the top_k best first."""
        indices = top_indices(ratings, request.top_k)
        return RatingOutput(
            request_id=request.request_id, ratings=ratings[indices], indices=indices,
            num_runs=len(self.rating_spans(request)), queue_s=queue_s, total_s=total_s,
        )

    def rate(self, request: RatingRequest) -> RatingOutput:
        """A whole rating request, its encoder runs one after another (the threaded Engine
        interleaves the runs of concurrent requests instead)."""
        start = time.monotonic()
        ratings = np.empty(request.num_pairs, np.float32)
        for lo, hi in self.rating_spans(request):
            ratings[lo:hi] = self.rate_span(request, (lo, hi))
        return self.rating_output(request, ratings, queue_s=0.0,
                                  total_s=time.monotonic() - start)

    def _stats(self, plan: StepPlan, outputs: list[RequestOutput], seconds: float) -> StepStats:
        scheduler = self.scheduler
        return StepStats(
            batch_size=0 if plan.step is None else int(plan.step.tokens.size),
            num_admitted=plan.num_admitted,
            step_seconds=seconds,
            num_waiting=scheduler.num_waiting,
            num_active_slots=scheduler.num_active_slots,
            num_finished=sum(o.finished for o in outputs),
            num_running=scheduler.num_running,
            num_tokens=scheduler.num_tokens_last_step,
        )


def top_indices(ratings: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k highest ratings, highest first, ties in request order; all
    positions in order when k is 0."""
    n = ratings.size
    if k <= 0:
        return np.arange(n, dtype=np.int64)
    # a stable sort of the negated ratings keeps equal ratings in request order
    return np.argsort(-ratings, kind="stable")[: min(k, n)].astype(np.int64)
