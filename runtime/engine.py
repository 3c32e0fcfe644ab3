"""The engine: an asyncio facade over one decode-loop thread.

The asyncio side submits requests and aborts into an inbox; the decode thread drains it at
step boundaries, runs schedule -> encode/step -> update, and hands the outputs back with
loop.call_soon_threadsafe, once per step for all requests. ORT releases the GIL while it
runs, so the event loop keeps serving gRPC during a step.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .bundle import Bundle
from .errors import (
    EngineDeadError,
    InvalidRequestError,
    NotFoundError,
    QueueFullError,
    RequestAbortedError,
)
from .requests import (
    DecodingParams,
    FinishReason,
    Limits,
    Request,
    RequestOutput,
    Strategy,
    validate_params,
)
from .runner import StepRunner
from .scheduler import Scheduler, SchedulerConfig, StepPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepStats:
    """What one step did; observers (metrics) receive it on the decode thread."""

    batch_size: int  # rows the step graph ran
    num_admitted: int  # requests that entered slots before the step
    step_seconds: float  # schedule + encode + step + update, wall time
    num_waiting: int
    num_active_slots: int
    num_finished: int
    num_running: int = 0
    num_tokens: int = 0  # tokens appended to outputs (an ending <eos> is not one)


@dataclass
class EngineStats:
    """Totals since start, and the latest gauges. Written by the decode thread only (plain
    ints and floats, so any thread may read them; a reader may see one step's update half
    applied)."""

    num_steps: int = 0
    num_rows: int = 0  # sum of batch sizes
    num_tokens: int = 0
    num_admitted: int = 0
    num_requests_finished: int = 0  # aborted ones included
    num_requests_aborted: int = 0
    step_seconds_total: float = 0.0
    ttft_seconds_total: float = 0.0  # over finished requests that produced a token
    num_ttft: int = 0
    num_waiting: int = 0
    num_running: int = 0
    num_active_slots: int = 0
    last_batch_size: int = 0
    last_step_seconds: float = 0.0

    @property
    def mean_batch_size(self) -> float:
        return self.num_rows / self.num_steps if self.num_steps else 0.0

    @property
    def mean_ttft_seconds(self) -> float:
        return self.ttft_seconds_total / self.num_ttft if self.num_ttft else 0.0


@dataclass(frozen=True)
class ModelInfo:
    name: str
    vocab: tuple[str, ...]
    users: dict[str, int]
    items: dict[str, int]
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    hidden_size: int
    num_layers: int
    model_config: dict = field(default_factory=dict)

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> ModelInfo:
        ids = bundle.special_ids
        return cls(
            name=bundle.name,
            vocab=bundle.vocab,
            users={u: i for i, u in enumerate(bundle.users)},
            items={it: i for i, it in enumerate(bundle.items)},
            bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"], unk_id=ids["unk"],
            hidden_size=bundle.hidden_size,
            num_layers=bundle.num_layers,
            model_config=dict(bundle.model_config),
        )

    def detokenize(self, token_ids: list[int]) -> str:
        return " ".join(self.vocab[t] for t in token_ids)


class RequestHandle:
    """The asyncio side of one request: iterate for deltas (coalesced), or await result()."""

    def __init__(self, engine: Engine, request: Request) -> None:
        self._engine = engine
        self.request = request
        self._pending: list[RequestOutput] = []
        self._event = asyncio.Event()
        self._error: BaseException | None = None
        self.final: RequestOutput | None = None

    @property
    def request_id(self) -> str:
        """The client's id (two clients may use the same one)."""
        return self.request.client_id or self.request.request_id

    @property
    def key(self) -> str:
        """The engine's unique key of this request."""
        return self.request.request_id

    @property
    def done(self) -> bool:
        return self.final is not None or self._error is not None

    def _push(self, output: RequestOutput) -> None:
        if output.finished:
            self.final = output
        self._pending.append(output)
        self._event.set()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._event.set()

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        """The next delta: everything produced since the last call, merged into one."""
        while not self._pending:
            if self._error is not None:
                raise self._error
            if self.final is not None:
                raise StopAsyncIteration
            self._event.clear()
            await self._event.wait()
        pending, self._pending = self._pending, []
        return _merge(pending)

    async def result(self) -> RequestOutput:
        while self.final is None:
            if self._error is not None:
                raise self._error
            self._event.clear()
            await self._event.wait()
        return self.final

    def abort(self) -> None:
        if not self.done:
            self._engine.abort(self.key)


def _merge(outputs: list[RequestOutput]) -> RequestOutput:
    if len(outputs) == 1:
        return outputs[0]
    last = outputs[-1]
    tokens = [t for o in outputs for t in o.new_token_ids]
    lps = None
    if last.new_logprobs is not None:
        lps = [x for o in outputs for x in (o.new_logprobs or [])]
    return RequestOutput(**{**last.__dict__, "new_token_ids": tokens, "new_logprobs": lps})


