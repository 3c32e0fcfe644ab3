"""The engine: an asyncio facade over one decode-loop thread driving the EngineCore.

The asyncio side submits requests and aborts into an inbox; the decode thread drains it at
step boundaries, calls EngineCore.step() (schedule -> encode/step -> update), and hands the
outputs back with loop.call_soon_threadsafe, once per step for all requests. ORT releases
the GIL while it runs, so the event loop keeps serving gRPC during a step.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .core import EngineCore
from .errors import EngineDeadError, InvalidRequestError, QueueFullError, RequestAbortedError
from .requests import RatingOutput, RatingRequest, Request, RequestOutput
from .stats import EngineStats

log = logging.getLogger(__name__)


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

    async def chunks(
        self, *, hold_s: float = 0.0, enough_tokens: int = 1
    ) -> AsyncIterator[RequestOutput]:
        """The deltas of a stream, coalesced into fewer messages: the first as soon as it
        exists; each later one once `enough_tokens` new tokens wait or `hold_s` has passed
        since the previous one, whichever comes first; the final one at once. hold_s = 0
        gives every delta as it comes (what iterating the handle does)."""
        loop = asyncio.get_running_loop()
        sent_at = None
        while True:
            if sent_at is not None and hold_s > 0:
                await self._gather(loop, sent_at + hold_s, enough_tokens)
            try:
                delta = await self.__anext__()
            except StopAsyncIteration:
                return
            yield delta
            sent_at = loop.time()

    async def _gather(self, loop, deadline: float, enough_tokens: int) -> None:
        """Waits until the deadline, or until enough tokens, the end or an error arrived."""
        while self._error is None and self.final is None:
            if sum(len(o.new_token_ids) for o in self._pending) >= enough_tokens:
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._event.clear()
            timer = loop.call_later(remaining, self._event.set)
            try:
                await self._event.wait()
            finally:
                timer.cancel()

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


def _timed(function, *args):
    """(function(*args), when it started): the rating thread's start of a run."""
    started_at = time.monotonic()
    return function(*args), started_at


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
    """Serves requests from asyncio code: the decode thread, the inboxes and the handles.

    Build requests with `make_request` (the core's RequestBuilder), `submit` them, and read
    results from the returned handles. Ratings (`make_ratings`, `rate`) run on a thread of
    their own beside the decode thread: the encoder alone, on a scratch pool, so a rating
    call never waits for a decode step and never touches a decoding request's slot.
    """

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self.make_request = core.requests.build
        self.make_ratings = core.requests.build_ratings
        self.stats = EngineStats()
        self.observers: list = []  # callables taking StepStats, called on the decode thread
        self._cv = threading.Condition()
        self._inbox: collections.deque[Request] = collections.deque()
        self._abort_inbox: list[tuple[str, Request]] = []
        self._handles: dict[str, RequestHandle] = {}  # event-loop thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None
        # one rating run at a time (the runner's scratch pool is one buffer), FIFO by chunk
        self._rating_pool: ThreadPoolExecutor | None = None
        self._num_rating = 0  # rating calls in flight (event-loop thread only)

    @property
    def runner(self):
        return self.core.runner

    @property
    def info(self):
        return self.core.info

    @property
    def limits(self):
        return self.core.limits

    @property
    def config(self):
        return self.core.config

    @property
    def fallback_entities(self) -> bool:
        """Whether unknown ids resolve to the bundle's fallback embeddings."""
        return self.core.requests.fallback

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the decode thread; call from the event loop that will submit requests."""
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._loop = asyncio.get_running_loop()
        self._rating_pool = ThreadPoolExecutor(1, thread_name_prefix="gruserve-rate")
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
        if self._rating_pool is not None:
            self._rating_pool.shutdown(wait=True)  # rating calls already running finish

    def fail_unfinished(self, error: BaseException) -> None:
        """Fails every unfinished request now with `error` (event-loop thread only), without
        waiting for the decode thread: a shutdown out of time cannot wait for a step."""
        self._fail_all(error)

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
        """Requests and rating calls not answered yet."""
        return len(self._handles) + self._num_rating

    # --- requests ---------------------------------------------------------------------------

    def submit(self, request: Request) -> RequestHandle:
        """Queues a request (event-loop thread only); raises QueueFullError / EngineDeadError."""
        if not self.healthy:
            raise EngineDeadError(f"engine is not running ({self.error or 'stopped'})")
        if request.request_id in self._handles:
            raise InvalidRequestError("request_id", "this request was already submitted")
        max_queued = self.config.max_queued
        with self._cv:
            if self._stopping:
                raise EngineDeadError("engine is shutting down")
            # the scheduler's count is read without its thread: at worst one step stale,
            # which only ever admits fewer
            waiting = len(self._inbox) + self.core.scheduler.num_waiting
            if waiting >= max_queued:
                raise QueueFullError(f"queue full ({max_queued} waiting)")
            request.arrival_time = time.monotonic()
            handle = RequestHandle(self, request)
            self._handles[request.request_id] = handle
            self._inbox.append(request)
            self._cv.notify()
        return handle

    async def rate(self, request: RatingRequest) -> RatingOutput:
        """The ratings of a built RatingRequest (event-loop thread only), computed on the
        rating thread one encoder run (chunk) at a time: concurrent calls take turns by
        chunk, so a small call waits for at most one chunk of a big one. Raises
        EngineDeadError when the engine is not running."""
        accepted_at = time.monotonic()
        if not self.healthy:
            raise EngineDeadError(f"engine is not running ({self.error or 'stopped'})")
        ratings = np.empty(request.num_pairs, np.float32)
        started_at = None
        self._num_rating += 1
        try:
            for lo, hi in self.core.rating_spans(request):
                try:
                    future = self._rating_pool.submit(_timed, self.core.rate_span, request,
                                                      (lo, hi))
                except RuntimeError:  # stop() shut the pool down meanwhile
                    raise EngineDeadError("engine is shutting down") from None
                ratings[lo:hi], began = await asyncio.wrap_future(future)
                started_at = began if started_at is None else started_at
        finally:
            self._num_rating -= 1
        return self.core.rating_output(
            request, ratings, queue_s=started_at - accepted_at,
            total_s=time.monotonic() - accepted_at,
        )

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
        core = self.core
        try:
            while True:
                with self._cv:
                    while not (self._inbox or self._abort_inbox or core.has_work()):
                        if self._stopping:
                            return
                        self._cv.wait()
                    if self._stopping:
                        return
                    rejected = self._drain_inbox()
                if rejected:
                    self._loop.call_soon_threadsafe(self._fail_some, rejected)
                result = core.step()
                # stats first: whoever sees a result also sees the step that produced it
                self._record(result.stats, result.outputs)
                if result.outputs:
                    # one callback per step for all requests; unary requests appear only once
                    self._loop.call_soon_threadsafe(self._deliver, result.outputs)
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
        """Moves submitted requests, then aborts, into the core (under the lock)."""
        core = self.core
        rejected = []
        while self._inbox:
            request = self._inbox.popleft()
            try:
                core.add(request)
            except (QueueFullError, InvalidRequestError) as exc:
                rejected.append((request.request_id, exc))
        for request_id, request in self._abort_inbox:
            if core.scheduler.get_request(request_id) is request:
                core.abort(request_id)
        self._abort_inbox.clear()
        return rejected

    def _record(self, step, outputs: list[RequestOutput]) -> None:
        self.stats.record(step, outputs)
        for observer in self.observers:
            try:
                observer(step)
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
