"""Ratings for ranking: the encoder alone, against PyTorch, chunked, beside live decoding.

The runner's rating path binds a scratch pool of its own; these tests prove it equals the
PyTorch encoder and never writes a slot a decoding request owns.
"""

from __future__ import annotations

import asyncio
import itertools

import numpy as np
import pytest

pytest.importorskip("torch")

import torch  # noqa: E402

from gruserve.runtime.bundle import ModelInfo  # noqa: E402
from gruserve.runtime.config import RecommenderConfig, SchedulerConfig  # noqa: E402
from gruserve.runtime.core import EngineCore, top_indices  # noqa: E402
from gruserve.runtime.engine import Engine  # noqa: E402
from gruserve.runtime.errors import InvalidRequestError, NotFoundError  # noqa: E402
from gruserve.runtime.requests import DecodingParams, Strategy  # noqa: E402
from gruserve.runtime.runner import StepRunner  # noqa: E402
from gruserve.runtime.sampler import SamplingParams  # noqa: E402

TIMEOUT_S = 60  # a bound so that no test hangs, never a performance assertion
NUM_SLOTS = 8


@pytest.fixture(scope="module")
def runner(tiny_bundle):
    return StepRunner(tiny_bundle, num_slots=NUM_SLOTS)


@pytest.fixture(scope="module")
def info(tiny_bundle):
    return ModelInfo.from_bundle(tiny_bundle)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return tiny_checkpoint[0].build_model()


def torch_ratings(model, users, items) -> np.ndarray:
    with torch.no_grad():
        rating, _ = model.encoder(torch.as_tensor(users), torch.as_tensor(items))
    return rating.numpy()


def all_pairs(info):
    """Every (user row, item row) of the tiny model: 60 x 50 = 3,000 pairs."""
    pairs = np.array(list(itertools.product(range(len(info.users)), range(len(info.items)))))
    return pairs[:, 0].copy(), pairs[:, 1].copy()


def core(runner, info, **recommender) -> EngineCore:
    return EngineCore(
        runner, info, SchedulerConfig(num_slots=runner.num_slots),
        recommender=RecommenderConfig(**recommender),
    )


def test_runner_ratings_equal_the_pytorch_encoder_for_every_pair(runner, info, model):
    users, items = all_pairs(info)
    ratings = runner.rate(users, items)
    assert ratings.shape == (users.size,) and ratings.dtype == np.float32
    np.testing.assert_allclose(ratings, torch_ratings(model, users, items), atol=1e-5, rtol=0)
    # and they are the ratings the decode path's encoder gives the same pairs
    slots = np.arange(NUM_SLOTS)
    np.testing.assert_array_equal(
        runner.encode(slots, users[:NUM_SLOTS], items[:NUM_SLOTS]), ratings[:NUM_SLOTS]
    )


def test_a_rating_run_writes_no_slot(runner, info):
    slots = np.arange(NUM_SLOTS)
    runner.encode(slots, slots % len(info.users), (3 * slots) % len(info.items))
    before = runner.read_states(slots).copy()
    users, items = all_pairs(info)
    for size in (1, 7, NUM_SLOTS, NUM_SLOTS + 1, users.size):  # smaller and larger than S
        runner.rate(users[-size:], items[-size:])
        np.testing.assert_array_equal(runner.read_states(slots), before)


def test_ratings_above_the_chunk_limit_are_chunked_and_exact(runner, info, model):
    users, items = all_pairs(info)
    users, items = users[:1000], items[::-1][:1000].copy()
    engine_core = core(runner, info, rating_chunk_size=64)
    request = engine_core.requests.build_ratings(
        "r", pairs=[(info_id(info.users, u), info_id(info.items, i)) for u, i in zip(
            users, items, strict=True)],
    )
    calls = []
    real = runner.rate

    def counted(u, i):
        calls.append(u.size)
        return real(u, i)

    runner.rate = counted
    try:
        output = engine_core.rate(request)
    finally:
        del runner.rate
    assert output.num_runs == 16 and max(calls) == 64 and sum(calls) == 1000
    np.testing.assert_array_equal(output.indices, np.arange(1000))
    np.testing.assert_allclose(output.ratings, torch_ratings(model, users, items), atol=1e-5,
                               rtol=0)


