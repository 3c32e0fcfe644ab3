"""Property tests: random and extreme requests thrown at a running server.

Every answer must be a result that obeys the request, or a clear status that is not
INTERNAL (nor UNKNOWN); and the server must stay healthy and idle afterwards.
"""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gruserve.runtime.client import GruserveClient
from gruserve.v1 import gruserve_pb2 as pb

from .serving import running_server, wait_for

MAX_TOKENS = 64
# a status a client can act on; never INTERNAL or UNKNOWN
EXPECTED_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # a message over the size limit
}
SETTINGS = settings(
    max_examples=150, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

UINT32_MAX, UINT64_MAX, INT64_MAX = 2**32 - 1, 2**64 - 1, 2**63 - 1
SPECIAL_FLOATS = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-45, -1e-45, 3.4e38, -3.4e38, 1.0]
ODD_STRINGS = [
    "", " ", "\x00", "u\x00", "\u202e0032u", "ü", "Ω≈ç√", "🙂" * 40, "\u200b", "\ufeff",
    "a\nb", "\r\n", "x" * 129, "x" * 5000, "%s%n", "'; DROP TABLE users; --", "\U0010ffff",
]


def _floats():
    return st.one_of(
        st.sampled_from(SPECIAL_FLOATS),
        st.floats(width=32, allow_nan=True, allow_infinity=True),
        st.floats(0, 2, width=32),
    )


def _odd_text():
    # any code point a client can encode (surrogates cannot travel in UTF-8)
    return st.one_of(
        st.sampled_from(ODD_STRINGS),
        st.text(st.characters(exclude_categories=("Cs",)), max_size=200),
    )


def _uint(limit: int, small: int):
    return st.one_of(st.integers(0, small), st.integers(0, limit), st.sampled_from([limit]))


@st.composite
def _hidden_state(draw):
    size = draw(st.one_of(st.just(32), st.sampled_from([0, 1, 31, 33, 64, 10_000, 2_000_000])))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([1e-30, 1.0, 1e3, 3e38]))
    with np.errstate(over="ignore"):  # 3e38 * a normal draw may overflow float32: wanted
        values = (rng.standard_normal(size) * scale).astype(np.float32)
    if size and draw(st.booleans()):
        values[draw(st.integers(0, size - 1))] = draw(st.sampled_from(SPECIAL_FLOATS))
    return values


@st.composite
def _stop_ids(draw):
    kind = draw(st.sampled_from(["small", "wide", "enormous"]))
    if kind == "small":
        return draw(st.lists(st.integers(-3, 60), max_size=20))
    if kind == "wide":
        return draw(st.lists(st.integers(-(2**63), INT64_MAX), max_size=40))
    count = draw(st.sampled_from([17, 1_000, 100_000, 1_000_000]))
    return list(range(count))


