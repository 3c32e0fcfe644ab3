"""What serves new requests now: one bundle and its engine, swapped whole on reload.

Servicers read `host.current` once at the start of each RPC and use that for the RPC's whole
life, so a reload sends new requests to the new engine while in-flight ones finish on the
engine they started on.
"""

from __future__ import annotations

from dataclasses import dataclass

from .bundle import Bundle
from .engine import Engine


@dataclass(frozen=True)
class Served:
    bundle: Bundle
    engine: Engine
    provider: str  # the execution provider the engine's sessions got

    @property
    def version(self) -> str:
        return self.bundle.version


class ModelHost:
    def __init__(self, served: Served) -> None:
        self._current = served

    @property
    def current(self) -> Served:
        return self._current

    def swap(self, served: Served) -> Served:
        """Makes `served` current; returns the one it replaces (still running)."""
        old, self._current = self._current, served
        return old
