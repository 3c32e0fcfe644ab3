"""What every RPC leaves behind, whichever servicer or interceptor answers it: its count in
the metrics, one access-log line (logger `gruserve.access`, INFO, `--no-access-log` turns
it off) and a trace span.

An incoming `x-request-id` metadata value names the RPC: it is the request id of a
single-request RPC whose message has none, it is echoed in the response's initial
metadata, and logs and spans carry it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import grpc

from .metrics import ServiceMetrics
from .requests import RequestOutput
from .tracing import RpcSpan, Tracer

ACCESS_LOGGER = "gruserve.access"
REQUEST_ID_HEADER = "x-request-id"

access_log = logging.getLogger(ACCESS_LOGGER)


@dataclass
class RpcRecord:
    method: str  # "/package.Service/Method"
    header_id: str | None  # the caller's x-request-id
    peer: str
    span: RpcSpan
    started: float = field(default_factory=time.perf_counter)
    request_ids: list[str] = field(default_factory=list)
    num_tokens: int = 0

    @property
    def rpc(self) -> str:
        return self.method.rsplit("/", 1)[-1]

    def ids(self) -> str:
        """The RPC's id: the caller's x-request-id, else its requests' ids."""
        return self.header_id or ",".join(self.request_ids) or "-"

    def queued(self, request_id: str) -> None:
        self.span.queued(request_id)

    def finished(self, request_id: str, output: RequestOutput) -> None:
        self.num_tokens += len(output.token_ids or ())
        self.span.finished(request_id, output)

    def replayed(self, request_id: str, output: RequestOutput) -> None:
        """A request answered from the result cache."""
        self.num_tokens += len(output.token_ids or ())
        self.span.replayed(request_id, output)


def _header(metadata, key: str) -> str | None:
    for name, value in metadata or ():
        if name == key and isinstance(value, str):
            return value
    return None


class RpcTelemetry:
    def __init__(
        self, metrics: ServiceMetrics, tracer: Tracer | None = None, *, access: bool = True
    ) -> None:
        self.metrics = metrics
        self.tracer = tracer or Tracer()
        self.access = access

    def begin(self, method: str, metadata, peer: str = "") -> RpcRecord:
        return RpcRecord(
            method, _header(metadata, REQUEST_ID_HEADER), peer,
            self.tracer.start(method, metadata or ()),
        )

    def begin_call(self, method: str, context: grpc.aio.ServicerContext) -> RpcRecord:
        return self.begin(method, context.invocation_metadata(), context.peer())

    def end(self, record: RpcRecord, code: grpc.StatusCode) -> None:
        self.metrics.requests.labels(rpc=record.rpc, code=code.name).inc()
        record.span.end(record.ids(), code)
        if not self.access:
            return
        duration_ms = round((time.perf_counter() - record.started) * 1e3, 3)
        request_id = record.ids()
        access_log.info(
            "%s %s %.1fms tokens=%d request_id=%s peer=%s", record.method.lstrip("/"),
            code.name, duration_ms, record.num_tokens, request_id, record.peer or "-",
            extra=dict(
                request_id=request_id if request_id != "-" else None,
                method=record.method.lstrip("/"), status=code.name,
                duration_ms=duration_ms, tokens=record.num_tokens, peer=record.peer or None,
            ),
        )

    def denied(self, method: str, metadata) -> None:
        """An RPC refused before any servicer saw it (token auth)."""
        self.end(self.begin(method, metadata), grpc.StatusCode.UNAUTHENTICATED)

    def refused(self, method: str, metadata) -> None:
        """An RPC refused before any servicer saw it (the server stopped accepting)."""
        self.end(self.begin(method, metadata), grpc.StatusCode.UNAVAILABLE)
