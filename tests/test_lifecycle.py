"""The life of requests and of the server: deadlines and cancels stop the work and free the
slot; a broken engine turns health NOT_SERVING; health follows start-up; SIGTERM drains
in-flight requests and exits 0 (a real `python -m gruserve.runtime serve` process)."""

from __future__ import annotations

import asyncio
import signal

import grpc
import pytest

from gruserve.runtime.client import Connection, GruserveClient, build_request
from gruserve.v1 import gruserve_pb2 as pb
from gruserve.v1 import gruserve_pb2_grpc as pb_grpc

from .serving import WAIT_S, ServeProcess, ServerThread, StepGate, running_server, wait_for

LONG = 40  # tokens of a request that cannot end early (min_tokens = max_tokens)
# a call that reaches a stopping server is refused: UNAVAILABLE, or CANCELLED when it races
# the core's stop and its GOAWAY on an open connection (grpc/grpc#41785, see drain.py)
REFUSED_WHILE_STOPPING = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}


@pytest.fixture(scope="module")
def pair(synthetic_bundle):
    return {"user": synthetic_bundle.users[0], "item": synthetic_bundle.items[0]}


@pytest.fixture(scope="module")
def server(synthetic_bundle_dir):
    """One slot: whatever a test leaves running would block the next one."""
    with running_server(synthetic_bundle_dir, num_slots=1, max_queued=4, metrics_port=0) as s:
        yield s


@pytest.fixture
def client(server):
    with GruserveClient(server.target, timeout=30) as c:
        yield c
    # every test must leave the engine idle
    wait_for(lambda: server.engine.num_in_flight == 0, "no request in flight")
    wait_for(lambda: server.engine.stats.num_active_slots == 0, "all slots free")


def _count(server, rpc: str, code: str) -> float:
    value = server.metrics().get(
        ("gruserve_requests_total", (("code", code), ("rpc", rpc))), 0.0
    )
    return value


def _active_slots(server) -> float:
    return server.metrics()[("gruserve_active_slots", ())]


def test_deadline_exceeded_stops_the_work(server, client, pair):
    engine = server.engine
    aborted = engine.stats.num_requests_aborted
    before = _count(server, "Generate", "DEADLINE_EXCEEDED")
    cancels = _count(server, "Generate", "CANCELLED")
    with StepGate(engine) as gate:
        call = client.stub.Generate.future(
            build_request(**pair, max_tokens=LONG, min_tokens=LONG), timeout=2.0
        )
        gate.wait_blocked()  # admitted, and held inside its first step
        assert call.exception(WAIT_S).code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # the server gave up too (it counts the RPC once it has asked the engine to abort);
        # only then let the held step finish
        wait_for(lambda: _count(server, "Generate", "DEADLINE_EXCEEDED") == before + 1,
                 "the server to give up on the RPC")
        assert _count(server, "Generate", "CANCELLED") == cancels
        gate.open()
        wait_for(lambda: engine.stats.num_requests_aborted == aborted + 1, "the abort")
        wait_for(lambda: _active_slots(server) == 0, "the slot to be freed")
    # the request needed LONG steps; it was stopped right after the one that was held
    assert gate.num_steps <= 2


def test_cancelling_a_stream_frees_its_slot(server, client, pair):
    engine = server.engine
    aborted = engine.stats.num_requests_aborted
    before = _count(server, "GenerateStream", "CANCELLED")
    with StepGate(engine) as gate:
        stream = client.stream(**pair, max_tokens=LONG, min_tokens=LONG)
        gate.allow(1)
        first = next(stream)
        assert len(first.token_ids) == 1
        gate.wait_blocked(2)
        assert _active_slots(server) == 1
        stream.cancel()
        wait_for(lambda: _count(server, "GenerateStream", "CANCELLED") == before + 1,
                 "the server to see the cancel")
        gate.open()
        wait_for(lambda: engine.stats.num_requests_aborted == aborted + 1, "the abort")
        wait_for(lambda: _active_slots(server) == 0, "the slot to be freed")
        assert gate.num_steps <= 3
    with pytest.raises(grpc.RpcError) as info:
        next(stream)
    assert info.value.code() == grpc.StatusCode.CANCELLED


