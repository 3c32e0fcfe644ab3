"""Optional bearer-token auth: a server interceptor comparing in constant time.

Health checks stay open so that probes (kubelet, load balancers) need no secret. Everything
else, reflection included, needs `authorization: Bearer <token>`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable
from pathlib import Path

import grpc

from .refusal import refusal_handler

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
DENIED = "missing or invalid bearer token"


def load_token(token_file: str | None, token_env: str | None) -> str | None:
    """The token from a file (its first line) or an environment variable; None disables auth."""
    if token_file and token_env:
        raise ValueError("give the token in a file or an environment variable, not both")
    if token_file:
        lines = Path(token_file).read_text(encoding="utf-8").strip().splitlines()
        token = lines[0].strip() if lines else ""
        if not token:
            raise ValueError(f"{token_file}: token file is empty")
        return token
    if token_env:
        token = os.environ.get(token_env, "").strip()
        if not token:
            raise ValueError(f"${token_env} is unset or empty")
        return token
    return None


def _digest(value: str | bytes) -> bytes:
    # comparing fixed-size digests keeps even the token's length out of the timing
    data = value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")
    return hashlib.sha256(data).digest()


def bearer_credentials(header: str | bytes) -> str | bytes:
    """The credentials of an `authorization: Bearer <token>` value, "" for another scheme.
    The scheme is case-insensitive and may be followed by several spaces (RFC 7235)."""
    if not isinstance(header, str):
        return ""
    scheme, _, credentials = header.strip().partition(" ")
    return credentials.strip(" ") if scheme.lower() == "bearer" else ""


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every RPC but health checks without `authorization: Bearer <token>`.

    on_denied(method, metadata) is called for each refusal of a known method (metrics,
    access log).
    """

    def __init__(
        self, token: str, on_denied: Callable[[str, tuple], None] | None = None
    ) -> None:
        if not token:
            raise ValueError("empty bearer token")
        self._expected = _digest(token)
        self._on_denied = on_denied

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(OPEN_METHOD_PREFIXES):
            return await continuation(handler_call_details)
        metadata = handler_call_details.invocation_metadata or ()
        supplied = ""
        for key, value in metadata:
            if key == "authorization":
                supplied = bearer_credentials(value)
                break
        # an empty token never matches: the constructor refuses one
        if supplied and hmac.compare_digest(_digest(supplied), self._expected):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # an unknown method: UNIMPLEMENTED, as without auth
        if self._on_denied is not None:
            self._on_denied(method, tuple(metadata))
        return refusal_handler(
            grpc.StatusCode.UNAUTHENTICATED, DENIED,
            request_streaming=handler.request_streaming,
            response_streaming=handler.response_streaming,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
