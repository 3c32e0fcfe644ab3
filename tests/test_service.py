"""The gRPC API over real sockets: every RPC, every decoding option, every status code, the
metrics endpoint, reflection, the async client and the `gruserve generate` command."""

from __future__ import annotations

import asyncio
import gc
import logging
import math
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

import gruserve
from gruserve.runtime import cli
from gruserve.runtime.client import AsyncGruserveClient, GruserveClient, build_request
from gruserve.v1 import gruserve_pb2 as pb

from .serving import StepGate, running_server, wait_for

MAX_TOKENS = 64  # the server's per-request ceiling (ServerConfig.max_tokens default)


@pytest.fixture(scope="module")
def server(synthetic_bundle_dir):
    # no result cache: these tests repeat requests to check the engine's own determinism,
    # which a cache would answer for it (tests/test_result_cache.py tests the cache)
    with running_server(synthetic_bundle_dir, metrics_port=0, cache_size=0) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with GruserveClient(server.target, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def pairs(synthetic_bundle):
    return list(zip(synthetic_bundle.users[:10], synthetic_bundle.items[:10], strict=True))


@pytest.fixture(scope="module")
def pair(pairs):
    return {"user": pairs[0][0], "item": pairs[0][1]}


def _error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, **kwargs)
        if not isinstance(result, pb.GenerateResponse | pb.GenerateBatchResponse):
            list(result)  # a stream fails when read
    return info.value


# --- every RPC ------------------------------------------------------------------------------


def test_generate_by_user_item(client, server, pair, synthetic_bundle):
    reply = client.generate(**pair, request_id="my-request-1")
    assert reply.request_id == "my-request-1"
    assert 0 < len(reply.token_ids) <= synthetic_bundle.max_len
    assert reply.text == " ".join(synthetic_bundle.vocab[t] for t in reply.token_ids)
    assert reply.HasField("predicted_rating")
    assert 1.0 <= reply.predicted_rating <= 5.0
    assert reply.finish_reason in (pb.FINISH_REASON_EOS, pb.FINISH_REASON_LENGTH)
    assert not reply.token_logprobs
    t = reply.timing
    assert 0 <= t.queue_ms <= t.ttft_ms <= t.total_ms
    assert t.total_ms > 0
    # an empty request_id gets a generated one
    assert client.generate(**pair).request_id


def test_generate_by_hidden_state(client, synthetic_bundle):
    rng = np.random.default_rng(0)
    state = rng.uniform(-1, 1, synthetic_bundle.num_layers * synthetic_bundle.hidden_size).tolist()
    first = client.generate(hidden_state=state, max_tokens=10)
    again = client.generate(hidden_state=state, max_tokens=10)
    assert 0 < len(first.token_ids) <= 10
    assert list(first.token_ids) == list(again.token_ids)
    assert not first.HasField("predicted_rating")  # no encoder ran
    assert first.finish_reason != pb.FINISH_REASON_UNSPECIFIED


def test_max_and_min_tokens(client, pair):
    reply = client.generate(**pair, max_tokens=3, min_tokens=3)
    assert len(reply.token_ids) == 3
    assert reply.finish_reason == pb.FINISH_REASON_LENGTH
    # min_tokens keeps <eos> away: the text runs to max_tokens
    reply = client.generate(**pair, max_tokens=40, min_tokens=40)
    assert len(reply.token_ids) == 40
    assert reply.finish_reason == pb.FINISH_REASON_LENGTH


def test_stop_token_ends_the_text(client, pair):
    tokens = list(client.generate(**pair).token_ids)
    # the first token that did not appear before it: stopping on it cuts the text there
    cut = next(i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i])
    reply = client.generate(**pair, stop_token_ids=[tokens[cut]])
    assert list(reply.token_ids) == tokens[:cut]
    assert reply.finish_reason == pb.FINISH_REASON_STOP_TOKEN


