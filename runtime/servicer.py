"""The gRPC servicer: look up, call the engine, convert. Thin on purpose.

Every RPC goes through `_guard`, which maps the runtime's errors to status codes via
status.status_for (the single table), counts the outcome, and aborts the engine request if
the RPC ends early for any reason (client cancel, disconnect, deadline): the slot is freed
at the next step boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2

from gruserve.v1 import gruserve_pb2 as pb
from gruserve.v1 import gruserve_pb2_grpc as pb_grpc

from . import convert
from .config import ServiceConfig
from .engine import RequestHandle
from .errors import (
    EngineDeadError,
    GruserveError,
    InvalidRequestError,
    RequestAbortedError,
    RequestError,
)
from .metrics import ServiceMetrics
from .model_host import ModelHost, Served
from .request_builder import MAX_REQUEST_ID_LEN
from .requests import FinishReason, Request, RequestOutput
from .status import status_for

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generator"].full_name

# error details travel in HTTP/2 trailers: an echoed 1 MB id must not blow the header limit
MAX_DETAILS_CHARS = 400


def _details(error: BaseException) -> str:
    text = str(error)
    if len(text) > MAX_DETAILS_CHARS:
        text = text[: MAX_DETAILS_CHARS - 3] + "..."
    return text


# A client whose deadline passes cancels the call itself, and its cancel can reach us just
# before our own copy of the deadline (which started when the request arrived) runs out
DEADLINE_SLACK_S = 0.25


def _early_end_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """Why an RPC was cancelled under us (for the metrics; the client already knows): its
    deadline passed, or the client went away."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= DEADLINE_SLACK_S:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


class _RpcScope:
    """Tracks the engine requests of one RPC so that an early end aborts all of them. The
    RPC uses the engine that was current when it started, for its whole life (a reload
    sends only new RPCs to a new engine)."""

    def __init__(self, served: Served) -> None:
        self.served = served
        self.engine = served.engine
        self.handles: list[RequestHandle] = []
        self.request_ids: list[str] = []  # for the logs, known before the engine has a handle
        self.closed = False

    def ids(self) -> str:
        return ",".join(self.request_ids) or "-"

    def abort_unfinished(self) -> None:
        for handle in self.handles:
            handle.abort()


async def _all_results(handles: list[RequestHandle]) -> list[RequestOutput]:
    """Every handle's result in order; the first failure ends the wait for all of them."""
    tasks = [asyncio.ensure_future(h.result()) for h in handles]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


