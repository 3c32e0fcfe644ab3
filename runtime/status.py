"""The one mapping from the runtime's errors to gRPC status codes."""

from __future__ import annotations

import grpc

from .errors import (
    EngineDeadError,
    InvalidRequestError,
    NotFoundError,
    QueueFullError,
    RequestAbortedError,
)

STATUS_OF = {
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    QueueFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    RequestAbortedError: grpc.StatusCode.CANCELLED,
    EngineDeadError: grpc.StatusCode.UNAVAILABLE,
}


def status_for(error: BaseException) -> grpc.StatusCode:
    """INTERNAL for anything not in the table: a bug, to be logged with context."""
    for kind, code in STATUS_OF.items():
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL
