"""The result cache: unit tests of its key and bounds, then over real gRPC: a replayed
answer equals the computed one bit for bit, unseeded sampling never replays, a reload
forgets everything."""

from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import pytest

from gruserve.runtime.bundle import ModelInfo
from gruserve.runtime.client import GruserveClient
from gruserve.runtime.config import SchedulerConfig
from gruserve.runtime.request_builder import RequestBuilder
from gruserve.runtime.requests import (
    DecodingParams,
    FinishReason,
    Limits,
    RequestOutput,
    Strategy,
)
from gruserve.runtime.result_cache import ENTRY_OVERHEAD_BYTES, ResultCache, cache_key
from gruserve.runtime.sampler import SamplingParams

from .serving import running_server

INFO = ModelInfo(
    name="m", vocab=tuple(f"w{i}" for i in range(50)), users={f"u{i}": i for i in range(9)},
    items={f"i{i}": i for i in range(9)}, bos_id=0, eos_id=1, pad_id=2, unk_id=3,
    hidden_size=4, num_layers=1, model_config={"max_len": 15},
)
BUILD = RequestBuilder(
    INFO, Limits.of(SchedulerConfig(), vocab_size=50, model_max_len=15, sampling_top_k=8),
    can_write_states=True,
).build


def request(user=0, item=0, **params):
    return BUILD("r", DecodingParams(**params), user_id=f"u{user}", item_id=f"i{item}")


def sampled(seed, **kw):
    return dict(strategy=Strategy.SAMPLE, sampling=SamplingParams(seed=seed, **kw))


def final(tokens, logprobs=None, reason=FinishReason.EOS, rating=3.5) -> RequestOutput:
    return RequestOutput(
        request_id="r", new_token_ids=[], finished=True, finish_reason=reason,
        predicted_rating=rating, token_ids=list(tokens), logprobs=logprobs,
        queue_s=0.25, first_token_s=0.5, total_s=1.0,
    )


# --- the key --------------------------------------------------------------------------------


def test_unseeded_sampling_has_no_key_and_seeded_sampling_does():
    assert cache_key("v", request(**sampled(None))) is None
    assert cache_key("v", request(**sampled(7))) is not None
    assert cache_key("v", request(**sampled(7))) != cache_key("v", request(**sampled(8)))


def test_the_key_holds_everything_the_answer_depends_on_and_nothing_else():
    base = cache_key("v", request())
    for different in (
        cache_key("w", request()),  # another bundle
        cache_key("v", request(user=1)),
        cache_key("v", request(item=1)),
        cache_key("v", request(max_tokens=5)),
        cache_key("v", request(min_tokens=2)),
        cache_key("v", request(stop_token_ids=(9,))),
        cache_key("v", request(return_logprobs=True)),
        cache_key("v", request(strategy=Strategy.BEAM)),
        cache_key("v", BUILD("r", DecodingParams(), hidden_state=np.zeros(4))),
    ):
        assert different != base
    # what greedy decoding never reads cannot split its entries; the model's default length
    # and the same length spelled out are one request
    assert cache_key("v", request(sampling=SamplingParams(temperature=0.3))) == base
    assert cache_key("v", request(length_penalty=0.5)) == base
    assert cache_key("v", request(max_tokens=15)) == base
    beam = cache_key("v", request(strategy=Strategy.BEAM, length_penalty=0.5))
    assert beam != cache_key("v", request(strategy=Strategy.BEAM))


# --- the LRU --------------------------------------------------------------------------------


