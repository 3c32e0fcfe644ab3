"""The gRPC servicer: look up, call the engine, convert. Thin on purpose.

Every RPC goes through `_guard`, which maps the runtime's errors to status codes via
status.status_for (the single table), counts the outcome, and aborts the engine request if
the RPC ends early for any reason (client cancel, disconnect, deadline): the slot is freed
at the next step boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from grpc_health.v1 import health, health_pb2

from gruserve.v1 import gruserve_pb2 as pb
from gruserve.v1 import gruserve_pb2_grpc as pb_grpc

from . import convert
from .engine import Engine, RequestHandle
from .errors import EngineDeadError, GruserveError, InvalidRequestError
from .metrics import ServiceMetrics
from .status import status_for

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generator"].full_name


class _RpcScope:
    """Tracks the engine requests of one RPC so that an early end aborts all of them."""

    def __init__(self) -> None:
        self.handles: list[RequestHandle] = []

    def abort_unfinished(self) -> None:
        for handle in self.handles:
            handle.abort()


class GeneratorServicer(pb_grpc.GeneratorServicer):
    def __init__(
        self,
        engine: Engine,
        metrics: ServiceMetrics,
        health_servicer: health.aio.HealthServicer | None = None,
        *,
        provider: str,
        precision: str,
        max_batch_requests: int = 64,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.health = health_servicer
        self.provider = provider
        self.precision = precision
        self.max_batch_requests = max_batch_requests

    @contextlib.asynccontextmanager
    async def _guard(self, rpc: str, context: grpc.aio.ServicerContext):
        scope = _RpcScope()
        code = grpc.StatusCode.OK
        try:
            yield scope
        except GruserveError as exc:
            code = status_for(exc)
            if isinstance(exc, EngineDeadError):
                await self._mark_not_serving()
            await context.abort(code, str(exc))
        except asyncio.CancelledError:
            # client cancel, disconnect or deadline: grpc already answers the client
            code = grpc.StatusCode.CANCELLED
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            ids = ",".join(h.request_id for h in scope.handles) or "-"
            log.exception("%s failed (request ids %s)", rpc, ids)
            await context.abort(code, f"internal error (request ids {ids})")
        finally:
            scope.abort_unfinished()
            self.metrics.requests.labels(rpc=rpc, code=code.name).inc()

    async def _mark_not_serving(self) -> None:
        if self.health is not None:
            await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)

    def _submit(self, scope: _RpcScope, message: pb.GenerateRequest, stream: bool) -> RequestHandle:
        request = convert.engine_request(self.engine, message, stream=stream)
        handle = self.engine.submit(request)
        scope.handles.append(handle)
        return handle

    async def _result(self, handle: RequestHandle):
        output = await handle.result()
        self.metrics.observe_finished(output)
        return output

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        async with self._guard("Generate", context) as scope:
            handle = self._submit(scope, request, stream=False)
            output = await self._result(handle)
            return convert.generate_response(output, self.engine.info)

    async def GenerateStream(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        async with self._guard("GenerateStream", context) as scope:
            handle = self._submit(scope, request, stream=True)
            first = True
            # each iteration takes everything produced since the last write: a slow reader
            # gets bigger chunks instead of a growing backlog of one-token messages
            async for delta in handle:
                if delta.finished:
                    self.metrics.observe_finished(delta)
                await context.write(convert.stream_response(delta, self.engine.info, first=first))
                first = False

    async def GenerateBatch(
        self, request: pb.GenerateBatchRequest, context: grpc.aio.ServicerContext
    ):
        async with self._guard("GenerateBatch", context) as scope:
            count = len(request.requests)
            if not 0 < count <= self.max_batch_requests:
                raise InvalidRequestError(
                    "requests", f"needs 1..{self.max_batch_requests} requests, got {count}"
                )
            # validate everything before queuing anything: a bad item fails the call whole
            prepared = []
            for index, message in enumerate(request.requests):
                try:
                    prepared.append(convert.engine_request(self.engine, message, stream=False))
                except InvalidRequestError as exc:
                    raise InvalidRequestError(f"requests[{index}].{exc.field}", str(exc)) from None
            ids = [r.request_id for r in prepared]
            if len(set(ids)) != len(ids):
                raise InvalidRequestError("requests", "request_id values must be unique")
            for r in prepared:
                handle = self.engine.submit(r)
                scope.handles.append(handle)
            outputs = await asyncio.gather(*(self._result(h) for h in scope.handles))
            return pb.GenerateBatchResponse(
                responses=[convert.generate_response(o, self.engine.info) for o in outputs]
            )

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext):
        async with self._guard("GetModelInfo", context):
            return convert.model_info(
                self.engine, provider=self.provider, precision=self.precision,
                max_batch_requests=self.max_batch_requests,
            )