class GeneratorServicer(pb_grpc.GeneratorServicer):
    def __init__(
        self,
        host: ModelHost,
        metrics: ServiceMetrics,
        health_servicer: health.aio.HealthServicer | None = None,
        *,
        service: ServiceConfig,
    ) -> None:
        self.host = host
        self.metrics = metrics
        self.health = health_servicer
        self.service = service

    @contextlib.asynccontextmanager
    async def _guard(self, rpc: str, context: grpc.aio.ServicerContext):
        scope = _RpcScope(self.host.current)
        code = None
        try:
            yield scope
        except GruserveError as exc:
            code = status_for(exc)
            if isinstance(exc, EngineDeadError):
                log.warning("%s: %s (request ids %s)", rpc, exc, scope.ids())
                await self._mark_not_serving()
            else:
                log.debug("%s: %s %s (request ids %s)", rpc, code.name, exc, scope.ids())
            # the books are closed before the status leaves: a client that has its answer
            # finds it counted (and the engine's work already being stopped)
            self._close(scope, rpc, code)
            await context.abort(code, _details(exc))
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
            self._close(scope, rpc, code)
            await context.abort(code, f"internal error (request ids {scope.ids()})")
        finally:
            if not scope.closed:
                self._close(scope, rpc, code or grpc.StatusCode.OK)

    def _close(self, scope: _RpcScope, rpc: str, code: grpc.StatusCode) -> None:
        scope.closed = True
        scope.abort_unfinished()
        self.metrics.requests.labels(rpc=rpc, code=code.name).inc()

    async def _mark_not_serving(self) -> None:
        if self.health is not None:
            await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)

    def _prepare(self, scope: _RpcScope, message: pb.GenerateRequest, stream: bool) -> Request:
        if message.request_id:  # not validated yet: escaped, so it cannot forge log lines
            rid = message.request_id[:MAX_REQUEST_ID_LEN]
            if not rid.isprintable():
                rid = rid.encode("unicode_escape").decode("ascii")
            scope.request_ids.append(rid)
        request = convert.engine_request(scope.engine, message, stream=stream)
        if not message.request_id:
            scope.request_ids.append(request.client_id)
        return request

    def _submit(self, scope: _RpcScope, request: Request) -> RequestHandle:
        handle = scope.engine.submit(request)
        scope.handles.append(handle)
        return handle

    def _finished(self, output: RequestOutput) -> RequestOutput:
        if output.finish_reason is FinishReason.ABORTED:
            # only this RPC aborts its requests, and then it is no longer listening; anything
            # else (an engine shutting down) must not look like a normal end
            raise RequestAbortedError(f"request {output.request_id} was aborted")
        self.metrics.observe_finished(output)
        log.debug(
            "request %s finished (%s, %d tokens)",
            output.request_id, output.finish_reason, len(output.token_ids or ()),
        )
        return output

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        async with self._guard("Generate", context) as scope:
            handle = self._submit(scope, self._prepare(scope, request, stream=False))
            output = self._finished(await handle.result())
            return convert.generate_response(output, scope.engine.info)

    async def GenerateStream(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        async with self._guard("GenerateStream", context) as scope:
            handle = self._submit(scope, self._prepare(scope, request, stream=True))
            first = True
            # each iteration takes everything produced since the last write: a slow reader
            # gets bigger chunks instead of a growing backlog of one-token messages
            async for delta in handle:
                if delta.finished:
                    self._finished(delta)
                await context.write(convert.stream_response(delta, scope.engine.info, first=first))
                first = False

    async def GenerateBatch(
        self, request: pb.GenerateBatchRequest, context: grpc.aio.ServicerContext
    ):
        async with self._guard("GenerateBatch", context) as scope:
            count = len(request.requests)
            limit = self.service.max_batch_requests
            if not 0 < count <= limit:
                raise InvalidRequestError("requests", f"needs 1..{limit} requests, got {count}")
            # validate everything before queuing anything: a bad item fails the call whole
            prepared = []
            for index, message in enumerate(request.requests):
                try:
                    prepared.append(self._prepare(scope, message, stream=False))
                except RequestError as exc:
                    raise exc.with_prefix(f"requests[{index}].") from None
            ids = [r.client_id for r in prepared]
            if len(set(ids)) != len(ids):
                raise InvalidRequestError("requests", "request_id values must be unique")
            handles = [self._submit(scope, r) for r in prepared]
            outputs = await _all_results(handles)
            return pb.GenerateBatchResponse(
                responses=[
                    convert.generate_response(self._finished(o), scope.engine.info)
                    for o in outputs
                ]
            )

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ):
        async with self._guard("GetModelInfo", context) as scope:
            return convert.model_info(scope.served, service=self.service)


class _Malformed:
    """Stands in for a request whose bytes did not parse."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """INVALID_ARGUMENT, not grpc's UNKNOWN with a Python traceback summary, for Generator
    requests whose bytes are not a valid message (corrupt wire format, invalid UTF-8)."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if (
            handler is None
            or handler.request_streaming
            or handler.request_deserializer is None
            or not method.startswith(f"/{SERVICE_NAME}/")
        ):
            return handler
        rpc = method.rsplit("/", 1)[-1]
        parse = handler.request_deserializer

        def safe_parse(data: bytes):
            try:
                return parse(data)
            except (DecodeError, UnicodeDecodeError, ValueError) as exc:
                return _Malformed(exc)

        async def refuse(request: _Malformed, context: grpc.aio.ServicerContext):
            self.metrics.requests.labels(rpc=rpc, code="INVALID_ARGUMENT").inc()
            log.debug("%s: unparsable request (%s)", rpc, request.error)
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid {rpc} request message"
            )

        if handler.response_streaming:
            behaviour = handler.unary_stream
            if inspect.isasyncgenfunction(behaviour):
                async def checked(request, context):
                    if isinstance(request, _Malformed):
                        await refuse(request, context)
                    async for response in behaviour(request, context):
                        yield response
            else:
                async def checked(request, context):
                    if isinstance(request, _Malformed):
                        return await refuse(request, context)
                    return await behaviour(request, context)

            return grpc.unary_stream_rpc_method_handler(
                checked, request_deserializer=safe_parse,
                response_serializer=handler.response_serializer,
            )
        behaviour = handler.unary_unary

        async def checked_unary(request, context):
            if isinstance(request, _Malformed):
                return await refuse(request, context)
            return await behaviour(request, context)

        return grpc.unary_unary_rpc_method_handler(
            checked_unary, request_deserializer=safe_parse,
            response_serializer=handler.response_serializer,
        )