def test_a_stored_answer_replays_with_its_own_timing():
    cache = ResultCache(8, 1 << 20)
    r = request(return_logprobs=True)
    assert cache.lookup("v", r) is None
    cache.store("v", r, final([5, 6, 7], [-0.5, -0.25, -0.125], FinishReason.LENGTH))
    hit = cache.lookup("v", r)
    assert hit.token_ids == hit.new_token_ids == [5, 6, 7]
    assert hit.logprobs == [-0.5, -0.25, -0.125]
    assert (hit.finish_reason, hit.predicted_rating, hit.finished) == (FinishReason.LENGTH,
                                                                       3.5, True)
    assert hit.queue_s == 0.0 and hit.first_token_s == hit.total_s != 1.0
    hit.token_ids.append(99)  # a caller's copy: the cache is not changed through it
    assert cache.lookup("v", r).token_ids == [5, 6, 7]
    assert (cache.stats.hits, cache.stats.misses) == (2, 1)


def test_lru_bounded_in_entries_evicts_the_least_recently_used():
    cache = ResultCache(2, 1 << 20)
    a, b, c = request(item=1), request(item=2), request(item=3)
    cache.store("v", a, final([1]))
    cache.store("v", b, final([2]))
    assert cache.lookup("v", a) is not None  # a is now the most recent
    cache.store("v", c, final([3]))
    assert cache.lookup("v", b) is None
    assert cache.lookup("v", a).token_ids == [1] and cache.lookup("v", c).token_ids == [3]
    assert cache.stats.evictions == 1 and cache.stats.entries == len(cache) == 2


def test_lru_bounded_in_bytes():
    entry = ENTRY_OVERHEAD_BYTES + 8 * 10  # ten tokens
    cache = ResultCache(100, 3 * entry)
    for item in range(5):
        cache.store("v", request(item=item), final(range(10)))
    assert len(cache) == 3 and cache.stats.bytes == 3 * entry <= cache.max_bytes
    assert cache.stats.evictions == 2
    assert cache.lookup("v", request(item=0)) is None
    # an answer bigger than the whole cache is not kept (and evicts nothing)
    cache.store("v", request(item=8), final(range(1000)))
    assert len(cache) == 3 and cache.lookup("v", request(item=8)) is None


def test_uncacheable_and_aborted_answers_are_not_kept():
    cache = ResultCache(8, 1 << 20)
    unseeded = request(**sampled(None))
    cache.store("v", unseeded, final([1, 2]))
    assert cache.lookup("v", unseeded) is None and len(cache) == 0
    assert cache.stats.misses == 0  # not a miss: it could never have hit
    cache.store("v", request(), final([1], reason=FinishReason.ABORTED))
    assert len(cache) == 0


def test_invalidate_forgets_all_and_refuses_other_versions():
    cache = ResultCache(8, 1 << 20)
    cache.store("old", request(), final([1]))
    cache.invalidate("new")
    assert len(cache) == 0 and cache.stats.bytes == 0
    assert cache.lookup("old", request()) is None
    cache.store("old", request(), final([1]))  # a late answer of the replaced bundle
    assert len(cache) == 0
    cache.store("new", request(), final([2]))
    assert cache.lookup("new", request()).token_ids == [2]


# --- over gRPC ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(synthetic_bundle_dir):
    with running_server(synthetic_bundle_dir, metrics_port=0, cache_size=64) as s:
        yield s


@pytest.fixture(scope="module")
def users_items(synthetic_bundle):
    return synthetic_bundle.users, synthetic_bundle.items


_PAIRS_USED = itertools.count()