def test_client_going_away_frees_the_slot(server, client, pair):
    """A client that closes its channel mid-request (as a crashed one would)."""
    engine = server.engine
    aborted = engine.stats.num_requests_aborted
    before = _count(server, "Generate", "CANCELLED")
    with StepGate(engine) as gate:
        leaving = GruserveClient(server.target)
        call = leaving.stub.Generate.future(
            build_request(**pair, max_tokens=LONG, min_tokens=LONG)
        )
        gate.wait_blocked()
        leaving.close()
        wait_for(lambda: _count(server, "Generate", "CANCELLED") == before + 1,
                 "the server to see the disconnect")
        gate.open()
        wait_for(lambda: engine.stats.num_requests_aborted == aborted + 1, "the abort")
        wait_for(lambda: _active_slots(server) == 0, "the slot to be freed")
        assert gate.num_steps <= 2
    assert call.cancelled() or call.exception() is not None


def test_cancelling_a_queued_request_takes_it_out_of_the_queue(server, client, pair):
    engine = server.engine
    admitted, aborted = engine.stats.num_admitted, engine.stats.num_requests_aborted
    with StepGate(engine) as gate:
        running = client.stub.Generate.future(build_request(**pair, max_tokens=3), timeout=30)
        gate.wait_blocked()
        queued = client.stub.Generate.future(build_request(**pair, max_tokens=3), timeout=30)
        wait_for(lambda: engine.num_in_flight == 2, "the queued request")
        before = _count(server, "Generate", "CANCELLED")
        queued.cancel()
        wait_for(lambda: _count(server, "Generate", "CANCELLED") == before + 1,
                 "the server to see the cancel")
        gate.open()  # the abort is applied at this step's end, before anything is admitted
        assert len(running.result().token_ids) > 0
    wait_for(lambda: engine.stats.num_requests_aborted == aborted + 1, "the abort")
    assert engine.stats.num_admitted == admitted + 1  # the cancelled one never got a slot
    assert server.metrics()[("gruserve_queue_depth", ())] == 0


def test_broken_engine_is_unavailable_and_not_serving(synthetic_bundle_dir, pair):
    with running_server(synthetic_bundle_dir) as server, GruserveClient(server.target) as client:
        assert client.health() == "SERVING"

        def broken_step(*args, **kwargs):
            raise RuntimeError("device lost")

        server.engine.runner.step = broken_step
        with pytest.raises(grpc.RpcError) as info:
            client.generate(**pair)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert client.health() == "NOT_SERVING"
        assert client.health("gruserve.v1.Generator") == "NOT_SERVING"
        # and it stays that way: every later request is refused the same way
        for call in (client.generate, client.stream):
            with pytest.raises(grpc.RpcError) as info:
                list(call(**pair)) if call == client.stream else call(**pair)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert client.health() == "NOT_SERVING"


def test_health_is_not_serving_until_warmed_up(synthetic_bundle_dir):
    thread = ServerThread(synthetic_bundle_dir).create()
    try:
        with StepGate(thread.engine) as gate:
            starting = asyncio.run_coroutine_threadsafe(thread.server.start(), thread.loop)
            gate.wait_blocked()  # warm-up is decoding: the port is bound, SERVING not yet
            with GruserveClient(thread.target) as client:
                assert client.health() == "NOT_SERVING"
                assert client.health("gruserve.v1.Generator") == "NOT_SERVING"
                gate.open()
                starting.result(WAIT_S)
                assert client.health() == "SERVING"
    finally:
        thread.stop()


def test_stop_drains_in_flight_requests_then_refuses(synthetic_bundle_dir, pair):
    thread = ServerThread(synthetic_bundle_dir, num_slots=2).start()
    try:
        with GruserveClient(thread.target) as client, StepGate(thread.engine) as gate:
            call = client.stub.Generate.future(
                build_request(**pair, max_tokens=5, min_tokens=5), timeout=30
            )
            gate.wait_blocked()
            stopping = asyncio.run_coroutine_threadsafe(thread.server.stop(10), thread.loop)
            wait_for(lambda: _not_serving(client), "health to leave SERVING")
            with pytest.raises(grpc.RpcError) as info:
                client.generate(**pair)
            assert info.value.code() in REFUSED_WHILE_STOPPING
            gate.open()
            reply = call.result()
            assert len(reply.token_ids) == 5  # finished in full during the grace period
            stopping.result(WAIT_S)
    finally:
        thread.stop()


