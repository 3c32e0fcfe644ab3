"""What every protocol front end does around an RPC, whatever its protobuf: one guard.

`ServicerBase._guard` maps the runtime's errors to status codes via status.status_for (the
single table), records the outcome (telemetry: `gruserve_requests{rpc, code}`, one
access-log line, a trace span), takes the caller's `x-request-id` and echoes it, reports a
dead engine (health NOT_SERVING), and aborts the engine requests of an RPC that ends early
for any reason (client cancel, disconnect, deadline): their slots are freed at the next
step boundary. gruserve.v1 (servicer.py) and the Open Inference Protocol (oip_servicer.py) both
build on it; neither knows the other's messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable

import grpc

from . import logs
from .config import ServiceConfig
from .engine import RequestHandle
from .errors import EngineDeadError, GruserveError, RequestAbortedError
from .model_host import ModelHost, Served
from .request_builder import MAX_REQUEST_ID_LEN, check_id
from .requests import FinishReason, Request, RequestOutput
from .status import status_for
from .telemetry import REQUEST_ID_HEADER, RpcRecord, RpcTelemetry

log = logging.getLogger(__name__)

# error details travel in HTTP/2 trailers: an echoed 1 MB id must not blow the header limit
MAX_DETAILS_CHARS = 400

# A client whose deadline passes cancels the call itself, and its cancel can reach us just
# before our own copy of the deadline (which started when the request arrived) runs out
DEADLINE_SLACK_S = 0.25

# how an error leaves: (status code, details) -> sent; the default aborts the RPC
ErrorSink = Callable[[grpc.StatusCode, str], Awaitable[None]]


def details_of(error: BaseException) -> str:
    text = str(error)
    if len(text) > MAX_DETAILS_CHARS:
        text = text[: MAX_DETAILS_CHARS - 3] + "..."
    return text


def loggable_id(request_id: str) -> str:
    """A client's id for the logs before it is validated: bounded, and escaped so that it
    cannot forge log lines."""
    rid = request_id[:MAX_REQUEST_ID_LEN]
    if not rid.isprintable():
        rid = rid.encode("unicode_escape").decode("ascii")
    return rid


def _early_end_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """Why an RPC was cancelled under us (for the metrics; the client already knows): its
    deadline passed, or the client went away."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= DEADLINE_SLACK_S:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


class RpcScope:
    """Tracks the engine requests of one RPC so that an early end aborts all of them. The
    RPC uses the engine that was current when it started, for its whole life (a reload
    sends only new RPCs to a new engine)."""

    def __init__(self, served: Served, record: RpcRecord) -> None:
        self.served = served
        self.engine = served.engine
        self.record = record  # what the RPC leaves behind: its ids, tokens, span
        self.handles: list[RequestHandle] = []
        self.closed = False

    @property
    def request_ids(self) -> list[str]:
        """For the logs, known before the engine has a handle."""
        return self.record.request_ids

    def ids(self) -> str:
        return self.record.ids()

    def abort_unfinished(self) -> int:
        """Aborts the requests not finished yet; returns how many there were."""
        unfinished = [handle for handle in self.handles if not handle.done]
        for handle in unfinished:
            handle.abort()
        return len(unfinished)


