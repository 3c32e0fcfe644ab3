"""Runs a real GruServer on a real socket (port 0) in a background event-loop thread."""

from __future__ import annotations

import asyncio
import threading
from contextlib import contextmanager

from gruserve.runtime.bundle import load_bundle
from gruserve.runtime.server import GruServer, ServerConfig


class ServerThread:
    def __init__(self, bundle_dir, **config) -> None:
        config.setdefault("port", 0)
        config.setdefault("num_slots", 32)
        config.setdefault("device", "cpu")
        self.config = ServerConfig(**config)
        self.bundle = load_bundle(bundle_dir)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: GruServer | None = None

    def call(self, coro, timeout: float = 60.0):
        """Runs a coroutine on the server's loop and waits for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> ServerThread:
        self.thread.start()

        async def _start():
            self.server = GruServer(self.bundle, self.config)
            await self.server.start()

        self.call(_start())
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def stop(self, grace: float = 1.0) -> None:
        if self.server is not None:
            self.call(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@contextmanager
def running_server(bundle_dir, **config):
    server = ServerThread(bundle_dir, **config).start()
    try:
        yield server
    finally:
        server.stop()