def test_logprobs(client, pair):
    plain = client.generate(**pair)
    reply = client.generate(**pair, return_logprobs=True)
    assert list(reply.token_ids) == list(plain.token_ids)  # logprobs do not change greedy
    assert len(reply.token_logprobs) == len(reply.token_ids)
    assert all(-1e4 < x <= 0 for x in reply.token_logprobs)


def test_sampling_options(client, pair):
    greedy = list(client.generate(**pair, max_tokens=12).token_ids)
    sample = dict(pair, strategy="sample", max_tokens=12, temperature=1.5, top_p=0.95)
    a = client.generate(**sample, seed=1234, return_logprobs=True)
    b = client.generate(**sample, seed=1234, return_logprobs=True)
    assert list(a.token_ids) == list(b.token_ids)  # same seed, same text
    assert list(a.token_logprobs) == list(b.token_logprobs)
    texts = {tuple(client.generate(**sample, seed=s).token_ids) for s in range(8)}
    assert len(texts) > 1  # seeds matter at temperature 1.5
    # top_k=1 keeps only the most probable candidate: sampling collapses to greedy
    top1 = client.generate(**pair, strategy="sample", max_tokens=12, top_k=1, seed=5)
    assert list(top1.token_ids) == greedy


def test_beam_search(client, pair):
    reply = client.generate(
        **pair, strategy="beam", num_beams=3, length_penalty=0.5, return_logprobs=True
    )
    assert 0 < len(reply.token_ids)
    assert len(reply.token_logprobs) == len(reply.token_ids)
    assert reply.finish_reason != pb.FINISH_REASON_UNSPECIFIED
    assert reply.HasField("predicted_rating")


def test_stream_matches_generate(client, pair):
    unary = client.generate(**pair, return_logprobs=True)
    chunks = list(client.stream(**pair, return_logprobs=True))
    assert chunks
    assert chunks[0].HasField("predicted_rating")
    assert chunks[0].predicted_rating == pytest.approx(unary.predicted_rating)
    assert not any(c.HasField("predicted_rating") for c in chunks[1:])
    assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    assert chunks[-1].finish_reason == unary.finish_reason
    assert chunks[-1].timing.total_ms > 0
    assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
    assert [x for c in chunks for x in c.token_logprobs] == pytest.approx(
        list(unary.token_logprobs)
    )
    assert "".join(c.text for c in chunks) == unary.text
    assert all(len(c.token_logprobs) == len(c.token_ids) for c in chunks)


def test_stream_coalesces_tokens_for_a_slow_reader(server, client, pair, monkeypatch):
    """While the server cannot write (its event loop is held), the engine keeps decoding;
    everything it produced goes out as ONE message, not one message per token."""
    engine = server.engine
    real_submit = engine.submit

    def submit_then_hold_the_loop(request):
        handle = real_submit(request)
        finished = engine.stats.num_requests_finished

        def hold():  # on the event loop: no delivery, no write until the engine is done
            wait_for(lambda: engine.stats.num_requests_finished > finished, "the request")

        server.loop.call_soon(hold)
        return handle

    monkeypatch.setattr(engine, "submit", submit_then_hold_the_loop)
    chunks = list(client.stream(**pair, max_tokens=40, min_tokens=40))
    assert len(chunks) == 1
    assert len(chunks[0].token_ids) == 40
    assert chunks[0].finish_reason == pb.FINISH_REASON_LENGTH
    assert chunks[0].HasField("predicted_rating")


def test_stream_flush_policy_sends_fewer_messages_and_the_same_tokens(synthetic_bundle_dir, pair):
    """--stream-hold-ms: later chunks hold until 4 tokens wait (the hold, 10 s, is far
    longer than the request: only the token count or the end releases them)."""
    with running_server(synthetic_bundle_dir, stream_hold_ms=10_000,
                        stream_chunk_tokens=4) as s:
        with GruserveClient(s.target) as c:
            unary = c.generate(**pair, max_tokens=30, min_tokens=30)
            chunks = list(c.stream(**pair, max_tokens=30, min_tokens=30))
    assert len(chunks[0].token_ids) >= 1 and chunks[0].HasField("predicted_rating")
    assert all(len(ch.token_ids) >= 4 for ch in chunks[1:-1])
    assert len(chunks) <= 2 + 29 // 4
    assert [t for ch in chunks for t in ch.token_ids] == list(unary.token_ids)
    assert "".join(ch.text for ch in chunks) == unary.text
    assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH


