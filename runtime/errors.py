"""The error taxonomy of the runtime. Plain exceptions: the servicer maps each class to a
gRPC status in exactly one place (`gruserve.runtime.status`)."""

from __future__ import annotations


class GruserveError(Exception):
    """Base of every error the runtime raises on purpose."""


class InvalidRequestError(GruserveError):
    """A malformed or out-of-range request field; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFoundError(GruserveError):
    """An external id (user or item) the model does not know."""


class QueueFullError(GruserveError):
    """The waiting queue is at its bound; the client should back off and retry."""


class RequestAbortedError(GruserveError):
    """The request was aborted (client cancel, disconnect or shutdown) before it finished."""


class DeadlineExceededError(GruserveError):
    """The request's deadline passed; its work was stopped."""


class EngineDeadError(GruserveError):
    """The decode loop has failed or stopped; no request can be served."""