@st.composite
def generate_requests(draw, users, items):
    """Mostly sensible requests with some fields wild, and some wild throughout: a request
    with every field wild is all but always refused, which would leave serving untested."""
    one_in = draw(st.sampled_from([0, 6, 2]))  # how often a field is wild (0: never)

    def pick(sensible, wild):
        return draw(wild if one_in and draw(st.integers(1, one_in)) == 1 else sensible)

    request = pb.GenerateRequest(
        request_id=pick(
            st.text(st.characters(categories=("L", "N", "P", "S")), max_size=20),
            _odd_text(),
        )
    )
    conditioning = pick(st.sampled_from(["known", "hidden"]), st.sampled_from(["odd", "none"]))
    if conditioning == "known":
        request.user_item.user_id = draw(st.sampled_from(users))
        request.user_item.item_id = draw(st.sampled_from(items))
    elif conditioning == "odd":
        request.user_item.user_id = draw(st.one_of(st.sampled_from(users), _odd_text()))
        request.user_item.item_id = draw(st.one_of(st.sampled_from(items), _odd_text()))
    elif conditioning == "hidden":
        state = pick(
            st.lists(st.floats(-1, 1, width=32), min_size=32, max_size=32).map(np.float32),
            _hidden_state(),
        )
        request.hidden_state.values.extend(np.asarray(state, np.float32).tolist())
    p = request.parameters
    p.strategy = pick(st.integers(0, 3), st.integers(-(2**31), 2**31 - 1))
    p.max_tokens = pick(st.integers(0, MAX_TOKENS), _uint(UINT32_MAX, MAX_TOKENS + 2))
    p.min_tokens = pick(st.integers(0, min(p.max_tokens or 15, 8)), _uint(UINT32_MAX, 20))
    p.temperature = pick(st.floats(0.125, 3, width=32) | st.just(0.0), _floats())
    p.top_k = pick(st.integers(0, 16), _uint(UINT32_MAX, 20))
    p.top_p = pick(st.floats(0.125, 1, width=32) | st.just(0.0), _floats())
    if draw(st.booleans()):
        p.seed = draw(st.integers(0, UINT64_MAX))
    p.num_beams = pick(st.integers(0, 8), _uint(UINT32_MAX, 10))
    if draw(st.booleans()):
        p.length_penalty = pick(st.floats(-2, 3, width=32), _floats())
    p.stop_token_ids.extend(pick(st.lists(st.integers(0, 45), max_size=16), _stop_ids()))
    p.return_logprobs = draw(st.booleans())
    return request