def test_request_checks_are_built_once_per_method(synthetic_bundle_dir, pair, monkeypatch):
    from gruserve.runtime.servicer import MalformedRequestInterceptor

    built = []
    real = MalformedRequestInterceptor._wrap

    def counting(self, method, handler):
        built.append(method)
        return real(self, method, handler)

    monkeypatch.setattr(MalformedRequestInterceptor, "_wrap", counting)
    gc.unfreeze()  # whatever an earlier server in this process froze
    with running_server(synthetic_bundle_dir) as s, GruserveClient(s.target) as c:
        warm = len(built)  # the warm-up's own calls go through the server's engine, not gRPC
        for _ in range(5):
            c.generate(**pair)
            list(c.stream(**pair))
        assert built[warm:].count("/gruserve.v1.Generator/Generate") <= 1
        assert built[warm:].count("/gruserve.v1.Generator/GenerateStream") <= 1
        assert gc.get_freeze_count() > 0  # start-up's objects are out of the collector's way


def test_calls_to_unknown_methods_leave_no_memo_behind(synthetic_bundle_dir, monkeypatch):
    """The per-method memo of request checks holds registered methods only: a client that
    names ever new methods gets UNIMPLEMENTED each time and grows nothing."""
    from gruserve.runtime.servicer import MalformedRequestInterceptor

    made = []
    real_init = MalformedRequestInterceptor.__init__

    def keep(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(MalformedRequestInterceptor, "__init__", keep)
    with running_server(synthetic_bundle_dir) as s, grpc.insecure_channel(s.target) as channel:
        for n in range(200):
            call = channel.unary_unary(f"/gruserve.v1.Generator/Nope{n}")
            with pytest.raises(grpc.RpcError) as info:
                call(b"", timeout=10)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert made
        for interceptor in made:
            assert not any("Nope" in method for method in interceptor._wrapped)


def test_batch_answers_in_order(client, pairs, synthetic_bundle):
    state = [0.1] * (synthetic_bundle.num_layers * synthetic_bundle.hidden_size)
    requests = [
        build_request(user=u, item=i, request_id=f"b{n}", max_tokens=5 + n % 3)
        for n, (u, i) in enumerate(pairs)
    ]
    requests.append(build_request(hidden_state=state, request_id="raw"))
    reply = client.generate_batch(requests)
    assert [r.request_id for r in reply.responses] == [f"b{n}" for n in range(len(pairs))] + [
        "raw"
    ]
    for request, response in zip(requests[:-1], reply.responses[:-1], strict=True):
        alone = client.generate_request(request)  # the same request on its own
        assert list(response.token_ids) == list(alone.token_ids)
        assert response.predicted_rating == pytest.approx(alone.predicted_rating)
        assert len(response.token_ids) <= request.parameters.max_tokens
    assert not reply.responses[-1].HasField("predicted_rating")
    # dicts of build_request's arguments work too
    reply = client.generate_batch([{"user": u, "item": i} for u, i in pairs[:2]])
    assert len(reply.responses) == 2


def test_model_info(client, synthetic_bundle):
    info = client.model_info()
    assert info.model_name == synthetic_bundle.name
    assert info.vocab_size == len(synthetic_bundle.vocab)
    assert info.hidden_size == synthetic_bundle.hidden_size
    assert info.num_layers == synthetic_bundle.num_layers
    assert info.num_users == len(synthetic_bundle.users)
    assert info.num_items == len(synthetic_bundle.items)
    assert (info.min_rating, info.max_rating) == (1.0, 5.0)
    assert info.bos_id == synthetic_bundle.special_ids["bos"]
    assert info.eos_id == synthetic_bundle.special_ids["eos"]
    assert info.provider == "CPUExecutionProvider"
    assert info.max_slots == 32
    assert info.max_tokens == MAX_TOKENS
    assert info.default_max_tokens == synthetic_bundle.max_len
    assert info.sampling_top_k == 16
    assert 1 <= info.max_beams <= 16
    assert info.max_stop_tokens > 0
    assert info.accepts_hidden_state
    assert info.max_batch_requests == 64
    assert info.max_request_bytes == 4 << 20
    assert info.precision
    assert info.server_version == gruserve.__version__


def test_health_and_reflection(server, client):
    assert client.health() == "SERVING"
    assert client.health("gruserve.v1.Generator") == "SERVING"
    with grpc.insecure_channel(server.target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"gruserve.v1.Generator", "grpc.health.v1.Health"} <= services
        service = db.FindFileContainingSymbol("gruserve.v1.Generator").service[0]
        assert {m.name for m in service.method} == {
            "Generate", "GenerateStream", "GenerateBatch", "PredictRatings", "GetModelInfo"
        }
        with pytest.raises(grpc.RpcError) as info:
            health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5
            )
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


