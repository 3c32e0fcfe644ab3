"""A method handler that answers a call with a status and nothing else (auth's denials, the
drain's refusals), in the shape of the call: grpc then reads and writes the call the way the
client expects."""

from __future__ import annotations

import grpc

_MAKE = {
    # (request_streaming, response_streaming) -> the factory of a handler of that shape
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def refusal_handler(
    code: grpc.StatusCode,
    details: str,
    *,
    request_streaming: bool,
    response_streaming: bool,
    request_deserializer=None,
    response_serializer=None,
) -> grpc.RpcMethodHandler:
    async def unary(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(code, details)

    async def streaming(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(code, details)
        yield  # pragma: no cover - makes this an async generator

    return _MAKE[(request_streaming, response_streaming)](
        streaming if response_streaming else unary,
        request_deserializer=request_deserializer,
        response_serializer=response_serializer,
    )
