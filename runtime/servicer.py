"""The gruserve.v1 servicer: look up, call the engine, convert. Thin on purpose.

Every RPC goes through `_guard` (rpc.ServicerBase): errors to status codes through the one
table, the outcome counted, the engine's requests aborted if the RPC ends early.
"""

from __future__ import annotations

import inspect
import logging

import grpc
from google.protobuf.message import DecodeError

from gruserve.v1 import gruserve_pb2 as pb
from gruserve.v1 import gruserve_pb2_grpc as pb_grpc

from . import convert, logs
from .errors import InvalidRequestError, RequestError
from .requests import Request
from .rpc import RpcScope, ServicerBase, gather_all, loggable_id
from .telemetry import RpcTelemetry

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generator"].full_name


class GeneratorServicer(ServicerBase, pb_grpc.GeneratorServicer):
    service_name = SERVICE_NAME

    def _prepare(
        self, scope: RpcScope, message: pb.GenerateRequest, stream: bool, *, single: bool
    ) -> Request:
        """The message as an engine request. In a single-request RPC, a message without a
        request_id takes the caller's x-request-id."""
        request_id = message.request_id
        if not request_id and single and scope.record.header_id:
            request_id = scope.record.header_id
        if request_id:
            scope.request_ids.append(loggable_id(request_id))
        request = convert.engine_request(
            scope.engine, message, stream=stream, request_id=request_id
        )
        if not request_id:
            scope.request_ids.append(request.client_id)
        logs.set_request_id(scope.ids())
        return request

    def _count_fallbacks(self, requests: list[Request]) -> None:
        self.metrics.count_fallbacks(
            users=sum(r.user_fallback for r in requests),
            items=sum(r.item_fallback for r in requests),
        )

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        async with self._guard("Generate", context) as scope:
            prepared = self._prepare(scope, request, False, single=True)
            self._count_fallbacks([prepared])
            output, cached = await self._answer(scope, prepared)
            return convert.generate_response(
                output, scope.engine.info, request=prepared, cached=cached
            )

    async def GenerateStream(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        async with self._guard("GenerateStream", context) as scope:
            prepared = self._prepare(scope, request, True, single=True)
            self._count_fallbacks([prepared])
            info = scope.engine.info
            cached = self._lookup(scope, prepared)
            if cached is not None:  # the whole answer in one message
                await context.write(convert.stream_response(
                    cached, info, first=True, request=prepared, cached=True
                ))
                return
            handle = self._submit(scope, prepared)
            first = True
            # each chunk takes everything produced since the last write: a slow reader gets
            # bigger chunks instead of a growing backlog of one-token messages
            async for delta in handle.chunks(**self.stream_flush):
                if delta.finished:
                    scope.served.remember(prepared, self._finished(scope, delta))
                await context.write(
                    convert.stream_response(delta, info, first=first, request=prepared)
                )
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
                    prepared.append(self._prepare(scope, message, False, single=False))
                except RequestError as exc:
                    raise exc.with_prefix(f"requests[{index}].") from None
            ids = [r.client_id for r in prepared]
            if len(set(ids)) != len(ids):
                raise InvalidRequestError("requests", "request_id values must be unique")
            self._count_fallbacks(prepared)
            # the cache answers what it can; the rest is decoded concurrently
            answers = await gather_all(self._answer(scope, r) for r in prepared)
            info = scope.engine.info
            return pb.GenerateBatchResponse(
                responses=[
                    convert.generate_response(output, info, request=r, cached=cached)
                    for r, (output, cached) in zip(prepared, answers, strict=True)
                ]
            )

    async def PredictRatings(
        self, request: pb.PredictRatingsRequest, context: grpc.aio.ServicerContext
    ):
        async with self._guard("PredictRatings", context) as scope:
            request_id = request.request_id or scope.record.header_id or ""
            if request_id:
                scope.request_ids.append(loggable_id(request_id))
                logs.set_request_id(scope.ids())
            prepared = convert.rating_request(scope.engine, request, request_id=request_id)
            self.metrics.count_fallbacks(
                users=int(prepared.user_fallback.sum()),
                items=int(prepared.item_fallback.sum()),
            )
            output = await scope.engine.rate(prepared)
            self.metrics.rated_pairs.inc(prepared.num_pairs)
            return convert.ratings_response(output, prepared, request)

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
    """INVALID_ARGUMENT, not grpc's UNKNOWN with a Python traceback summary, for requests to
    `services` whose bytes are not a valid message (corrupt wire format, invalid UTF-8),
    unary or on a bidirectional stream."""

    def __init__(self, telemetry: RpcTelemetry, services: tuple[str, ...] = (SERVICE_NAME,)):
        self.telemetry = telemetry
        self.prefixes = tuple(f"/{name}/" for name in services)
        # method -> (the handler grpc gave, its checked wrapper): built once per method, not
        # per call (grpc hands out the same handler object for a method each time). Only
        # wrapped handlers are kept, and only registered methods have one to wrap: a client
        # naming ever new unknown methods cannot grow it.
        self._wrapped: dict[str, tuple] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._wrap(method, handler)
        if wrapped is not handler:
            self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler):
        if (
            handler is None
            or handler.request_deserializer is None
            or not method.startswith(self.prefixes)
            or (handler.request_streaming and not handler.response_streaming)
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
            self.telemetry.end(
                self.telemetry.begin_call(method, context), grpc.StatusCode.INVALID_ARGUMENT
            )
            log.debug("%s: unparsable request (%s)", rpc, request.error)
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid {rpc} request message"
            )

        if handler.request_streaming:
            return self._checked_stream(handler, safe_parse, refuse)
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

    @staticmethod
    def _checked_stream(handler, safe_parse, refuse):
        """A bidirectional stream whose first unparsable message ends it, INVALID_ARGUMENT."""
        behaviour = handler.stream_stream

        async def checked_requests(request_iterator, context):
            async for request in request_iterator:
                if isinstance(request, _Malformed):
                    await refuse(request, context)
                yield request

        if inspect.isasyncgenfunction(behaviour):
            async def checked(request_iterator, context):
                requests = checked_requests(request_iterator, context)
                async for response in behaviour(requests, context):
                    yield response
        else:
            async def checked(request_iterator, context):
                return await behaviour(checked_requests(request_iterator, context), context)

        return grpc.stream_stream_rpc_method_handler(
            checked, request_deserializer=safe_parse,
            response_serializer=handler.response_serializer,
        )