# --- status codes ---------------------------------------------------------------------------

STATE_SIZE = 32  # the synthetic bundle: 1 layer x hidden 32
NAN = float("nan")

INVALID = {
    "max_tokens over the limit": (dict(max_tokens=MAX_TOKENS + 1), "parameters.max_tokens"),
    "min_tokens over max_tokens": (dict(max_tokens=5, min_tokens=6), "parameters.min_tokens"),
    "negative temperature": (dict(strategy="sample", temperature=-1.0), "parameters.temperature"),
    "NaN temperature": (dict(temperature=NAN), "parameters.temperature"),
    "top_p over 1": (dict(strategy="sample", top_p=1.5), "parameters.top_p"),
    "infinite top_p": (dict(top_p=math.inf), "parameters.top_p"),
    "top_k over K": (dict(strategy="sample", top_k=17), "parameters.top_k"),
    "too many beams": (dict(strategy="beam", num_beams=100), "parameters.num_beams"),
    "NaN length_penalty": (dict(strategy="beam", length_penalty=NAN), "parameters.length_penalty"),
    "huge length_penalty": (dict(strategy="beam", length_penalty=-1e30),
                            "parameters.length_penalty"),
    "too many stop ids": (dict(stop_token_ids=list(range(17))), "parameters.stop_token_ids"),
    "stop id past the vocab": (dict(stop_token_ids=[10**6]), "parameters.stop_token_ids"),
    "negative stop id": (dict(stop_token_ids=[-1]), "parameters.stop_token_ids"),
    "empty user id": (dict(user=""), "user_item.user_id"),
    "empty item id": (dict(item=""), "user_item.item_id"),
    # checked whatever the strategy: each of these is a greedy request
    "greedy, top_p over 1": (dict(top_p=1.5), "parameters.top_p"),
    "greedy, negative temperature": (dict(temperature=-1.0), "parameters.temperature"),
    "greedy, a million beams": (dict(num_beams=1_000_000), "parameters.num_beams"),
    "greedy, top_k a billion": (dict(top_k=1_000_000_000), "parameters.top_k"),
    "greedy, huge length_penalty": (dict(length_penalty=1e9), "parameters.length_penalty"),
    "long user id": (dict(user="u" * 1_000_000), "user_item.user_id"),
    "item id with a NUL": (dict(item="i\x00"), "user_item.item_id"),
    "long request id": (dict(request_id="r" * 129), "request_id"),
    "request id with a newline": (dict(request_id="a\nforged log line"), "request_id"),
}
INVALID_STATE = {
    "short hidden state": ([0.0] * (STATE_SIZE - 1), "hidden_state"),
    "long hidden state": ([0.0] * (STATE_SIZE + 1), "hidden_state"),
    "NaN in hidden state": ([0.0] * (STATE_SIZE - 1) + [NAN], "hidden_state"),
    "inf in hidden state": ([math.inf] * STATE_SIZE, "hidden_state"),
    "huge finite hidden state": ([3e38] * STATE_SIZE, "hidden_state"),
}


