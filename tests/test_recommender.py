"""The recommender's API over real gRPC: PredictRatings, rank-then-explain (the client call
and `gruserve rank`)."""

from __future__ import annotations

import asyncio
import json

import grpc
import numpy as np
import pytest

from gruserve.runtime.cli import main
from gruserve.runtime.client import AsyncGruserveClient

from .serving import running_server

MAX_PAIRS = 300
CHUNK = 64
MAX_BATCH = 8  # GenerateBatch's limit: rank-then-explain splits above it


@pytest.fixture(scope="module")
def server(synthetic_bundle_dir):
    # no result cache: explanations are compared with the same requests decoded alone
    with running_server(synthetic_bundle_dir, metrics_port=0, max_rating_pairs=MAX_PAIRS,
                        rating_chunk_size=CHUNK, max_batch_requests=MAX_BATCH,
                        cache_size=0) as s:
        yield s


def _error(call, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(**kwargs)
    return info.value


def test_ratings_of_one_users_items_come_back_in_request_order(client, server, entities):
    users, items = entities
    candidates = items[::-1]
    reply = client.predict_ratings(user=users[3], items=candidates, request_id="rate-1")
    assert reply.request_id == "rate-1"
    assert list(reply.indices) == list(range(len(candidates)))
    assert list(reply.item_ids) == candidates
    assert not reply.user_fallback and not reply.item_fallback
    # the same ratings the decode path's encoder gives (Generate's predicted_rating)
    for index in (0, len(candidates) // 2, len(candidates) - 1):
        generated = client.generate(user=users[3], item=candidates[index], max_tokens=1)
        assert np.float32(reply.ratings[index]) == np.float32(generated.predicted_rating)
    assert 0 <= reply.queue_ms <= reply.total_ms and reply.total_ms > 0


def test_pairs_and_more_pairs_than_one_encoder_run(client, entities):
    users, items = entities
    pairs = [(users[i % len(users)], items[(3 * i) % len(items)]) for i in range(MAX_PAIRS)]
    reply = client.predict_ratings(pairs=pairs)
    assert len(reply.ratings) == MAX_PAIRS > CHUNK
    assert list(reply.item_ids) == [i for _, i in pairs]
    # each pair rated alone agrees with its rating in the chunked call
    for n in (0, CHUNK - 1, CHUNK, MAX_PAIRS - 1):
        alone = client.predict_ratings(pairs=[pairs[n]])
        assert np.float32(alone.ratings[0]) == np.float32(reply.ratings[n])


def test_top_k_returns_the_best_first(client, entities):
    users, items = entities
    every = client.predict_ratings(user=users[0], items=items)
    top = client.predict_ratings(user=users[0], items=items, top_k=5)
    expected = sorted(range(len(items)), key=lambda i: (-np.float32(every.ratings[i]), i))[:5]
    assert list(top.indices) == expected
    assert list(top.item_ids) == [items[i] for i in expected]
    assert list(top.ratings) == [every.ratings[i] for i in expected]


@pytest.mark.parametrize(
    ("kwargs", "code", "field"),
    [
        (dict(items=["x"]), grpc.StatusCode.INVALID_ARGUMENT, "user_id"),
        (dict(user="U"), grpc.StatusCode.INVALID_ARGUMENT, "item_ids"),
        (dict(user="U", items=["I"] * (MAX_PAIRS + 1)), grpc.StatusCode.INVALID_ARGUMENT,
         f"item_ids: needs 1..{MAX_PAIRS} pairs"),
        (dict(user="U", pairs=[("U", "I")]), grpc.StatusCode.INVALID_ARGUMENT, "pairs"),
        (dict(user="U", items=["I", "no-such-item"]), grpc.StatusCode.NOT_FOUND,
         "unknown item_id 'no-such-item'"),
        (dict(pairs=[("I", "I")]), grpc.StatusCode.NOT_FOUND, "unknown user_id"),
    ],
)
def test_bad_rating_requests(client, entities, kwargs, code, field):
    users, items = entities

    def real(value):
        return {"U": users[0], "I": items[0]}.get(value, value)

    kwargs = {
        k: real(v) if k == "user" else [real(x) for x in v] if k == "items"
        else [tuple(real(x) for x in p) for p in v]
        for k, v in kwargs.items()
    }
    error = _error(client.predict_ratings, **kwargs)
    assert error.code() == code
    assert field in error.details()


def test_model_info_gives_the_rating_limits(client):
    info = client.model_info()
    assert (info.max_rating_pairs, info.rating_chunk_size) == (MAX_PAIRS, CHUNK)
    assert info.unknown_entities_fallback is False


def test_metrics_count_rated_pairs(server, client, entities):
    users, items = entities
    before = server.metrics().get(("gruserve_rated_pairs_total", ()), 0)
    client.predict_ratings(user=users[0], items=items[:7])
    assert server.metrics()[("gruserve_rated_pairs_total", ())] - before == 7


def test_rank_and_explain(client, entities):
    users, items = entities
    ranked = client.rank_and_explain(users[5], items, top=4, max_tokens=8)
    best = client.predict_ratings(user=users[5], items=items, top_k=4)
    assert [r.item_id for r in ranked] == list(best.item_ids)
    assert [r.rating for r in ranked] == list(best.ratings)
    for r in ranked:
        alone = client.generate(user=users[5], item=r.item_id, max_tokens=8)
        assert list(r.explanation.token_ids) == list(alone.token_ids)
        assert 0 < len(r.explanation.token_ids) <= 8
        assert not (r.user_fallback or r.item_fallback)


def test_async_rank_and_explain_splits_more_than_one_batch(server, client, entities):
    users, items = entities
    top = len(items)
    assert top > MAX_BATCH  # so that the explanations take two GenerateBatch calls

    async def main():
        async with AsyncGruserveClient(server.target) as aclient:
            return await aclient.rank_and_explain(users[1], items, top=top, max_tokens=3)

    ranked = asyncio.run(main())
    best = client.predict_ratings(user=users[1], items=items, top_k=top)
    assert [r.item_id for r in ranked] == list(best.item_ids)
    for r in ranked:
        alone = client.generate(user=users[1], item=r.item_id, max_tokens=3)
        assert list(r.explanation.token_ids) == list(alone.token_ids)


def test_cli_rank(server, client, entities, tmp_path, capsys):
    users, items = entities
    candidates = tmp_path / "items.txt"
    candidates.write_text("# candidates\n" + "\n".join(items) + "\n\n")
    args = ["rank", "--user", users[2], "--items", str(candidates), "--top", "3",
            "--target", server.target, "--max-tokens", "6"]
    assert main(args) == 0
    out = capsys.readouterr().out
    best = client.predict_ratings(user=users[2], items=items, top_k=3)
    lines = out.strip().splitlines()
    assert lines[0] == f"user {users[2]}: the top 3 of {len(items)} candidate items"
    assert [line.split()[1] for line in lines[1:]] == list(best.item_ids)
    assert main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["item_id"] for d in data] == list(best.item_ids)
    assert [d["rank"] for d in data] == [1, 2, 3]


def test_cli_rank_errors_are_one_line(server, entities, tmp_path, capsys):
    users, items = entities
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    base = ["rank", "--user", users[0], "--target", server.target]
    assert main([*base, "--items", str(empty)]) == 2
    assert "no item ids" in capsys.readouterr().err
    assert main([*base, "--items", str(tmp_path / "missing.txt")]) == 2
    err = capsys.readouterr().err
    assert "--items" in err and "missing.txt" in err and len(err.strip().splitlines()) == 1
    unknown = tmp_path / "unknown.txt"
    unknown.write_text(f"{items[0]}\nno-such-item\n")
    assert main([*base, "--items", str(unknown)]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--items", str(unknown), "--top", "0"])
    assert exit_info.value.code == 2
    assert "--top" in capsys.readouterr().err