class Engine:
    """Owns the runner and the scheduler; serves requests from asyncio code.

    `runner` is a StepRunner or anything with its interface (num_slots, top_k,
    can_write_states, encode, write_states, step): tests pass doubles.
    """

    def __init__(
        self,
        runner: StepRunner,
        info: ModelInfo,
        config: SchedulerConfig,
        *,
        max_beams: int = 8,
    ) -> None:
        if config.num_slots != runner.num_slots:
            raise ValueError(
                f"scheduler ({config.num_slots}) and runner ({runner.num_slots}) disagree on "
                "the number of slots"
            )
        self.runner = runner
        self.info = info
        self.config = config
        default_max = int(info.model_config.get("max_len", 15))
        self.limits = Limits(
            vocab_size=len(info.vocab),
            max_tokens=config.max_tokens,
            default_max_tokens=min(default_max, config.max_tokens),
            sampling_top_k=runner.top_k,
            max_beams=min(max_beams, config.batch_limit),
            max_stop_tokens=config.max_stop_tokens,
        )
        self.scheduler = Scheduler(config, bos_id=info.bos_id, eos_id=info.eos_id)
        self.stats = EngineStats()
        self.observers: list = []  # callables taking StepStats, called on the decode thread
        self._cv = threading.Condition()
        self._inbox: collections.deque[Request] = collections.deque()
        self._abort_inbox: list[tuple[str, Request]] = []
        self._handles: dict[str, RequestHandle] = {}  # event-loop thread only
        self._num_made = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the decode thread; call from the event loop that will submit requests."""
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="gruserve-decode", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stops the decode thread after its current step; unfinished requests fail with
        RequestAbortedError."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def healthy(self) -> bool:
        return (
            self.error is None
            and not self._stopping
            and self._thread is not None
            and self._thread.is_alive()
        )

    @property
    def num_in_flight(self) -> int:
        return len(self._handles)

    # --- requests ---------------------------------------------------------------------------

    def make_request(
        self,
        request_id: str,
        params: DecodingParams,
        *,
        user_id: str | None = None,
        item_id: str | None = None,
        hidden_state: np.ndarray | None = None,
        stream: bool = False,
    ) -> Request:
        """Validates and resolves a request; raises InvalidRequestError / NotFoundError."""
        params = validate_params(params, self.limits)
        client_id = request_id or secrets.token_hex(8)
        # requests are keyed by the engine, not the client: two clients reusing an id (or a
        # retry racing its original) must not collide
        self._num_made += 1
        request = Request(
            request_id=f"{client_id}#{self._num_made}", client_id=client_id,
            params=params, stream=stream,
        )
        if hidden_state is not None:
            expected = self.info.num_layers * self.info.hidden_size
            state = np.asarray(hidden_state, dtype=np.float32).reshape(-1)
            if state.size != expected:
                raise InvalidRequestError(
                    "hidden_state",
                    f"needs {expected} values (num_layers * hidden_size), got {state.size}",
                )
            if not np.isfinite(state).all():
                raise InvalidRequestError("hidden_state", "values must be finite")
            if not self.runner.can_write_states:
                raise InvalidRequestError("hidden_state", "this bundle cannot take raw states")
            request.hidden_state = state.reshape(self.info.hidden_size)
        else:
            if not user_id:
                raise InvalidRequestError("user_item.user_id", "required")
            if not item_id:
                raise InvalidRequestError("user_item.item_id", "required")
            user = self.info.users.get(user_id)
            if user is None:
                raise NotFoundError(f"unknown user_id {user_id!r}")
            item = self.info.items.get(item_id)
            if item is None:
                raise NotFoundError(f"unknown item_id {item_id!r}")
            request.user_index, request.item_index = user, item
        if params.strategy is Strategy.SAMPLE:
            seed = params.sampling.seed
            request.seed = secrets.randbits(63) if seed is None else int(seed)
        return request

    def submit(self, request: Request) -> RequestHandle:
        """Queues a request (event-loop thread only); raises QueueFullError / EngineDeadError."""
        if not self.healthy:
            raise EngineDeadError(f"engine is not running ({self.error or 'stopped'})")
        if request.request_id in self._handles:
            raise InvalidRequestError("request_id", "this request was already submitted")
        with self._cv:
            if self._stopping:
                raise EngineDeadError("engine is shutting down")
            # the scheduler's count is read without its thread: at worst one step stale,
            # which only ever admits fewer
            waiting = len(self._inbox) + self.scheduler.num_waiting
            if waiting >= self.config.max_queued:
                raise QueueFullError(f"queue full ({self.config.max_queued} waiting)")
            request.arrival_time = time.monotonic()
            handle = RequestHandle(self, request)
            self._handles[request.request_id] = handle
            self._inbox.append(request)
            self._cv.notify()
        return handle

    def abort(self, request_id: str) -> None:
        """Aborts an in-flight request (event-loop thread only) between steps; its handle
        then receives a final ABORTED output. Unknown or finished ids are ignored."""
        handle = self._handles.get(request_id)
        if handle is None:
            return
        with self._cv:
            # the Request object, not only its id: a late abort must not hit a newer request
            # that reuses the id
            self._abort_inbox.append((request_id, handle.request))
            self._cv.notify()

    # --- the decode thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._inbox or self._abort_inbox or self.scheduler.has_work()):
                        if self._stopping:
                            return
                        self._cv.wait()
                    if self._stopping:
                        return
                    rejected = self._drain_inbox()
                if rejected:
                    self._loop.call_soon_threadsafe(self._fail_some, rejected)
                self._step()
        except BaseException as exc:  # noqa: BLE001 - a broken engine must fail loudly
            log.exception("decode loop failed; the engine is now unavailable")
            self.error = exc
        finally:
            reason = self.error
            if self._loop is not None and not self._loop.is_closed():
                error = (
                    EngineDeadError(f"engine failed: {reason!r}") if reason
                    else RequestAbortedError("engine stopped")
                )
                try:
                    self._loop.call_soon_threadsafe(self._fail_all, error)
                except RuntimeError:
                    pass  # the loop closed meanwhile: nobody is waiting

    def _drain_inbox(self) -> list[tuple[str, BaseException]]:
        """Moves submitted requests, then aborts, into the scheduler (under the lock)."""
        rejected = []
        while self._inbox:
            request = self._inbox.popleft()
            try:
                self.scheduler.add(request)
            except (QueueFullError, InvalidRequestError) as exc:
                rejected.append((request.request_id, exc))
        for request_id, request in self._abort_inbox:
            if self.scheduler.get_request(request_id) is request:
                self.scheduler.abort(request_id)
        self._abort_inbox.clear()
        return rejected

    def _step(self) -> None:
        t0 = time.perf_counter()
        scheduler = self.scheduler
        plan = scheduler.schedule()
        ratings = None
        if plan.encode is not None:
            e = plan.encode
            ratings = self.runner.encode(e.slots, e.users, e.items)
        if plan.write_states is not None:
            self.runner.write_states(*plan.write_states)
        if plan.step is not None:
            s = plan.step
            out = self.runner.step(s.read_slots, s.write_slots, s.tokens, want_topk=s.want_topk)
            outputs = scheduler.update(
                plan, ratings, out.next_tokens, out.topk_logprobs, out.topk_ids
            )
        else:
            outputs = scheduler.update(plan, ratings, None)
        # stats first: whoever sees a result also sees the step that produced it counted
        self._record(plan, outputs, time.perf_counter() - t0)
        if outputs:
            # one callback per step for all requests; unary requests appear here only once
            self._loop.call_soon_threadsafe(self._deliver, outputs)

    def _record(self, plan: StepPlan, outputs: list[RequestOutput], elapsed: float) -> None:
        batch = 0 if plan.step is None else int(plan.step.tokens.size)
        stats, scheduler = self.stats, self.scheduler
        stats.num_steps += batch > 0
        stats.num_rows += batch
        stats.num_tokens += scheduler.num_tokens_last_step
        stats.num_admitted += plan.num_admitted
        stats.step_seconds_total += elapsed
        stats.last_step_seconds = elapsed
        stats.num_waiting = scheduler.num_waiting
        stats.num_running = scheduler.num_running
        stats.num_active_slots = scheduler.num_active_slots
        stats.last_batch_size = batch
        finished = 0
        for output in outputs:
            if output.finished:
                finished += 1
                stats.num_requests_aborted += output.finish_reason is FinishReason.ABORTED
                if output.first_token_s is not None:
                    stats.ttft_seconds_total += output.first_token_s
                    stats.num_ttft += 1
        stats.num_requests_finished += finished
        if self.observers:
            step_stats = StepStats(
                batch_size=batch,
                num_admitted=plan.num_admitted,
                step_seconds=elapsed,
                num_waiting=stats.num_waiting,
                num_active_slots=stats.num_active_slots,
                num_finished=finished,
                num_running=stats.num_running,
                num_tokens=scheduler.num_tokens_last_step,
            )
            for observer in self.observers:
                try:
                    observer(step_stats)
                except Exception:  # noqa: BLE001 - metrics must never kill the decode loop
                    log.exception("step observer %r failed", observer)

    # --- back on the event loop ------------------------------------------------------------

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        handles = self._handles
        for output in outputs:
            handle = handles.get(output.request_id)
            if handle is None:
                continue
            if output.finished:
                del handles[output.request_id]
            handle._push(dataclasses.replace(output, request_id=handle.request_id))

    def _fail_some(self, rejected: list[tuple[str, BaseException]]) -> None:
        for request_id, error in rejected:
            handle = self._handles.pop(request_id, None)
            if handle is not None:
                handle._fail(error)

    def _fail_all(self, error: BaseException) -> None:
        handles, self._handles = self._handles, {}
        for handle in handles.values():
            # one instance per handle: a raised exception carries its own traceback
            handle._fail(type(error)(*error.args))