async def gather_all(awaitables: Iterable[Awaitable]) -> list:
    """Every result in order; the first failure ends the wait for all of them."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()



class ServicerBase:
    """The guard, submission and bookkeeping shared by the protocol servicers.

    on_engine_dead is awaited when an RPC finds the engine dead (the server turns health
    NOT_SERVING for every service it serves). A subclass names its gRPC service in
    `service_name` (what the access log and spans call its methods)."""

    service_name = ""

    def __init__(
        self,
        host: ModelHost,
        telemetry: RpcTelemetry,
        on_engine_dead: Callable[[], Awaitable[None]] | None = None,
        *,
        service: ServiceConfig,
    ) -> None:
        self.host = host
        self.telemetry = telemetry
        self.metrics = telemetry.metrics
        self.on_engine_dead = on_engine_dead
        self.service = service
        # how streams coalesce tokens into messages (RequestHandle.chunks)
        self.stream_flush = dict(
            hold_s=service.stream_hold_ms / 1e3, enough_tokens=service.stream_chunk_tokens
        )

    @contextlib.asynccontextmanager
    async def _guard(
        self, rpc: str, context: grpc.aio.ServicerContext, on_error: ErrorSink | None = None
    ):
        """One RPC (or one request of a stream, with on_error sending its error in-band
        instead of ending the stream)."""
        record = self.telemetry.begin_call(f"/{self.service_name}/{rpc}", context)
        scope = RpcScope(self.host.current, record)
        with logs.request_context(record.header_id):
            async with self._outcome(scope, rpc, context, on_error or context.abort):
                if record.header_id is not None:
                    check_id(REQUEST_ID_HEADER, record.header_id, MAX_REQUEST_ID_LEN)
                    if on_error is None:  # a stream's later requests: its headers are sent
                        await context.send_initial_metadata(
                            ((REQUEST_ID_HEADER, record.header_id),)
                        )
                yield scope

    @contextlib.asynccontextmanager
    async def _outcome(
        self, scope: RpcScope, rpc: str, context: grpc.aio.ServicerContext,
        send_error: ErrorSink,
    ):
        """Maps what the RPC raised to its status, and closes its books whatever happened."""
        code = None
        try:
            yield
        except GruserveError as exc:
            code = status_for(exc)
            if isinstance(exc, EngineDeadError):
                log.warning("%s: %s (request ids %s)", rpc, exc, scope.ids())
                if self.on_engine_dead is not None:
                    await self.on_engine_dead()
            else:
                log.debug("%s: %s %s (request ids %s)", rpc, code.name, exc, scope.ids())
            # the books are closed before the status leaves: a client that has its answer
            # finds it counted (and the engine's work already being stopped)
            self._close(scope, code)
            await send_error(code, details_of(exc))
        except asyncio.CancelledError:
            # client cancel, disconnect or deadline: grpc has already answered the client;
            # what is left is to free the engine's slots
            code = _early_end_code(context)
            log.debug("%s: %s (request ids %s)", rpc, code.name, scope.ids())
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("%s failed (request ids %s)", rpc, scope.ids())
            self._close(scope, code)
            await send_error(code, f"internal error (request ids {scope.ids()})")
        finally:
            if not scope.closed:
                self._close(scope, code or grpc.StatusCode.OK)

    def _close(self, scope: RpcScope, code: grpc.StatusCode) -> None:
        scope.closed = True
        self.metrics.count_aborted(scope.abort_unfinished())
        self.telemetry.end(scope.record, code)

    def _submit(self, scope: RpcScope, request: Request) -> RequestHandle:
        handle = scope.engine.submit(request)
        scope.handles.append(handle)
        scope.record.queued(handle.request_id)
        return handle

    def _lookup(self, scope: RpcScope, request: Request) -> RequestOutput | None:
        """The result cache's answer to a built request (Served.lookup), or None. A hit is
        in the RPC's access log and span like a decoded answer, but not in the engine's
        request metrics: it never reached the engine."""
        cached = scope.served.lookup(request)
        if cached is not None:
            scope.record.replayed(cached.request_id, cached)
        return cached

    async def _answer(self, scope: RpcScope, request: Request) -> tuple[RequestOutput, bool]:
        """(final output, whether the result cache answered it) of a built request: from
        the cache when it can, else decoded, and then remembered."""
        cached = self._lookup(scope, request)
        if cached is not None:
            return cached, True
        output = self._finished(scope, await self._submit(scope, request).result())
        scope.served.remember(request, output)
        return output, False

    def _finished(self, scope: RpcScope, output: RequestOutput) -> RequestOutput:
        if output.finish_reason is FinishReason.ABORTED:
            # only this RPC aborts its requests, and then it is no longer listening; anything
            # else (an engine shutting down) must not look like a normal end
            self.metrics.count_aborted()
            raise RequestAbortedError(f"request {output.request_id} was aborted")
        self.metrics.observe_finished(output)
        scope.record.finished(output.request_id, output)
        log.debug(
            "request %s finished (%s, %d tokens)",
            output.request_id, output.finish_reason, len(output.token_ids or ()),
        )
        return output
