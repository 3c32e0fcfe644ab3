"""OpenTelemetry traces: a span per RPC, optional (the `otel` extra).

Without the extra installed every call here is a no-op and nothing imports OpenTelemetry.
With it, spans go to the tracer provider given to the server, else to the one
`--trace-exporter` builds (otlp: the standard OTEL_EXPORTER_OTLP_* variables say where;
console: stdout), else to the global one (set by `opentelemetry-instrument` or by code
embedding gruserve; without one, spans are dropped).

A span is named after the gRPC method (`gruserve.v1.Generator/Generate`, kind SERVER), takes
an incoming `traceparent` as its parent, carries the request id, and has one event per
step of each request's life: queued, admitted, first_token, finished. The events are added
when the request ends, from the timing the engine measured, so the decode loop does no
tracing work.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from gruserve import __version__

from .config import ConfigError
from .requests import RequestOutput

try:
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind, StatusCode
except ImportError:  # the otel extra is not installed
    trace = None

# gRPC server spans are errors for these codes only (OpenTelemetry's RPC conventions): the
# others are the client's doing
_SERVER_ERRORS = {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE",
                  "DATA_LOSS"}
_MISSING = "needs the otel extra (pip install 'gruserve[otel]')"


def available() -> bool:
    return trace is not None


def make_provider(exporter: str):
    """A tracer provider exporting to `exporter`; None for "none" (use the global one)."""
    if exporter == "none":
        return None
    if trace is None:
        raise ConfigError("--trace-exporter", f"{exporter} {_MISSING}")
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    if exporter == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise ConfigError("--trace-exporter", f"{exporter} {_MISSING}") from None
        span_exporter = OTLPSpanExporter()
    else:
        span_exporter = ConsoleSpanExporter()
    resource = Resource.create({"service.name": "gruserve", "service.version": __version__})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    return provider


class RpcSpan:
    """One RPC's span (or nothing, when tracing is off or not sampled)."""

    def __init__(self, span) -> None:
        self._span = span
        self._queued_ns: dict[str, int] = {}

    @property
    def recording(self) -> bool:
        return self._span is not None

    def queued(self, request_id: str) -> None:
        if self._span is not None:
            now = time.time_ns()
            self._queued_ns[request_id] = now
            self._span.add_event("queued", {"gruserve.request_id": request_id}, now)

    def finished(self, request_id: str, output: RequestOutput) -> None:
        """The request's admitted, first_token and finished events, at the times the engine
        measured from its arrival (which `queued` marked)."""
        span, start = self._span, self._queued_ns.get(request_id)
        if span is None or start is None:
            return
        attributes = {"gruserve.request_id": request_id}
        for name, seconds in (
            ("admitted", output.queue_s), ("first_token", output.first_token_s),
        ):
            if seconds is not None:
                span.add_event(name, attributes, start + int(seconds * 1e9))
        reason = output.finish_reason.value if output.finish_reason else "unknown"
        finished = {**attributes, "gruserve.finish_reason": reason,
                    "gruserve.num_tokens": len(output.token_ids or ())}
        end = start + int((output.total_s or 0.0) * 1e9)
        span.add_event("finished", finished, end)

    def replayed(self, request_id: str, output: RequestOutput) -> None:
        """A request the result cache answered: one finished event, flagged cached (it
        was never queued, admitted or decoded)."""
        if self._span is not None:
            reason = output.finish_reason.value if output.finish_reason else "unknown"
            self._span.add_event("finished", {
                "gruserve.request_id": request_id, "gruserve.finish_reason": reason,
                "gruserve.num_tokens": len(output.token_ids or ()), "gruserve.cached": True,
            })

    def end(self, request_id: str, code) -> None:
        """Ends the span with the RPC's request id and `code` (a grpc.StatusCode)."""
        span = self._span
        if span is None:
            return
        span.set_attribute("gruserve.request_id", request_id)
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code.name in _SERVER_ERRORS:
            span.set_status(StatusCode.ERROR, code.name)
        span.end()


_NO_SPAN = RpcSpan(None)


class Tracer:
    """Starts RPC spans; a no-op without the otel extra."""

    def __init__(self, provider=None) -> None:
        self._tracer = None
        if trace is not None:
            self._tracer = trace.get_tracer("gruserve", __version__, tracer_provider=provider)

    def start(self, method: str, metadata: Iterable[tuple[str, str | bytes]]) -> RpcSpan:
        """A span for `method` ("/package.Service/Method"), child of the caller's
        `traceparent` when the metadata has one."""
        if self._tracer is None:
            return _NO_SPAN
        carrier = {k: v for k, v in metadata if isinstance(v, str)}
        service, _, name = method.lstrip("/").partition("/")
        span = self._tracer.start_span(
            method.lstrip("/"), context=propagate.extract(carrier), kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        )
        return RpcSpan(span) if span.is_recording() else _NO_SPAN