@pytest.mark.parametrize("case", INVALID, ids=list(INVALID))
def test_invalid_argument_names_the_field(client, pair, case):
    kwargs, field = INVALID[case]
    for call in (client.generate, client.stream):
        error = _error(call, **{**pair, **kwargs})
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details().startswith(f"{field}: "), error.details()


@pytest.mark.parametrize("case", INVALID_STATE, ids=list(INVALID_STATE))
def test_invalid_hidden_state(client, case):
    state, field = INVALID_STATE[case]
    error = _error(client.generate, hidden_state=state)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(f"{field}: ")


def test_invalid_enum_and_missing_conditioning(client, pair):
    request = build_request(**pair)
    request.parameters.strategy = 99  # proto3 enums are open: a newer client can send this
    error = _error(client.generate_request, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("parameters.strategy: ")
    error = _error(client.generate_request, pb.GenerateRequest())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("conditioning: ")


def test_invalid_batches(client, pair):
    for requests in ([], [pair] * 65):
        error = _error(client.generate_batch, requests)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details().startswith("requests: ")
    error = _error(client.generate_batch, [dict(pair, request_id="x")] * 2)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unique" in error.details()
    error = _error(client.generate_batch, [pair, dict(pair, max_tokens=1000)])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("requests[1].parameters.max_tokens: ")


def test_unknown_ids_are_not_found(client, pair):
    for kwargs, name in ((dict(user="no-such-user"), "no-such-user"),
                         (dict(item="no-such-item"), "no-such-item")):
        for call in (client.generate, client.stream):
            error = _error(call, **{**pair, **kwargs})
            assert error.code() == grpc.StatusCode.NOT_FOUND
            assert name in error.details()
    error = _error(client.generate_batch, [pair, dict(pair, user="nobody")])
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details().startswith("requests[1]: ")
    # an unknown id at the length limit is refused with short details (trailers have a
    # size limit)
    error = _error(client.generate, **dict(pair, user="u" * 256))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert len(error.details()) < 400


def test_oversized_messages_are_resource_exhausted(client, pair):
    huge_state = [0.5] * (2 << 20)  # 8 MB of floats: over the 4 MiB request limit
    assert _error(client.generate, hidden_state=huge_state).code() == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    huge_stop_list = list(range(1 << 40, (1 << 40) + 10**6))  # 6 bytes each
    error = _error(client.generate, **pair, stop_token_ids=huge_stop_list)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_queue_full_is_resource_exhausted(synthetic_bundle_dir, pair):
    with running_server(synthetic_bundle_dir, num_slots=1, max_queued=1) as server, \
            GruserveClient(server.target) as client, StepGate(server.engine) as gate:
        generate = client.stub.Generate
        running = generate.future(build_request(**pair, max_tokens=5), timeout=30)
        gate.wait_blocked()  # the first request holds the only slot, mid-step
        waiting = generate.future(build_request(**pair, max_tokens=5), timeout=30)
        # the second one is queued (its RPC has reached the engine)
        wait_for(lambda: server.engine.num_in_flight == 2, "the queued request")
        error = _error(client.generate, **pair)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue" in error.details()
        error = _error(client.generate_batch, [pair])
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        gate.open()
        assert len(running.result().token_ids) > 0
        assert len(waiting.result().token_ids) > 0
        assert client.health() == "SERVING"


def test_unexpected_error_is_internal_and_logged(client, pair, monkeypatch, caplog):
    from gruserve.runtime import convert

    def broken(*args, **kwargs):
        raise RuntimeError("conversion bug")

    monkeypatch.setattr(convert, "generate_response", broken)
    with caplog.at_level(logging.ERROR, logger="gruserve.runtime.servicer"):
        error = _error(client.generate, **pair, request_id="req-for-the-log")
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "req-for-the-log" in error.details()
    assert "conversion bug" not in error.details()  # internals stay in the log
    records = [r for r in caplog.records if "req-for-the-log" in r.getMessage()]
    assert records and records[0].exc_info is not None
    monkeypatch.undo()
    assert client.health() == "SERVING"
    assert client.generate(**pair).token_ids


# --- metrics --------------------------------------------------------------------------------


def _value(metrics, name, **labels) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_endpoint_counts(server, client, pair):
    before = server.metrics()
    reply = client.generate(**pair)
    chunks = list(client.stream(**pair))
    _error(client.generate, **dict(pair, user="nobody"))
    _error(client.generate, **dict(pair, max_tokens=1000))
    after = server.metrics()

    def delta(name, **labels):
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert delta("gruserve_requests_total", rpc="Generate", code="OK") == 1
    assert delta("gruserve_requests_total", rpc="GenerateStream", code="OK") == 1
    assert delta("gruserve_requests_total", rpc="Generate", code="NOT_FOUND") == 1
    assert delta("gruserve_requests_total", rpc="Generate", code="INVALID_ARGUMENT") == 1
    num_tokens = len(reply.token_ids) + sum(len(c.token_ids) for c in chunks)
    assert delta("gruserve_generated_tokens_total") == num_tokens
    assert delta("gruserve_time_to_first_token_seconds_count") == 2
    assert delta("gruserve_request_latency_seconds_count") == 2
    assert delta("gruserve_queue_time_seconds_count") == 2
    # one step per token at least (a stream and a unary request may share steps)
    assert delta("gruserve_step_batch_size_count") >= len(reply.token_ids)
    assert delta("gruserve_step_duration_seconds_count") >= len(reply.token_ids)
    assert delta("gruserve_step_duration_seconds_sum") > 0
    # gauges: nothing runs or waits once the answers are in
    assert ("gruserve_queue_depth", ()) in after
    assert _value(after, "gruserve_queue_depth") == 0
    assert _value(after, "gruserve_active_slots") == 0
    assert _value(after, "gruserve_running_requests") == 0


def test_active_slots_gauge_follows_running_requests(server, client, pair):
    with StepGate(server.engine) as gate:
        call = client.stub.Generate.future(build_request(**pair, max_tokens=5), timeout=30)
        gate.allow(1)
        gate.wait_blocked(2)  # the request has a slot and one token
        assert _value(server.metrics(), "gruserve_active_slots") == 1
        assert _value(server.metrics(), "gruserve_running_requests") == 1
        gate.open()
        call.result()
    wait_for(lambda: _value(server.metrics(), "gruserve_active_slots") == 0, "a free slot")


# --- clients --------------------------------------------------------------------------------


def test_async_client(server, pair, synthetic_bundle):
    async def main():
        async with AsyncGruserveClient(server.target) as client:
            await client.wait_until_serving(timeout=10)
            assert await client.health() == "SERVING"
            reply = await client.generate(**pair, max_tokens=6, return_logprobs=True)
            chunks = [c async for c in client.stream(**pair, max_tokens=6)]
            batch = await client.generate_batch(
                [dict(pair, max_tokens=6), dict(pair, max_tokens=2)]
            )
            info = await client.model_info()
            try:
                await client.generate(**dict(pair, user="nobody"))
            except grpc.aio.AioRpcError as exc:
                missing = exc.code()
            # several requests at once on one channel
            many = await asyncio.gather(*(client.generate(**pair) for _ in range(8)))
            return reply, chunks, batch, info, missing, many

    reply, chunks, batch, info, missing, many = asyncio.run(main())
    assert len(reply.token_logprobs) == len(reply.token_ids) <= 6
    assert [t for c in chunks for t in c.token_ids] == list(reply.token_ids)
    assert list(batch.responses[0].token_ids) == list(reply.token_ids)
    assert len(batch.responses[1].token_ids) <= 2
    assert info.vocab_size == len(synthetic_bundle.vocab)
    assert missing == grpc.StatusCode.NOT_FOUND
    assert len({tuple(r.token_ids) for r in many}) == 1


def test_cli_generate_and_info(server, client, pair, capsys):
    target = ["--target", server.target]
    expected = client.generate(**pair, return_logprobs=True)
    assert cli.main(["generate", "--user", pair["user"], "--item", pair["item"],
                     "--logprobs", *target]) == 0
    out = capsys.readouterr().out
    assert f"tip:    {expected.text}\n" in out
    assert "rating: " in out and "logprobs: " in out

    assert cli.main(["generate", "--user", pair["user"], "--item", pair["item"], "--stream",
                     *target]) == 0
    out = capsys.readouterr().out
    assert expected.text in out
    assert "finished by" in out

    # every decoding option reaches the server (checked by the answer obeying them)
    assert cli.main([
        "generate", "--user", pair["user"], "--item", pair["item"], "--strategy", "sample",
        "--max-tokens", "7", "--min-tokens", "7", "--temperature", "0.7", "--top-k", "5",
        "--top-p", "0.9", "--seed", "11", "--stop-ids", "1,2", "--logprobs", "--json",
        "--request-id", "cli-1", *target,
    ]) == 0
    import json

    reply = json.loads(capsys.readouterr().out)
    assert reply["requestId"] == "cli-1"
    assert len(reply["tokenIds"]) == 7 and len(reply["tokenLogprobs"]) == 7
    assert cli.main([
        "generate", "--user", pair["user"], "--item", pair["item"], "--strategy", "beam",
        "--num-beams", "2", "--length-penalty", "0.8", "--json", *target,
    ]) == 0
    assert json.loads(capsys.readouterr().out)["tokenIds"]
    state = ",".join(["0.25"] * STATE_SIZE)
    assert cli.main(["generate", "--hidden-state", state, "--max-tokens", "4", *target]) == 0
    assert "tip:" in capsys.readouterr().out

    # errors: the status on stderr, exit code 1
    assert cli.main(["generate", "--user", "nobody", "--item", pair["item"], *target]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err

    assert cli.main(["info", *target]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["health"] == "SERVING"
    assert info["provider"] == "CPUExecutionProvider"


def test_cli_serve_without_bundle_serves_the_demo_bundle(monkeypatch):
    from gruserve.runtime import demo, server

    seen = {}

    async def fake_serve_forever(bundle, config):
        seen["bundle"], seen["config"] = bundle, config
        return 0

    monkeypatch.setattr(server, "serve_forever", fake_serve_forever)
    assert cli.main(["serve", "--port", "0", "--num-slots", "8"]) == 0
    assert seen["bundle"] == demo.DEMO_BUNDLE
    assert seen["config"].transport.host == "127.0.0.1"  # this machine only, unless told
    assert seen["config"].scheduler.num_slots == 8


def test_many_concurrent_clients(server, pairs):
    """Threads with their own channels, all RPC kinds at once: every answer correct."""
    with GruserveClient(server.target) as c:
        expected = {p: list(c.generate(user=p[0], item=p[1]).token_ids) for p in pairs}

    def work(pair):
        with GruserveClient(server.target) as c:
            user, item = pair
            unary = list(c.generate(user=user, item=item).token_ids)
            streamed = [t for ch in c.stream(user=user, item=item) for t in ch.token_ids]
            batch = c.generate_batch([{"user": user, "item": item}] * 3)
            return pair, unary, streamed, [list(r.token_ids) for r in batch.responses]

    with ThreadPoolExecutor(8) as pool:
        for pair, unary, streamed, batch in pool.map(work, pairs * 2):
            assert unary == streamed == expected[pair]
            assert batch == [expected[pair]] * 3