def test_what_outlives_the_grace_period_ends_unavailable(synthetic_bundle_dir, pair):
    thread = ServerThread(synthetic_bundle_dir).start()
    try:
        # a channel that does not retry: the status is the server's own, not a retry's
        channel = Connection(thread.target).channel(retry=False)
        with channel, StepGate(thread.engine) as gate:
            stub = pb_grpc.GeneratorStub(channel)
            call = stub.Generate.future(build_request(**pair), timeout=30)
            gate.wait_blocked()  # the decode thread is held inside a step
            stopping = asyncio.run_coroutine_threadsafe(thread.server.stop(0.2), thread.loop)
            with pytest.raises(grpc.RpcError) as info:
                call.result()
            # retryable, and not waiting for the step: the grace period is a promise
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shut down before this request finished" in info.value.details()
            assert stopping.result(WAIT_S) is False  # an RPC was cut short
            gate.open()
            assert not thread.engine.healthy
    finally:
        thread.stop()


def test_a_port_in_use_is_a_startup_error(server, synthetic_bundle_dir):
    port = server.server.port
    other = ServerThread(synthetic_bundle_dir, port=port).create()
    try:
        with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
            other.call(other.server.start())
    finally:
        other.server = None
        other.stop()


def _not_serving(client) -> bool:
    try:
        return client.health(timeout=2) != "SERVING"
    except grpc.RpcError:
        return True  # already refusing new calls


# --- a real process and a real signal ------------------------------------------------------

def test_sigterm_drains_in_flight_requests_and_exits_0(synthetic_bundle_dir, tmp_path, pair):
    child = ServeProcess(synthetic_bundle_dir, tmp_path, "--num-slots", "4", "--grace", "30",
                         step_delay_s=0.02)
    try:
        target = child.wait_serving()
        assert target.startswith("127.0.0.1:")  # loopback unless told otherwise
        long = dict(pair, max_tokens=LONG, min_tokens=LONG)
        with GruserveClient(target) as client:
            assert client.health() == "SERVING"
            unary = client.stub.Generate.future(build_request(**long), timeout=60)
            batch = client.stub.GenerateBatch.future(
                pb.GenerateBatchRequest(requests=[build_request(**long)] * 2), timeout=60
            )
            streams = [client.stream(**long, timeout=60) for _ in range(2)]
            # each stream has its first token: every request is inside the server
            firsts = [next(s) for s in streams]
            child.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: _not_serving(client), "health to leave SERVING")
            with GruserveClient(target) as late:
                with pytest.raises(grpc.RpcError) as info:
                    late.generate(**pair, timeout=10)
                assert info.value.code() in REFUSED_WHILE_STOPPING
            for first, stream in zip(firsts, streams, strict=True):
                rest = list(stream)
                assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == LONG
                assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
                # the slowed steps were in force: the stream outlived the signal by far
                assert rest[-1].timing.total_ms >= LONG * 20
            assert len(unary.result().token_ids) == LONG
            assert [len(r.token_ids) for r in batch.result().responses] == [LONG, LONG]
        assert child.finish() == 0, "".join(child.stderr)
    finally:
        if child.proc.poll() is None:
            child.finish(0.1)
    log = "".join(child.stderr)
    assert "Traceback" not in log
    assert "SIGTERM received: draining" in log


def test_sigint_stops_an_idle_server_with_exit_0(synthetic_bundle_dir, tmp_path):
    child = ServeProcess(synthetic_bundle_dir, tmp_path)
    try:
        target = child.wait_serving()
        with GruserveClient(target) as client:
            assert client.health() == "SERVING"
        child.proc.send_signal(signal.SIGINT)
        assert child.finish() == 0, "".join(child.stderr)
    finally:
        if child.proc.poll() is None:
            child.finish(0.1)
    assert "Traceback" not in "".join(child.stderr)