def _fresh_pair(users_items):
    """A pair no other test asked for (so its first request is always a miss)."""
    users, items = users_items
    n = next(_PAIRS_USED)
    assert n < len(users) * len(items)
    return {"user": users[n // len(items)], "item": items[n % len(items)]}


def _f32(values) -> bytes:
    return np.asarray(values, np.float32).tobytes()


@pytest.mark.parametrize(
    "params",
    [
        dict(return_logprobs=True),
        dict(strategy="beam", num_beams=3, return_logprobs=True),
        dict(strategy="sample", seed=42, temperature=1.3, top_p=0.9, return_logprobs=True),
    ],
    ids=["greedy", "beam", "seeded-sampling"],
)
def test_a_cached_answer_equals_the_computed_one_bit_for_bit(server, client, users_items,
                                                             params):
    pair = _fresh_pair(users_items)
    admitted = server.engine.stats.num_admitted
    computed = client.generate(**pair, **params)
    assert not computed.cached
    assert server.engine.stats.num_admitted == admitted + 1
    replayed = client.generate(**pair, **params)
    assert replayed.cached
    assert server.engine.stats.num_admitted == admitted + 1  # the engine never saw it
    assert list(replayed.token_ids) == list(computed.token_ids)
    assert _f32(replayed.token_logprobs) == _f32(computed.token_logprobs)
    assert len(replayed.token_logprobs) == len(replayed.token_ids) > 0
    assert replayed.text == computed.text
    assert replayed.finish_reason == computed.finish_reason
    assert _f32([replayed.predicted_rating]) == _f32([computed.predicted_rating])
    # honest timing: the replay's own, no queue, not the computation's
    t = replayed.timing
    assert t.queue_ms == 0 and t.ttft_ms == t.total_ms != computed.timing.total_ms


def test_a_stream_replays_in_one_chunk(server, client, users_items):
    pair = _fresh_pair(users_items)
    computed = list(client.stream(**pair, return_logprobs=True))
    assert not any(c.cached for c in computed)
    replayed = list(client.stream(**pair, return_logprobs=True))
    assert len(replayed) == 1
    (chunk,) = replayed
    assert chunk.cached and chunk.finish_reason == computed[-1].finish_reason
    assert list(chunk.token_ids) == [t for c in computed for t in c.token_ids]
    assert _f32(chunk.token_logprobs) == _f32([x for c in computed for x in c.token_logprobs])
    assert chunk.text == " ".join(c.text.strip() for c in computed if c.text)
    assert chunk.HasField("predicted_rating") and chunk.timing.total_ms > 0
    # a unary request with the same parameters reads the stream's answer
    assert client.generate(**pair, return_logprobs=True).cached


def test_unseeded_sampling_is_never_served_from_the_cache(server, client, users_items):
    pair = _fresh_pair(users_items)
    before = server.metrics()
    admitted = server.engine.stats.num_admitted
    replies = [client.generate(**pair, strategy="sample", max_tokens=12) for _ in range(4)]
    assert not any(r.cached for r in replies)
    assert server.engine.stats.num_admitted == admitted + 4
    after = server.metrics()
    for name in ("gruserve_cache_hits_total", "gruserve_cache_misses_total"):
        assert after[(name, ())] == before[(name, ())]


def test_batches_replay_what_they_can(server, client, users_items):
    seen, new = _fresh_pair(users_items), _fresh_pair(users_items)
    first = client.generate(**seen)
    admitted = server.engine.stats.num_admitted
    batch = client.generate_batch([dict(seen, request_id="a"), dict(new, request_id="b")])
    a, b = batch.responses
    assert (a.request_id, a.cached, b.request_id, b.cached) == ("a", True, "b", False)
    assert list(a.token_ids) == list(first.token_ids)
    assert server.engine.stats.num_admitted == admitted + 1


def test_metrics_and_model_info_show_the_cache(server, client, users_items):
    pair = _fresh_pair(users_items)
    before = server.metrics()
    client.generate(**pair)
    client.generate(**pair)
    after = server.metrics()
    for name, change in (("gruserve_cache_hits_total", 1), ("gruserve_cache_misses_total", 1)):
        assert after[(name, ())] - before[(name, ())] == change
    assert after[("gruserve_cache_entries", ())] >= 1 and after[("gruserve_cache_bytes", ())] > 0
    assert client.model_info().cache_size == 64


def test_evictions_are_counted_and_evicted_answers_are_decoded_again(synthetic_bundle_dir,
                                                                     users_items):
    users, items = users_items
    with running_server(synthetic_bundle_dir, metrics_port=0, cache_size=2) as server, \
            GruserveClient(server.target, timeout=30) as client:
        pairs = [{"user": users[i], "item": items[i]} for i in range(3)]
        for pair in pairs:
            assert not client.generate(**pair).cached
        assert server.metrics()[("gruserve_cache_evictions_total", ())] == 1
        assert client.generate(**pairs[2]).cached
        assert not client.generate(**pairs[0]).cached  # the least recently used went


def test_no_cache_with_cache_size_0(synthetic_bundle_dir, users_items):
    users, items = users_items
    with running_server(synthetic_bundle_dir, cache_size=0) as server, \
            GruserveClient(server.target, timeout=30) as client:
        pair = {"user": users[0], "item": items[0]}
        assert not any(client.generate(**pair).cached for _ in range(3))
        assert client.model_info().cache_size == 0
        assert server.server.cache is None


def test_a_reload_invalidates_the_cache(synthetic_bundle_dir, tmp_path, users_items):
    users, items = users_items
    # the same weights under another manifest: a different bundle version
    changed = tmp_path / "changed"
    shutil.copytree(synthetic_bundle_dir, changed)
    manifest = json.loads((changed / "manifest.json").read_text())
    manifest["model_name"] = "tiny-reloaded"
    (changed / "manifest.json").write_text(json.dumps(manifest))
    with running_server(synthetic_bundle_dir, cache_size=64) as server, \
            GruserveClient(server.target, timeout=30) as client:
        pair = {"user": users[1], "item": items[1]}
        computed = client.generate(**pair, return_logprobs=True)
        assert client.generate(**pair, return_logprobs=True).cached
        old_version = client.model_info().bundle_version
        assert server.call(server.server.reload(changed)) is True
        assert client.model_info().bundle_version != old_version
        assert len(server.server.cache) == 0
        after = client.generate(**pair, return_logprobs=True)
        assert not after.cached  # decoded again by the new bundle's engine
        assert list(after.token_ids) == list(computed.token_ids)  # the same weights
        assert client.generate(**pair, return_logprobs=True).cached


def test_model_infer_of_the_inference_protocol_reads_the_same_cache(server, client,
                                                                     users_items):
    import tritonclient.grpc as triton

    pair = _fresh_pair(users_items)
    computed = client.generate(**pair)
    admitted = server.engine.stats.num_admitted
    inputs = []
    for name, value in (("USER_ID", pair["user"]), ("ITEM_ID", pair["item"])):
        tensor = triton.InferInput(name, [1], "BYTES")
        tensor.set_data_from_numpy(np.array([value.encode()], dtype=np.object_))
        inputs.append(tensor)
    with triton.InferenceServerClient(server.target) as oip:
        result = oip.infer(server.bundle.name, inputs)
    length = int(result.as_numpy("LENGTHS")[0])
    assert result.as_numpy("TOKEN_IDS")[0, :length].tolist() == list(computed.token_ids)
    assert server.engine.stats.num_admitted == admitted  # replayed, not decoded


def test_a_replayed_answer_is_one_finished_span_event_flagged_cached(synthetic_bundle_dir,
                                                                      users_items):
    sdk = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    users, items = users_items
    pair = {"user": users[0], "item": items[0]}
    with running_server(synthetic_bundle_dir, tracer_provider=provider) as server, \
            GruserveClient(server.target, timeout=30) as client:
        computed = client.generate(**pair, request_id="computed")
        assert client.generate(**pair, request_id="replayed").cached
    spans = {s.attributes["gruserve.request_id"]: s for s in exporter.get_finished_spans()}
    assert [e.name for e in spans["computed"].events][0] == "queued"
    (event,) = spans["replayed"].events
    assert event.name == "finished" and event.attributes["gruserve.cached"] is True
    assert event.attributes["gruserve.num_tokens"] == len(computed.token_ids)
