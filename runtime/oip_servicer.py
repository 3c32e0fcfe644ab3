"""The Open Inference Protocol servicer (`inference.GRPCInferenceService`, KServe v2 with
Triton's streaming): look up, call the engine, convert. Thin on purpose.

It serves the same engine as gruserve.v1, through the same guard (rpc.ServicerBase): the
same limits, status table, metrics (`gruserve_requests{rpc, code}`) and cancellation. A
request with N rows is N generations decoded concurrently (all submitted, then gathered).

ModelInfer answers rows from the result cache when it holds them (Served.lookup, as
gruserve.v1 does); ModelStreamInfer always decodes.

ModelStreamInfer serves the requests of a stream concurrently. Each is its own unit: it
reads the model that is current when it arrives (a long-lived stream follows reloads), it
is counted on its own, and its error comes back in-band (`error_message`) while the stream
stays open for the others. Its responses: one per chunk of tokens (TOKEN_IDS, LENGTHS,
TEXT, LOGPROBS: the tokens since the previous response; a slow reader gets bigger chunks),
then a final one with RATING and FINISH_REASON, flagged `triton_final_response`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from gruserve.inference import grpc_service_pb2 as pb
from gruserve.inference import grpc_service_pb2_grpc as pb_grpc

from . import oip_convert
from .engine import RequestHandle
from .errors import NotFoundError
from .model_host import Served
from .oip_convert import InferCall, Row
from .requests import RequestOutput
from .rpc import RpcScope, ServicerBase, gather_all, loggable_id
from .telemetry import RpcTelemetry

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


class InferenceServicer(ServicerBase, pb_grpc.GRPCInferenceServiceServicer):
    service_name = SERVICE_NAME

    def __init__(self, *args, is_ready: Callable[[], bool], **kwargs) -> None:
        """ServicerBase's arguments, and is_ready: whether the server's health is SERVING."""
        super().__init__(*args, **kwargs)
        self.is_ready = is_ready

    def _ready(self, served: Served) -> bool:
        return self.is_ready() and served.engine.healthy

    # --- health and metadata -------------------------------------------------------------

    async def ServerLive(self, request, context: grpc.aio.ServicerContext):
        async with self._guard("ServerLive", context):
            return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context: grpc.aio.ServicerContext):
        async with self._guard("ServerReady", context) as scope:
            return pb.ServerReadyResponse(ready=self._ready(scope.served))

    async def ModelReady(self, request: pb.ModelReadyRequest, context):
        async with self._guard("ModelReady", context) as scope:
            oip_convert.check_model(scope.served, request.name, request.version)
            return pb.ModelReadyResponse(ready=self._ready(scope.served))

    async def ServerMetadata(self, request, context: grpc.aio.ServicerContext):
        async with self._guard("ServerMetadata", context):
            return oip_convert.server_metadata()

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context):
        async with self._guard("ModelMetadata", context) as scope:
            oip_convert.check_model(scope.served, request.name, request.version)
            return oip_convert.model_metadata(scope.served)

    async def ModelConfig(self, request: pb.ModelConfigRequest, context):
        async with self._guard("ModelConfig", context) as scope:
            oip_convert.check_model(scope.served, request.name, request.version)
            return oip_convert.model_config(
                scope.served, max_rows=self.service.max_batch_requests
            )

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context):
        async with self._guard("RepositoryIndex", context) as scope:
            if request.repository_name:
                raise NotFoundError(
                    "repository_name",
                    f"unknown repository {request.repository_name!r} (gruserve has one, "
                    "unnamed: leave it empty)",
                )
            return oip_convert.repository_index(
                scope.served, ready=self._ready(scope.served), ready_only=request.ready
            )

    # --- inference -----------------------------------------------------------------------

    def _prepare(self, scope: RpcScope, message: pb.ModelInferRequest, stream: bool):
        if message.id:
            scope.request_ids.append(loggable_id(message.id))
        call = oip_convert.infer_call(
            scope.served, message, stream=stream, max_rows=self.service.max_batch_requests
        )
        if not message.id:
            scope.request_ids.extend(r.client_id for r in call.requests)
        return call

    async def ModelInfer(self, request: pb.ModelInferRequest, context):
        async with self._guard("ModelInfer", context) as scope:
            call = self._prepare(scope, request, stream=False)
            # rows the result cache holds are replayed, the rest decoded concurrently
            answers = await gather_all(self._answer(scope, r) for r in call.requests)
            info = scope.engine.info
            rows = [oip_convert.row_of(output, info) for output, _cached in answers]
            return oip_convert.infer_response(call, rows)

    async def ModelStreamInfer(self, request_iterator, context: grpc.aio.ServicerContext):
        # (response, future set once written): a request waits for its write before it
        # takes the engine's next tokens, which merge meanwhile
        writes: asyncio.Queue = asyncio.Queue()
        serving: set[asyncio.Task] = set()

        async def read() -> None:
            try:
                async for message in request_iterator:
                    task = asyncio.create_task(self._stream_request(message, writes, context))
                    serving.add(task)
                    task.add_done_callback(serving.discard)
                # the client half-closed: the stream ends once its requests are answered
                while serving:
                    await asyncio.wait(set(serving))
            finally:
                writes.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await writes.get()) is not None:
                response, written = item
                await context.write(response)
                if not written.done():
                    written.set_result(None)
            await reader
        finally:
            reader.cancel()
            for task in list(serving):
                task.cancel()

    async def _stream_request(
        self, message: pb.ModelInferRequest, writes: asyncio.Queue, context
    ) -> None:
        loop = asyncio.get_running_loop()

        async def send(response: pb.ModelStreamInferResponse) -> None:
            written = loop.create_future()
            writes.put_nowait((response, written))
            await written

        async def send_error(code: grpc.StatusCode, details: str) -> None:
            await send(oip_convert.stream_error(message, code.name, details))

        final = None
        async with self._guard("ModelStreamInfer", context, on_error=send_error) as scope:
            call = self._prepare(scope, message, stream=True)
            handles = [self._submit(scope, r) for r in call.requests]
            final = await self._stream_rows(scope, call, handles, send)
        if final is not None:  # sent once counted: a client that has it finds it counted
            await send(final)

    async def _stream_rows(
        self, scope: RpcScope, call: InferCall, handles: list[RequestHandle], send
    ) -> pb.ModelStreamInferResponse:
        """Sends chunks of every row's new tokens as they come; returns the final response."""
        info = scope.engine.info
        deltas: asyncio.Queue = asyncio.Queue()

        async def follow(row: int, handle: RequestHandle) -> None:
            try:
                async for delta in handle.chunks(**self.stream_flush):
                    deltas.put_nowait((row, delta))
            except Exception as exc:  # noqa: BLE001 - handed to the gathering side below
                deltas.put_nowait((row, exc))

        followers = [asyncio.create_task(follow(i, h)) for i, h in enumerate(handles)]
        finals: list[RequestOutput | None] = [None] * len(handles)
        started = [False] * len(handles)  # whether a row's text has begun (leading spaces)
        try:
            while any(f is None for f in finals):
                pending = [await deltas.get()]
                while not deltas.empty():
                    pending.append(deltas.get_nowait())
                tokens: list[list[int]] = [[] for _ in handles]
                logprobs: list[list[float]] = [[] for _ in handles]
                for row, delta in pending:
                    if isinstance(delta, Exception):
                        raise delta
                    tokens[row].extend(delta.new_token_ids)
                    logprobs[row].extend(delta.new_logprobs or ())
                    if delta.finished:
                        finals[row] = self._finished(scope, delta)
                if any(tokens):
                    rows = []
                    for i, new in enumerate(tokens):
                        text = info.detokenize(new)
                        rows.append(Row(new, logprobs[i], " " + text if started[i] and text
                                        else text))
                        started[i] = started[i] or bool(new)
                    await send(oip_convert.stream_chunk(call, rows))
            return oip_convert.stream_final(call, [oip_convert.row_of(f, info) for f in finals])
        finally:
            for follower in followers:
                follower.cancel()