def info_id(index: dict[str, int], row: int) -> str:
    return next(k for k, v in index.items() if v == row)


def test_top_k_is_the_best_first_with_ties_in_request_order(runner, info, model):
    user = sorted(info.users)[4]
    items = sorted(info.items)
    # every item twice: each rating appears twice, so ties must keep request order
    candidates = items + items
    engine_core = core(runner, info)
    full = engine_core.rate(engine_core.requests.build_ratings("a", user_id=user,
                                                               item_ids=candidates))
    top = engine_core.rate(engine_core.requests.build_ratings("b", user_id=user,
                                                              item_ids=candidates, top_k=9))
    expected = sorted(range(len(candidates)), key=lambda i: (-full.ratings[i], i))[:9]
    assert top.indices.tolist() == expected
    np.testing.assert_array_equal(top.ratings, full.ratings[expected])
    assert np.all(np.diff(top.ratings) <= 0)
    for a, b in zip(expected, expected[1:], strict=False):  # a tie: the earlier one first
        if full.ratings[a] == full.ratings[b]:
            assert a < b
    # top_k above the count returns everything, best first
    everything = engine_core.rate(
        engine_core.requests.build_ratings("c", user_id=user, item_ids=items, top_k=999)
    )
    assert sorted(everything.indices.tolist()) == list(range(len(items)))
    rows = np.array([info.items[i] for i in items])
    reference = torch_ratings(model, np.full(len(items), info.users[user]), rows)
    np.testing.assert_allclose(everything.ratings, np.sort(reference)[::-1], atol=1e-5, rtol=0)


def test_top_indices_without_a_model():
    ratings = np.array([3.0, 4.5, 4.5, 1.0, 5.0], np.float32)
    assert top_indices(ratings, 3).tolist() == [4, 1, 2]
    assert top_indices(ratings, 0).tolist() == [0, 1, 2, 3, 4]
    assert top_indices(ratings, 10).tolist() == [4, 1, 2, 0, 3]


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda u, i: dict(user_id="", item_ids=[i]), "user_id"),
        (lambda u, i: dict(user_id=u, item_ids=[]), "item_ids"),
        (lambda u, i: dict(pairs=[(u, i)], user_id=u), "pairs"),
        (lambda u, i: dict(user_id=u, item_ids=[i, ""]), "item_ids[1]"),
        (lambda u, i: dict(user_id=u, item_ids=[i] * 6), "item_ids"),  # above the limit, 5
        (lambda u, i: dict(pairs=[(u, i), ("", i)]), "pairs[1].user_id"),
        (lambda u, i: dict(user_id=u, item_ids=[i], top_k=-1), "top_k"),
    ],
)
def test_invalid_rating_requests_name_the_field(runner, info, make, field):
    builder = core(runner, info, max_rating_pairs=5).requests
    with pytest.raises(InvalidRequestError) as error:
        builder.build_ratings("r", **make(sorted(info.users)[0], sorted(info.items)[0]))
    assert error.value.field == field


def test_unknown_ids_are_not_found_naming_the_id(runner, info):
    builder = core(runner, info).requests
    user, item = sorted(info.users)[0], sorted(info.items)[0]
    with pytest.raises(NotFoundError) as error:
        builder.build_ratings("r", user_id=user, item_ids=[item, "nope"])
    assert error.value.field == "item_ids[1]" and "'nope'" in str(error.value)
    with pytest.raises(NotFoundError) as error:
        builder.build_ratings("r", pairs=[(item, item)])
    assert error.value.field == "pairs[0].user_id"


def _decoding_mix():
    return [
        DecodingParams(max_tokens=12),
        DecodingParams(strategy=Strategy.SAMPLE, sampling=SamplingParams(seed=5), max_tokens=12),
        DecodingParams(strategy=Strategy.BEAM, num_beams=2, max_tokens=10),
    ]


