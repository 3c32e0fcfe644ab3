"""What serves new requests now: one bundle and its engine, swapped whole on reload.

Servicers read `host.current` once at the start of each RPC and use that for the RPC's whole
life, so a reload sends new requests to the new engine while in-flight ones finish on the
engine they started on.

`Served` also carries the serving policies every protocol front end applies the same way
over the engine: the result cache (`lookup` before submitting, `remember` the final output).
"""

from __future__ import annotations

from dataclasses import dataclass

from .bundle import Bundle
from .engine import Engine
from .requests import Request, RequestOutput
from .result_cache import ResultCache


@dataclass(frozen=True)
class Served:
    bundle: Bundle
    engine: Engine
    provider: str  # the execution provider the engine's sessions got
    # one cache for the process, shared by every Served; None: caching is off
    cache: ResultCache | None = None

    @property
    def version(self) -> str:
        return self.bundle.version

    def lookup(self, request: Request) -> RequestOutput | None:
        """The cached final output for a built request of this bundle, or None: decode it
        (and `remember` the result). Unseeded sampling always gets None."""
        if self.cache is None:
            return None
        return self.cache.lookup(self.version, request)

    def remember(self, request: Request, output: RequestOutput) -> None:
        """Keeps a request's finished answer for replay (when it is cacheable)."""
        if self.cache is not None:
            self.cache.store(self.version, request, output)


class ModelHost:
    def __init__(self, served: Served) -> None:
        self._current = served
        if served.cache is not None:
            served.cache.invalidate(served.version)

    @property
    def current(self) -> Served:
        return self._current

    def swap(self, served: Served) -> Served:
        """Makes `served` current; returns the one it replaces (still running). The cache
        forgets the old bundle's answers before any request can reach the new one."""
        if served.cache is not None:
            served.cache.invalidate(served.version)
        old, self._current = self._current, served
        return old
