"""Client-side load balancing and failover, in-process: what a target names, which calls are
retried, replicas that say NOT_SERVING are skipped, streams are retried only before their
first message, and the server closes connections past their age (real gRPC, real sockets)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from gruserve.runtime.balancing import channel_target, is_idempotent, join_targets
from gruserve.runtime.cli import build_parser
from gruserve.runtime.cli_args import connection_from_args
from gruserve.runtime.client import GruserveClient, build_request

from .serving import WAIT_S, ServerThread, running_server, wait_for

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def pair(synthetic_bundle):
    return {"user": synthetic_bundle.users[0], "item": synthetic_bundle.items[0]}


def _count(server, rpc: str, code: str = "OK") -> float:
    return server.metrics().get(("gruserve_requests_total", (("code", code), ("rpc", rpc))), 0.0)


# --- targets ------------------------------------------------------------------------------------


def test_one_host_port_is_handed_to_grpc_as_it_is():
    where = channel_target("gruserve.prod.svc:50051")
    assert (where.target, where.authority, where.balanced) == ("gruserve.prod.svc:50051", None,
                                                               False)


@pytest.mark.parametrize("uri", ["dns:///gruserve-headless:50051", "ipv4:10.0.0.1:1,10.0.0.2:1"])
def test_a_grpc_uri_is_passed_through_and_balanced(uri):
    where = channel_target(uri)
    assert (where.target, where.balanced) == (uri, True)


def test_several_targets_become_one_address_list_named_after_the_first():
    where = channel_target("127.0.0.1:5001, 127.0.0.2:5002,localhost:5003")
    assert where.target == "ipv4:127.0.0.1:5001,127.0.0.2:5002,127.0.0.1:5003"
    assert where.authority == "127.0.0.1:5001"
    assert where.balanced
    six = channel_target("[::1]:5001,[::1]:5002")
    assert (six.target, six.authority) == ("ipv6:[::1]:5001,[::1]:5002", "[::1]:5001")


@pytest.mark.parametrize("bad, message", [
    ("127.0.0.1:1,[::1]:2", "all IPv4 or all IPv6"),
    ("127.0.0.1:1,127.0.0.1", "expected HOST:PORT"),
    ("127.0.0.1:1,127.0.0.1:70000", "expected HOST:PORT"),
    ("127.0.0.1:1,no-such-host.invalid:1", "cannot resolve"),
    (" , ", "empty"),
])
def test_a_bad_target_list_is_refused_in_one_line(bad, message):
    with pytest.raises(ValueError, match=message):
        channel_target(bad)


def test_target_flags_repeat_and_take_commas_but_a_uri_stands_alone():
    args = build_parser().parse_args(
        ["info", "--target", "127.0.0.1:1", "--target", "127.0.0.1:2,127.0.0.1:3"]
    )
    assert connection_from_args(args).target == "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3"
    default = build_parser().parse_args(["info"])
    assert connection_from_args(default).target == "127.0.0.1:50051"
    with pytest.raises(ValueError, match="must be the only one"):
        join_targets(["dns:///gruserve:50051", "127.0.0.1:2"])


def test_idempotent_requests_are_greedy_beam_and_seeded_sampling():
    assert is_idempotent(build_request(user="u", item="i"))
    assert is_idempotent(build_request(user="u", item="i", strategy="beam"))
    assert is_idempotent(build_request(user="u", item="i", strategy="sample", seed=0))
    assert not is_idempotent(build_request(user="u", item="i", strategy="sample"))


# --- retries ------------------------------------------------------------------------------------


def _break(engine, *, hold: threading.Event | None = None) -> threading.Event:
    """Every later decode step fails (the engine stops: its calls get UNAVAILABLE); with
    `hold`, the first one waits for it first. Returns an event set when a step began."""
    began = threading.Event()

    def broken_step(*args, **kwargs):
        began.set()
        if hold is not None:
            hold.wait(WAIT_S)
        raise RuntimeError("device lost")

    engine.runner.step = broken_step
    return began


def test_unavailable_is_retried_for_idempotent_calls_only(synthetic_bundle_dir, pair):
    with running_server(synthetic_bundle_dir, metrics_port=0) as server:
        with GruserveClient(server.target) as client:
            _break(server.engine)
            calls = {
                "greedy": dict(pair),
                "seeded sampling": dict(pair, strategy="sample", seed=3),
                "sampling without a seed": dict(pair, strategy="sample"),
            }
            attempts = {}
            for name, request in calls.items():
                before = _count(server, "Generate", "UNAVAILABLE")
                with pytest.raises(grpc.RpcError) as info:
                    client.generate(**request)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                attempts[name] = _count(server, "Generate", "UNAVAILABLE") - before
    # grpc's ceiling of 5 attempts (the policy asks for it); a call that may not be sent
    # twice is sent once
    assert attempts == {"greedy": 5, "seeded sampling": 5, "sampling without a seed": 1}


@pytest.fixture
def two_replicas(synthetic_bundle_dir):
    replicas = [ServerThread(synthetic_bundle_dir, metrics_port=0).start() for _ in range(2)]
    try:
        yield replicas
    finally:
        for replica in replicas:
            replica.stop()


def _set_health(replica, status) -> None:
    replica.call(replica.server._set_health(status))


def test_a_replica_that_says_not_serving_gets_no_new_calls(two_replicas, pair):
    a, b = two_replicas
    with GruserveClient([a.target, b.target]) as client:
        for _ in range(20):
            client.generate(**pair, max_tokens=2)
        # round-robin (the first calls may all go to whichever connected first)
        assert _count(a, "Generate") >= 5 and _count(b, "Generate") >= 5
        _set_health(a, NOT_SERVING)  # what a draining replica says first
        wait_for(lambda: _sent_only_to(client, b, pair), "calls to avoid the NOT_SERVING one")
        on_a = _count(a, "Generate")
        for _ in range(20):
            client.generate(**pair, max_tokens=2)
        assert _count(a, "Generate") == on_a
        _set_health(a, SERVING)
        wait_for(lambda: _reaches(client, a, pair), "calls to reach it again")


def _sent_only_to(client, replica, pair) -> bool:
    before = _count(replica, "Generate")
    for _ in range(4):
        client.generate(**pair, max_tokens=2)
    return _count(replica, "Generate") == before + 4


def _reaches(client, replica, pair) -> bool:
    before = _count(replica, "Generate")
    client.generate(**pair, max_tokens=2)
    return _count(replica, "Generate") > before


def _pin(client, replica, others, pair) -> None:
    """The next calls go to `replica`: it says SERVING, the others NOT_SERVING."""
    _set_health(replica, SERVING)
    for other in others:
        _set_health(other, NOT_SERVING)
    wait_for(lambda: _sent_only_to(client, replica, pair), "calls to go to one replica")


def test_a_stream_is_retried_on_another_replica_before_its_first_message(two_replicas, pair):
    a, b = two_replicas
    with GruserveClient([a.target, b.target]) as client:
        _pin(client, a, [b], pair)
        hold = threading.Event()
        began = _break(a.engine, hold=hold)
        stream = client.stream(**pair, max_tokens=6, min_tokens=6, timeout=WAIT_S)
        chunks = []
        reader = threading.Thread(target=lambda: chunks.extend(stream), daemon=True)
        reader.start()
        assert began.wait(WAIT_S)  # the stream is on replica a, in its first step: no message
        _pin(client, b, [a], pair)  # new calls go to b; the stream stays where it is
        hold.set()  # a's engine dies: the stream gets UNAVAILABLE before any message
        reader.join(WAIT_S)
        assert not reader.is_alive()
    assert sum(len(c.token_ids) for c in chunks) == 6
    assert _count(a, "GenerateStream", "UNAVAILABLE") == 1
    assert _count(b, "GenerateStream") == 1


def test_a_stream_that_has_sent_a_message_is_not_retried(two_replicas, pair):
    a, b = two_replicas
    with GruserveClient([a.target, b.target]) as client:
        _pin(client, a, [b], pair)
        real_step, broken, hold = a.engine.runner.step, threading.Event(), threading.Event()

        def slow_then_broken(*args, **kwargs):
            if broken.is_set():
                hold.wait(WAIT_S)
                raise RuntimeError("device lost")
            time.sleep(0.05)
            return real_step(*args, **kwargs)

        a.engine.runner.step = slow_then_broken
        stream = client.stream(**pair, max_tokens=40, min_tokens=40, timeout=WAIT_S)
        next(stream)  # the first message: the call is committed to replica a
        broken.set()
        _pin(client, b, [a], pair)
        hold.set()
        with pytest.raises(grpc.RpcError) as info:
            list(stream)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert _count(b, "GenerateStream") == 0


# --- connection age -----------------------------------------------------------------------------


def _client_ports(server_port: int) -> set[int]:
    """Local ports of this machine's established TCP connections to 127.0.0.1:server_port
    (grpc's sockets may be IPv6 ones carrying IPv4-mapped addresses: both tables)."""
    ports = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as table:
            next(table)
            for line in table:
                local, remote, state = line.split()[1:4]
                address, port = remote.split(":")
                if state == "01" and address.endswith("0100007F") and int(port, 16) == server_port:
                    ports.add(int(local.split(":")[1], 16))
    return ports


@pytest.mark.parametrize("age_s, min_connections, max_connections", [(0.3, 3, 99), (0.0, 1, 1)])
def test_connections_are_closed_past_their_age_and_calls_finish(
    synthetic_bundle_dir, pair, age_s, min_connections, max_connections
):
    with running_server(synthetic_bundle_dir, max_connection_age_s=age_s,
                        max_connection_age_grace_s=10.0) as server:
        real_step = server.engine.runner.step

        def slow_step(*args, **kwargs):
            time.sleep(0.05)
            return real_step(*args, **kwargs)

        server.engine.runner.step = slow_step
        seen: set[int] = set()
        with GruserveClient(server.target) as client:
            # 24 steps of 50 ms: a stream that outlives several connection ages
            stream = client.stream(**pair, max_tokens=24, min_tokens=24, timeout=WAIT_S)
            num_tokens = 0
            for chunk in stream:
                num_tokens += len(chunk.token_ids)
                seen |= _client_ports(server.server.port)
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                client.generate(**pair, max_tokens=1)
                seen |= _client_ports(server.server.port)
    assert num_tokens == 24  # the grace let it finish on its closing connection
    assert min_connections <= len(seen) <= max_connections