# Triton's RPCs gruserve does not serve, and why: refused with UNIMPLEMENTED and the reason
# (rather than grpc's bare "Method not found!"), counted like every RPC
REFUSED = {
    "ModelStatistics": "gruserve keeps no Triton statistics; scrape its Prometheus /metrics "
    "(--metrics-port)",
    "RepositoryModelLoad": "the model is fixed at start; SIGHUP reloads its bundle directory",
    "RepositoryModelUnload": "the model is fixed at start; SIGHUP reloads its bundle directory",
    "TraceSetting": "tracing is not supported",
    "LogSettings": "logging is configured at start (--log-level)",
    **{
        f"{kind}SharedMemory{op}": "shared memory is not supported: send tensor data in the "
        "request"
        for kind in ("System", "Cuda")
        for op in ("Status", "Register", "Unregister")
    },
}


class RefusedMethods(grpc.GenericRpcHandler):
    def __init__(self, telemetry: RpcTelemetry) -> None:
        self.telemetry = telemetry

    def service(self, handler_call_details):
        prefix = f"/{SERVICE_NAME}/"
        method = handler_call_details.method
        name = method[len(prefix):] if method.startswith(prefix) else None
        reason = REFUSED.get(name)
        if reason is None:
            return None

        async def refuse(request: bytes, context: grpc.aio.ServicerContext):
            record = self.telemetry.begin_call(method, context)
            self.telemetry.end(record, grpc.StatusCode.UNIMPLEMENTED)
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name}: {reason}")

        # the request stays bytes: nothing is parsed for a refusal
        return grpc.unary_unary_rpc_method_handler(refuse)
