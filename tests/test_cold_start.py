"""Unknown users and items: NOT_FOUND by default; with --unknown-entities fallback, answered
on the bundle's fallback embedding and flagged. Wiring on the synthetic bundle (both
lanes), the fallback row's numbers against PyTorch on the trained tiny model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from gruserve.runtime.bundle import MANIFEST, BundleError, ModelInfo, load_bundle
from gruserve.runtime.client import GruserveClient
from gruserve.runtime.errors import NotFoundError
from gruserve.runtime.request_builder import RequestBuilder
from gruserve.runtime.requests import DecodingParams, Limits

from .serving import running_server

NEW_USER, OTHER_NEW_USER, NEW_ITEM = "brand-new-user", "another-new-user", "brand-new-item"


@pytest.fixture(scope="module")
def server(synthetic_bundle_dir):
    # no result cache: fallback answers are compared with each other as decoded
    with running_server(synthetic_bundle_dir, metrics_port=0, unknown_entities="fallback",
                        cache_size=0) as s:
        yield s


@pytest.fixture(scope="module")
def known(synthetic_bundle):
    return synthetic_bundle.users[0], synthetic_bundle.items[0]


def without_fallback_rows(bundle_dir: Path, out: Path) -> Path:
    """A copy whose manifest has no fallback_entities: what bundles exported before them
    look like (the manifest is not hashed, so the copy stays a valid bundle)."""
    copy = Path(shutil.copytree(bundle_dir, out))
    manifest = json.loads((copy / MANIFEST).read_text())
    del manifest["fallback_entities"]
    (copy / MANIFEST).write_text(json.dumps(manifest))
    return copy


# --- the bundle and the request builder ------------------------------------------------------


def test_exported_bundles_carry_one_fallback_row_per_table(synthetic_bundle):
    assert synthetic_bundle.fallback_user == len(synthetic_bundle.users)
    assert synthetic_bundle.fallback_item == len(synthetic_bundle.items)
    assert synthetic_bundle.manifest["fallback_entities"]["method"]


def test_a_fallback_row_that_could_be_a_known_entity_is_refused(synthetic_bundle_dir, tmp_path):
    broken = Path(shutil.copytree(synthetic_bundle_dir, tmp_path / "bundle"))
    manifest = json.loads((broken / MANIFEST).read_text())
    manifest["fallback_entities"]["user"] = 3
    (broken / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="fallback_entities.user"):
        load_bundle(broken)


def test_the_builder_resolves_unknown_ids_to_the_fallback_rows_only_when_asked(
    synthetic_bundle, known
):
    info = ModelInfo.from_bundle(synthetic_bundle)
    limits = Limits(vocab_size=len(info.vocab), max_tokens=64, default_max_tokens=15,
                    sampling_top_k=16, max_beams=4)
    strict = RequestBuilder(info, limits, can_write_states=True)
    lenient = RequestBuilder(info, limits, can_write_states=True, fallback=True)
    with pytest.raises(NotFoundError):
        strict.build("r", DecodingParams(), user_id=NEW_USER, item_id=known[1])
    request = lenient.build("r", DecodingParams(), user_id=NEW_USER, item_id=known[1])
    assert (request.user_index, request.user_fallback) == (info.fallback_user, True)
    assert (request.item_index, request.item_fallback) == (info.items[known[1]], False)
    ratings = lenient.build_ratings("r", user_id=known[0], item_ids=[NEW_ITEM, known[1]])
    assert ratings.items.tolist() == [info.fallback_item, info.items[known[1]]]
    assert ratings.item_fallback.tolist() == [True, False]
    assert ratings.user_fallback.tolist() == [False, False]
    # a bundle without fallback rows cannot be asked for them
    bare = ModelInfo(**{**info.__dict__, "fallback_user": None, "fallback_item": None})
    with pytest.raises(ValueError):
        RequestBuilder(bare, limits, can_write_states=True, fallback=True)


# --- over gRPC ------------------------------------------------------------------------------


def _fallbacks(server, side: str) -> float:
    return server.metrics()[("gruserve_entity_fallbacks_total", (("side", side),))]


def test_an_unknown_user_is_answered_on_the_fallback_and_flagged(server, client, known):
    before = _fallbacks(server, "user")
    reply = client.generate(user=NEW_USER, item=known[1], max_tokens=8)
    assert reply.user_fallback and not reply.item_fallback
    assert 0 < len(reply.token_ids) <= 8 and reply.HasField("predicted_rating")
    assert _fallbacks(server, "user") - before == 1
    # every unknown user is the same fallback user: same text, same rating
    other = client.generate(user=OTHER_NEW_USER, item=known[1], max_tokens=8)
    assert other.user_fallback
    assert list(other.token_ids) == list(reply.token_ids)
    assert other.predicted_rating == reply.predicted_rating
    # a known pair is not flagged, and is not the fallback's answer
    plain = client.generate(user=known[0], item=known[1], max_tokens=8)
    assert not plain.user_fallback and not plain.item_fallback


def test_both_sides_unknown_in_every_rpc(server, client, known):
    reply = client.generate(user=NEW_USER, item=NEW_ITEM, max_tokens=5)
    assert reply.user_fallback and reply.item_fallback
    chunks = list(client.stream(user=NEW_USER, item=NEW_ITEM, max_tokens=5))
    assert chunks[0].user_fallback and chunks[0].item_fallback
    assert [t for c in chunks for t in c.token_ids] == list(reply.token_ids)
    batch = client.generate_batch([
        dict(user=NEW_USER, item=known[1], max_tokens=5, request_id="a"),
        dict(user=known[0], item=NEW_ITEM, max_tokens=5, request_id="b"),
        dict(user=known[0], item=known[1], max_tokens=5, request_id="c"),
    ])
    assert [(r.user_fallback, r.item_fallback) for r in batch.responses] == [
        (True, False), (False, True), (False, False),
    ]


def test_ratings_flag_each_pair_and_rate_unknowns_on_the_fallback(server, client, known,
                                                                  synthetic_bundle):
    items = [known[1], NEW_ITEM, synthetic_bundle.items[1], "yet-another-item"]
    before = _fallbacks(server, "item")
    reply = client.predict_ratings(user=known[0], items=items)
    assert list(reply.item_fallback) == [False, True, False, True]
    assert list(reply.user_fallback) == [False] * 4
    assert reply.ratings[1] == reply.ratings[3]  # both rated on the one fallback item
    assert _fallbacks(server, "item") - before == 2
    # the rating PredictRatings gives an unknown item is the one Generate conditions on
    generated = client.generate(user=known[0], item=NEW_ITEM, max_tokens=1)
    assert np.float32(generated.predicted_rating) == np.float32(reply.ratings[1])
    # top_k keeps each returned pair's flags
    top = client.predict_ratings(user=known[0], items=items, top_k=2)
    for index, flag in zip(top.indices, top.item_fallback, strict=True):
        assert flag == (items[index] in (NEW_ITEM, "yet-another-item"))
    # nothing unknown: no flags sent
    assert not client.predict_ratings(user=known[0], items=items[:1]).item_fallback


def test_the_cache_shares_the_fallback_answer_and_each_reply_keeps_its_flags(
    synthetic_bundle_dir, known
):
    with running_server(synthetic_bundle_dir, unknown_entities="fallback") as server, \
            GruserveClient(server.target, timeout=30) as client:
        first = client.generate(user="cold-user-1", item=known[1])
        second = client.generate(user="cold-user-2", item=known[1])
        assert not first.cached and second.cached and second.user_fallback
        assert list(second.token_ids) == list(first.token_ids)
        # a known user with the same item is another key
        assert not client.generate(user=known[0], item=known[1]).cached


def test_model_info_says_fallback_is_on(client):
    assert client.model_info().unknown_entities_fallback is True


def test_by_default_unknown_ids_are_not_found(synthetic_bundle_dir, known):
    with running_server(synthetic_bundle_dir) as server, \
            GruserveClient(server.target, timeout=30) as client:
        for call, kwargs, name in (
            (client.generate, dict(user=NEW_USER, item=known[1]), NEW_USER),
            (client.predict_ratings, dict(user=known[0], items=[known[1], NEW_ITEM]), NEW_ITEM),
        ):
            with pytest.raises(grpc.RpcError) as error:
                call(**kwargs)
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
            assert name in error.value.details()
        assert client.model_info().unknown_entities_fallback is False


# --- bundles without fallback rows -------------------------------------------------------------


def test_fallback_mode_refuses_a_bundle_without_fallback_rows_in_one_line(synthetic_bundle_dir,
                                                                           tmp_path):
    old = without_fallback_rows(synthetic_bundle_dir, tmp_path / "old")
    result = subprocess.run(
        [sys.executable, "-m", "gruserve.runtime", "serve", str(old), "--port", "0",
         "--device", "cpu", "--unknown-entities", "fallback"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert "--unknown-entities" in lines[-1] and str(old) in lines[-1]
    assert "Traceback" not in result.stderr


def test_a_bundle_without_fallback_rows_still_serves_with_errors(synthetic_bundle_dir, tmp_path,
                                                                  known):
    old = without_fallback_rows(synthetic_bundle_dir, tmp_path / "old")
    with running_server(old) as server, GruserveClient(server.target, timeout=30) as client:
        assert client.generate(user=known[0], item=known[1]).token_ids
        with pytest.raises(grpc.RpcError) as error:
            client.generate(user=NEW_USER, item=known[1])
        assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_reload_to_a_bundle_without_fallback_rows_is_refused(server, client,
                                                                synthetic_bundle_dir, tmp_path,
                                                                known):
    old = without_fallback_rows(synthetic_bundle_dir, tmp_path / "old")
    version = client.model_info().bundle_version
    assert server.call(server.server.reload(old)) is False
    assert client.model_info().bundle_version == version
    assert client.generate(user=NEW_USER, item=known[1], max_tokens=3).user_fallback


# --- the fallback row's numbers (trained tiny model, PyTorch) ---------------------------------


def test_the_fallback_rating_is_the_encoder_at_the_mean_embeddings(tiny_bundle, tiny_checkpoint):
    torch = pytest.importorskip("torch", reason="PyTorch reference needs the export extra")
    from gruserve.runtime.runner import StepRunner

    model = tiny_checkpoint[0].build_model()
    encoder = model.encoder
    runner = StepRunner(tiny_bundle, num_slots=4)
    users = np.array([tiny_bundle.fallback_user, tiny_bundle.fallback_user, 3])
    items = np.array([0, tiny_bundle.fallback_item, tiny_bundle.fallback_item])
    slots = np.arange(3)
    ratings = runner.encode(slots, users, items)
    with torch.no_grad():
        u_table = torch.cat([encoder.user_embeddings.weight,
                             encoder.user_embeddings.weight.mean(0, keepdim=True)])
        i_table = torch.cat([encoder.item_embeddings.weight,
                             encoder.item_embeddings.weight.mean(0, keepdim=True)])
        encoder.user_embeddings = torch.nn.Embedding.from_pretrained(u_table)
        encoder.item_embeddings = torch.nn.Embedding.from_pretrained(i_table)
        reference, hidden = encoder(torch.as_tensor(users), torch.as_tensor(items))
    np.testing.assert_allclose(ratings, reference.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(runner.read_states(slots)[0], hidden[0].numpy(), atol=1e-5,
                               rtol=0)
    np.testing.assert_allclose(runner.rate(users, items), reference.numpy(), atol=1e-5, rtol=0)
