"""The stop of accepting, done in front of the handlers, where no accepted call is lost.

grpc's own `server.stop()` cannot be the stop of accepting: grpc.aio asks its core for one
call at a time per method, so a burst of calls waits in the core's per-method queue until
the event loop takes them one by one (about 0.5 ms each), and stop() destroys that queue:
each call in it ends CANCELLED, unstarted, though the transport had accepted it
(grpc/grpc#41785). CANCELLED is not retried, so every one is a request lost by a rollout.

So the core keeps running while the server drains, and the stop of accepting is here:

- DrainGate, the outermost interceptor, counts the service's RPCs that it admits until
  their task ends (the status is sent), and refuses with UNAVAILABLE, at once, those that
  reach it after their method closed.
- close() closes each method behind a barrier: one call per method through a private Unix
  socket of the same server. The core queues a method's calls in arrival order, whatever
  the connection, so when a method's barrier reaches the gate, every call of that method
  that the transport had accepted before it has been admitted already.

- flush() sends a second round: calls still in transit at the first one (sent before the
  stop of accepting, read by the transport after it) are refused (UNAVAILABLE) before the
  core's stop could end them CANCELLED.

The core's stop comes right after, and it can still end CANCELLED a call that reaches the
server after the second barrier or before its client has read the GOAWAY: only calls sent
after the stop of accepting began, and none once load balancers have taken the endpoint
out (the shutdown delay). That is for grpc to fix (grpc/grpc#41786, open, answers
UNAVAILABLE instead).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Sequence

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from .refusal import refusal_handler

log = logging.getLogger(__name__)

BARRIER_KEY = "gruserve-drain-barrier"
REFUSED = "the server is shutting down and accepts no new calls; retry on another replica"


class DrainGate(grpc.aio.ServerInterceptor):
    """Admits and counts the RPCs of the given services until close(), then refuses them.

    Must come first among the interceptors: its decision is taken in the order grpc hands
    out the calls, before anything awaits. on_refused(method, metadata) is called for each
    refusal (the metrics, the access log).
    """

    def __init__(
        self,
        services: Sequence[ServiceDescriptor],
        on_refused: Callable[[str, tuple], None] | None = None,
    ) -> None:
        self._shapes = {
            f"/{service.full_name}/{m.name}": (m.client_streaming, m.server_streaming)
            for service in services
            for m in service.methods
        }
        self._refusals = {
            method: refusal_handler(
                grpc.StatusCode.UNAVAILABLE, REFUSED,
                request_streaming=request_streaming, response_streaming=response_streaming,
            )
            for method, (request_streaming, response_streaming) in self._shapes.items()
        }
        self._on_refused = on_refused
        self._token = secrets.token_hex(16)  # a barrier comes from this server, no one else
        self._closed: set[str] = set()
        self._barrier_channel: grpc.aio.Channel | None = None
        self._num_active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def num_active(self) -> int:
        """Admitted RPCs whose status is not sent yet."""
        return self._num_active

    @property
    def closed(self) -> bool:
        return len(self._closed) == len(self._shapes)

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method not in self._shapes:  # another service (health, reflection), or unknown
            return await continuation(handler_call_details)
        if self._is_barrier(handler_call_details.invocation_metadata):
            self._closed.add(method)
            return self._refusals[method]
        if method in self._closed:
            if self._on_refused is not None:
                self._on_refused(method, tuple(handler_call_details.invocation_metadata or ()))
            return self._refusals[method]
        self._admit()
        return await continuation(handler_call_details)

    def _is_barrier(self, metadata) -> bool:
        return any(key == BARRIER_KEY and value == self._token for key, value in metadata or ())

    def _admit(self) -> None:
        # interceptors run inside the RPC's own task, which ends once its status is sent,
        # whatever happens meanwhile (even a client that cancels before its handler starts)
        task = asyncio.current_task()
        if task is None:  # not inside grpc.aio's RPC task: nothing to wait for
            return
        self._num_active += 1
        self._idle.clear()
        task.add_done_callback(self._release)

    def _release(self, _task: asyncio.Task) -> None:
        self._num_active -= 1
        if self._num_active == 0:
            self._idle.set()

    async def connect_barrier(self, address: str) -> None:
        """Opens the channel the barrier will take (`address`: a target of this very
        server), now rather than when time counts."""
        self._barrier_channel = grpc.aio.insecure_channel(address)
        await self._barrier_channel.channel_ready()

    async def close(self) -> None:
        """Stops admitting, each method once its barrier has come through; all methods at
        once if there is no barrier channel, if the barrier fails, or if this is cancelled."""
        try:
            await self._barrier_round()
        except (OSError, grpc.RpcError) as exc:
            log.warning("refusing new calls at once: the drain barrier failed (%s)", exc)
        finally:
            self.refuse_all()

    async def flush(self) -> None:
        """The second round of barriers (after close()), then the barrier channel closes."""
        try:
            await self._barrier_round()
        except (OSError, grpc.RpcError) as exc:
            log.debug("the second drain barrier failed (%s)", exc)
        finally:
            channel, self._barrier_channel = self._barrier_channel, None
            if channel is not None:
                await channel.close()

    async def _barrier_round(self) -> None:
        if self._barrier_channel is None:
            raise OSError("no barrier channel")
        channel = self._barrier_channel
        await asyncio.gather(*(self._send_barrier(channel, m) for m in self._shapes))

    def refuse_all(self) -> None:
        """Closes every method now, barrier or not."""
        self._closed.update(self._shapes)

    async def _send_barrier(self, channel: grpc.aio.Channel, method: str) -> None:
        request_streaming, response_streaming = self._shapes[method]
        open_call = {
            (False, False): channel.unary_unary,
            (False, True): channel.unary_stream,
            (True, False): channel.stream_unary,
            (True, True): channel.stream_stream,
        }[(request_streaming, response_streaming)](method)
        # the gate answers before anything is read: no request message, or an empty stream
        call = open_call(iter(()) if request_streaming else b"",
                         metadata=((BARRIER_KEY, self._token),))
        try:
            if response_streaming:
                async for _ in call:
                    pass
            else:
                await call
        except grpc.aio.AioRpcError as exc:
            if exc.details() == REFUSED:
                return  # the gate saw it: the method is closed
            raise
        raise OSError(f"{method}: the drain barrier was answered")

    async def wait_idle(self) -> None:
        """Returns once no admitted RPC is left."""
        await self._idle.wait()
