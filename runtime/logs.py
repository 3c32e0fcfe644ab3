"""Logging for every gruserve command: readable text or JSON lines, one handler on stderr.

JSON lines carry `time` (UTC, ISO 8601), `level`, `logger`, `message`, and where they apply
`request_id`, `method`, `status`, `duration_ms`, `tokens`, `peer` (the access log's fields,
passed as `extra=`), and `exception`. A record logged while an RPC is being served carries
that RPC's request id without the caller passing it (`request_context`).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from datetime import UTC, datetime

from .config import LoggingConfig

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# what a record may carry beyond the message (logging's `extra=`), in JSON key order
FIELDS = ("request_id", "method", "status", "duration_ms", "tokens", "peer")

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "gruserve_request_id", default=None
)
_installed: logging.Handler | None = None  # the handler configure() put on the root logger


@contextlib.contextmanager
def request_context(request_id: str | None):
    """Records logged inside carry `request_id` (asyncio tasks inherit the context)."""
    token = _request_id.set(request_id)
    try:
        yield
    finally:
        _request_id.reset(token)


def set_request_id(request_id: str | None) -> None:
    """Updates the current context's request id (once an RPC's ids are known)."""
    _request_id.set(request_id)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (something may swap it, as
    pytest does), not to the one there was when logging was configured."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "request_id", None) is None:
            record.request_id = _request_id.get()
        for key in FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure(config: LoggingConfig, stream=None) -> logging.Handler:
    """Installs gruserve's handler on the root logger (replacing the one a previous call
    installed, and leaving any other alone: a test's capture handler keeps working)."""
    global _installed
    handler = _StderrHandler() if stream is None else logging.StreamHandler(stream)
    if config.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
    root.addHandler(handler)
    root.setLevel(config.log_level)
    _installed = handler
    return handler
