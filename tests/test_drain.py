"""The drain loses nothing: every RPC the server accepted before the stop of accepting is
served (or, past the grace period, ends UNAVAILABLE), never CANCELLED. Real gRPC over real
sockets."""

from __future__ import annotations

import asyncio
import collections
import logging
import time

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gruserve.runtime.drain import REFUSED, DrainGate

from .serving import WAIT_S

HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
CHECK = "/grpc.health.v1.Health/Check"


# --- the gate alone, in front of a real grpc.aio server ------------------------------------


class _HeldHealth(health.aio.HealthServicer):
    """Check waits until released: an RPC that stays in flight as long as a test wants."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.num_started = 0

    async def Check(self, request, context):
        self.num_started += 1
        await self.release.wait()
        return await super().Check(request, context)


async def _gated_server(tmp_path, servicer, refused: list[str]):
    gate = DrainGate([HEALTH], on_refused=lambda method, metadata: refused.append(method))
    server = grpc.aio.server(interceptors=[gate])
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    barrier = f"unix:{tmp_path}/barrier.sock"
    assert server.add_insecure_port(barrier)
    await server.start()
    await gate.connect_barrier(barrier)
    return server, gate, f"127.0.0.1:{port}"


async def _code(call) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        assert exc.code() != grpc.StatusCode.UNAVAILABLE or exc.details() == REFUSED
        return exc.code()
    return grpc.StatusCode.OK


def test_the_gate_admits_until_its_barrier_then_refuses_unavailable(tmp_path):
    async def main():
        servicer, refused = _HeldHealth(), []
        server, gate, target = await _gated_server(tmp_path, servicer, refused)
        async with grpc.aio.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            held = asyncio.ensure_future(stub.Check(health_pb2.HealthCheckRequest()))
            await _until(lambda: servicer.num_started == 1)
            assert gate.num_active == 1
            await asyncio.wait_for(gate.close(), WAIT_S)
            assert gate.closed
            late = stub.Check(health_pb2.HealthCheckRequest(), timeout=WAIT_S)
            assert await _code(late) == grpc.StatusCode.UNAVAILABLE  # at once: not held
            watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=WAIT_S)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in watch:
                    pass
            assert (info.value.code(), info.value.details()) == (
                grpc.StatusCode.UNAVAILABLE, REFUSED
            )
            assert refused == [CHECK, "/grpc.health.v1.Health/Watch"]  # the barrier is not
            idle = asyncio.ensure_future(gate.wait_idle())
            await asyncio.sleep(0.05)
            assert not idle.done()  # the admitted call is still running
            servicer.release.set()
            assert await _code(held) == grpc.StatusCode.OK
            await asyncio.wait_for(idle, WAIT_S)
            assert gate.num_active == 0
        await server.stop(None)

    asyncio.run(main())


def test_the_gate_refuses_everything_at_once_without_a_barrier(caplog):
    async def main():
        gate = DrainGate([HEALTH])
        with caplog.at_level(logging.WARNING, logger="gruserve.runtime.drain"):
            await gate.close()
        assert gate.closed
        assert "refusing new calls at once" in caplog.text

    asyncio.run(main())


def test_calls_that_grpc_holds_back_are_admitted_before_the_stop(tmp_path):
    """grpc.aio takes calls from its core one at a time: a burst waits there, and grpc's
    own stop() ends each waiting call CANCELLED (grpc/grpc#41785). Behind the barrier, all
    of them reach a handler first, and then grpc's stop only waits for them."""

    async def main():
        servicer, refused = _HeldHealth(), []
        server, gate, target = await _gated_server(tmp_path, servicer, refused)
        async with grpc.aio.insecure_channel(target) as channel:
            await channel.channel_ready()
            stub = health_pb2_grpc.HealthStub(channel)
            calls = [stub.Check(health_pb2.HealthCheckRequest()) for _ in range(300)]
            codes = [asyncio.ensure_future(_code(c)) for c in calls]
            await _until(lambda: servicer.num_started > 0)  # the burst is arriving
            await asyncio.wait_for(gate.close(), WAIT_S)
            await asyncio.wait_for(gate.flush(), WAIT_S)  # as GruServer does
            stopping = asyncio.ensure_future(server.stop(WAIT_S))
            servicer.release.set()
            outcome = collections.Counter(await asyncio.gather(*codes))
            await stopping
        # served if the transport had it before the barrier, refused (retryable) if it was
        # still in transit then: never CANCELLED
        assert set(outcome) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, outcome
        assert outcome[grpc.StatusCode.OK] == servicer.num_started > 0
        assert len(refused) == outcome[grpc.StatusCode.UNAVAILABLE]

    for _ in range(3):
        asyncio.run(main())


async def _until(condition, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.001)