@pytest.fixture(scope="module")
def server(synthetic_bundle_dir):
    with running_server(synthetic_bundle_dir, num_slots=16, max_queued=64) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with GruserveClient(server.target, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def ids(synthetic_bundle):
    return list(synthetic_bundle.users[:5]), list(synthetic_bundle.items[:5])


def _check_response(request: pb.GenerateRequest, reply: pb.GenerateResponse) -> None:
    assert reply.finish_reason != pb.FINISH_REASON_UNSPECIFIED
    assert len(reply.token_ids) <= (request.parameters.max_tokens or MAX_TOKENS)
    assert len(reply.token_ids) >= request.parameters.min_tokens
    if request.parameters.return_logprobs:
        assert len(reply.token_logprobs) == len(reply.token_ids)
    else:
        assert not reply.token_logprobs
    if request.request_id:
        assert reply.request_id == request.request_id
    assert not set(reply.token_ids) & set(request.parameters.stop_token_ids)


def _check_error(error: grpc.RpcError) -> None:
    assert error.code() in EXPECTED_ERRORS, (error.code(), error.details())
    assert error.details()
    assert len(error.details()) < 1000


def _assert_healthy_and_idle(server, client) -> None:
    assert client.health() == "SERVING"
    wait_for(lambda: server.engine.num_in_flight == 0, "no request in flight")
    wait_for(lambda: server.engine.stats.num_active_slots == 0, "all slots free")


def _pinned_extremes():
    """Requests every run sends, whatever hypothesis draws."""
    def make(**params) -> pb.GenerateRequest:
        request = pb.GenerateRequest()
        request.user_item.user_id, request.user_item.item_id = "u0001", "i0001"
        for name, value in params.items():
            field = getattr(request.parameters, name)
            if isinstance(value, list):
                field.extend(value)
            else:
                setattr(request.parameters, name, value)
        return request

    yield make(temperature=math.nan, strategy=pb.DECODING_STRATEGY_SAMPLE)
    yield make(top_p=math.inf, strategy=pb.DECODING_STRATEGY_SAMPLE)
    yield make(max_tokens=UINT32_MAX, min_tokens=UINT32_MAX)
    yield make(seed=UINT64_MAX, strategy=pb.DECODING_STRATEGY_SAMPLE, top_k=UINT32_MAX)
    yield make(num_beams=UINT32_MAX, strategy=pb.DECODING_STRATEGY_BEAM)
    yield make(length_penalty=-math.inf, strategy=pb.DECODING_STRATEGY_BEAM)
    # finite but extreme: length ** penalty overflows, or underflows to a division by zero
    for penalty in (3.4e38, -3.4e38, 1e3, -1e3):
        yield make(length_penalty=penalty, strategy=pb.DECODING_STRATEGY_BEAM, min_tokens=3)
    yield make(stop_token_ids=list(range(1_000_000)))
    yield make(stop_token_ids=[INT64_MAX, -(2**63)])
    yield make(strategy=-1)
    odd = make()
    odd.request_id, odd.user_item.user_id = "\u202e🙂", "🙂" * 10_000
    yield odd
    huge = pb.GenerateRequest()
    huge.hidden_state.values.extend(np.ones(2_000_000, np.float32).tolist())
    yield huge


def _send(client, rpc: str, request: pb.GenerateRequest, others=()) -> str:
    """Sends one request by `rpc`; checks the answer obeys it, or the status is clear.
    Returns the outcome, e.g. "OK" or "INVALID_ARGUMENT parameters.top_p"."""
    try:
        if rpc == "Generate":
            _check_response(request, client.generate_request(request))
        elif rpc == "GenerateStream":
            chunks = list(client.stream_request(request))
            assert chunks and chunks[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
            assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
            reply = pb.GenerateResponse(
                request_id=chunks[0].request_id,
                token_ids=[t for c in chunks for t in c.token_ids],
                token_logprobs=[x for c in chunks for x in c.token_logprobs],
                finish_reason=chunks[-1].finish_reason,
            )
            _check_response(request, reply)
        else:
            batch = [request, *others]
            reply = client.generate_batch(batch)
            assert len(reply.responses) == len(batch)
            for sent, answer in zip(batch, reply.responses, strict=True):
                _check_response(sent, answer)
    except grpc.RpcError as error:
        _check_error(error)
        return f"{error.code().name} {error.details().split(':')[0]}"
    return "OK"


@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream", "GenerateBatch"])
def test_extreme_requests_get_a_result_or_a_clear_status(client, rpc):
    for request in _pinned_extremes():
        _send(client, rpc, request)


@SETTINGS
@given(data=st.data(), rpc=st.sampled_from(["Generate", "GenerateStream", "GenerateBatch"]))
def test_random_requests_get_a_result_or_a_clear_status(server, client, ids, data, rpc):
    users, items = ids
    request = data.draw(generate_requests(users, items), label="request")
    others = []
    if rpc == "GenerateBatch":
        others = data.draw(st.lists(generate_requests(users, items), max_size=2), label="others")
    event(f"{rpc}: {_send(client, rpc, request, others)}")  # --hypothesis-show-statistics


@SETTINGS
@given(payload=st.binary(max_size=300))
def test_garbage_bytes_are_invalid_argument(server, client, payload):
    channel = client.channel
    for method, streaming in (("Generate", False), ("GenerateStream", True),
                              ("GenerateBatch", False)):
        path = f"/gruserve.v1.Generator/{method}"
        try:
            if streaming:
                list(channel.unary_stream(path)(payload, timeout=30))
            else:
                channel.unary_unary(path)(payload, timeout=30)
        except grpc.RpcError as error:
            _check_error(error)


def test_invalid_utf8_in_a_string_field_is_invalid_argument(client, ids):
    request = pb.GenerateRequest(request_id="RID")
    request.user_item.user_id, request.user_item.item_id = ids[0][0], ids[1][0]
    payload = request.SerializeToString().replace(b"RID", b"\xff\xfe\xfd")
    with pytest.raises(grpc.RpcError) as info:
        client.channel.unary_unary("/gruserve.v1.Generator/Generate")(payload, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert client.health() == "SERVING"


def test_random_requests_leave_the_server_healthy(server, client, ids):
    """Runs after the others in this module: nothing leaked, nothing broke."""
    _assert_healthy_and_idle(server, client)
    users, items = ids
    assert client.generate(user=users[0], item=items[0]).token_ids