def test_ratings_beside_decoding_change_neither_the_text_nor_the_ratings(runner, info, model):
    """The race a scratch pool exists for: rating runs from the rating thread while the
    decode thread steps live slots. Repeated, with the slots full, many times."""
    users = sorted(info.users)
    items = sorted(info.items)
    pairs = [(users[i], items[(5 * i) % len(items)]) for i in range(6)]
    mix = _decoding_mix()
    all_users, all_items = all_pairs(info)
    reference_ratings = torch_ratings(model, all_users, all_items)
    rating_pairs = [
        (info_id(info.users, u), info_id(info.items, i))
        for u, i in zip(all_users[:600], all_items[:600], strict=True)
    ]

    async def main():
        engine = Engine(core(runner, info, rating_chunk_size=100))
        engine.start()
        try:
            def submit_all(tag):
                return [
                    engine.submit(engine.make_request(f"{tag}{n}", params, user_id=u, item_id=i))
                    for n, ((u, i), params) in enumerate(itertools.product(pairs, mix))
                    if params.strategy is not Strategy.BEAM or n % 2 == 0
                ]

            alone = [(await h.result()).token_ids for h in submit_all("alone")]
            for round_ in range(8):
                handles = submit_all(f"busy{round_}-")
                ratings = []
                while not all(h.done for h in handles):
                    request = engine.make_ratings(f"rate{round_}", pairs=rating_pairs)
                    ratings.append(await engine.rate(request))
                busy = [(await h.result()).token_ids for h in handles]
                assert busy == alone, f"round {round_}: a rating run changed a decode"
                for output in ratings:
                    np.testing.assert_allclose(
                        output.ratings, reference_ratings[:600], atol=1e-5, rtol=0
                    )
                assert ratings, "no rating ran while decoding"
        finally:
            engine.stop()

    asyncio.run(asyncio.wait_for(main(), TIMEOUT_S))


def test_rate_on_a_stopped_engine_is_unavailable(runner, info):
    from gruserve.runtime.errors import EngineDeadError

    async def main():
        engine = Engine(core(runner, info))
        engine.start()
        request = engine.make_ratings("r", user_id=sorted(info.users)[0],
                                      item_ids=sorted(info.items)[:3])
        assert (await engine.rate(request)).ratings.size == 3
        engine.stop()
        with pytest.raises(EngineDeadError):
            await engine.rate(request)

    asyncio.run(asyncio.wait_for(main(), TIMEOUT_S))


def test_concurrent_rating_calls_take_turns_by_chunk(runner, info):
    """A one-item call that arrives while a ten-chunk call runs waits for one chunk of it,
    not for all ten: the engine queues one encoder run per call at a time."""
    import threading

    sizes, first_run, release = [], threading.Event(), threading.Event()

    class GatedRater:
        def __getattr__(self, name):
            return getattr(runner, name)

        def rate(self, users, items):
            sizes.append(users.size)
            if len(sizes) == 1:
                first_run.set()
                assert release.wait(TIMEOUT_S)
            return runner.rate(users, items)

    async def main():
        engine = Engine(EngineCore(
            GatedRater(), info, SchedulerConfig(num_slots=runner.num_slots),
            recommender=RecommenderConfig(rating_chunk_size=8),
        ))
        engine.start()
        try:
            user, items = sorted(info.users)[0], sorted(info.items)
            big = asyncio.ensure_future(engine.rate(engine.make_ratings(
                "big", user_id=user, item_ids=(items * 2)[:80])))
            while not first_run.is_set():
                await asyncio.sleep(0.001)
            small = asyncio.ensure_future(engine.rate(engine.make_ratings(
                "small", user_id=user, item_ids=items[:1])))
            # one turn of the loop: the small call's task runs up to its first await, by
            # which time it has queued its run (asyncio runs ready tasks in FIFO order)
            await asyncio.sleep(0)
            release.set()
            return await big, await small
        finally:
            release.set()
            engine.stop()

    big, small = asyncio.run(asyncio.wait_for(main(), TIMEOUT_S))
    assert sizes == [8, 1] + [8] * 9
    assert big.num_runs == 10 and small.num_runs == 1
    np.testing.assert_array_equal(small.ratings, big.ratings[:1])
