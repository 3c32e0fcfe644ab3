"""The error taxonomy of the runtime. Plain exceptions: the servicer maps each class to a
gRPC status in exactly one place (`gruserve.runtime.status`)."""

from __future__ import annotations


class GruserveError(Exception):
    """Base of every error the runtime raises on purpose."""


class RequestError(GruserveError):
    """Something wrong with one field of a request. The field and the reason are attributes,
    never text to split again: `field` is a path in the API's terms (`parameters.top_p`,
    `user_item.user_id`, `requests[3].hidden_state`), `reason` says what is wrong with it,
    `scope` is the part of the path added by with_prefix (`requests[3].`)."""

    def __init__(self, field: str, reason: str, *, scope: str = "") -> None:
        self.field = field
        self.reason = reason
        self.scope = scope
        super().__init__(self._message())

    def _message(self) -> str:
        return f"{self.field}: {self.reason}"

    def with_prefix(self, prefix: str) -> RequestError:
        """The same error for a field nested under `prefix` (e.g. "requests[3].")."""
        return type(self)(f"{prefix}{self.field}", self.reason, scope=f"{prefix}{self.scope}")


class InvalidRequestError(RequestError, ValueError):
    """A malformed or out-of-range request field."""


class NotFoundError(RequestError):
    """An external id (user or item) the model does not know. Its message is the reason,
    which names the id, after the scope if any (`requests[1]: unknown user_id 'x'`)."""

    def _message(self) -> str:
        scope = self.scope.rstrip(".")
        return f"{scope}: {self.reason}" if scope else self.reason


class QueueFullError(GruserveError):
    """The waiting queue is at its bound; the client should back off and retry."""


class RequestAbortedError(GruserveError):
    """The request was aborted (client cancel, disconnect or shutdown) before it finished."""


class EngineDeadError(GruserveError):
    """The decode loop has failed or stopped; no request can be served."""
