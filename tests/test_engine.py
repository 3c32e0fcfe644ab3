"""The engine on real ORT sessions: runner, decode thread, asyncio facade.

No wall-clock assertions: every wait is bounded by a timeout only so that a broken engine
fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading

import numpy as np
import pytest

from gruserve.runtime.bundle import ModelInfo
from gruserve.runtime.config import SchedulerConfig
from gruserve.runtime.core import EngineCore
from gruserve.runtime.engine import Engine
from gruserve.runtime.errors import (
    EngineDeadError,
    QueueFullError,
    RequestAbortedError,
)
from gruserve.runtime.requests import DecodingParams, FinishReason, Strategy
from gruserve.runtime.runner import StepRunner
from gruserve.runtime.sampler import SamplingParams
from gruserve.runtime.stats import StepStats

from .serving import StepGate

TIMEOUT_S = 60  # a bound so that no test loops forever, never a performance assertion
NUM_SLOTS = 16


# wiring runs on the synthetic bundle; only the comparison with PyTorch needs the trained one
@pytest.fixture(scope="module")
def runner(synthetic_bundle):
    return StepRunner(synthetic_bundle, num_slots=NUM_SLOTS)


@pytest.fixture(scope="module")
def info(synthetic_bundle):
    return ModelInfo.from_bundle(synthetic_bundle)


@pytest.fixture(scope="module")
def trained(tiny_bundle):
    """(runner, info) of the trained tiny model."""
    return StepRunner(tiny_bundle, num_slots=NUM_SLOTS), ModelInfo.from_bundle(tiny_bundle)


def make_engine(runner, info, config) -> Engine:
    return Engine(EngineCore(runner, info, config))


def run(coro):
    async def bounded():
        return await asyncio.wait_for(coro, TIMEOUT_S)

    return asyncio.run(bounded())


@contextlib.asynccontextmanager
async def started(runner, info, **config):
    config.setdefault("max_tokens", 48)
    engine = make_engine(runner, info, SchedulerConfig(num_slots=runner.num_slots, **config))
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()


async def wait_steps(engine: Engine, n: int) -> None:
    target = engine.stats.num_steps + n
    while engine.stats.num_steps < target:
        await asyncio.sleep(0.0005)


def pair(info, i):
    users, items = sorted(info.users), sorted(info.items)
    return users[i % len(users)], items[(7 * i + 3) % len(items)]


def submit(engine, info, request_id, i, params, **kwargs):
    if "hidden_state" not in kwargs:
        kwargs["user_id"], kwargs["item_id"] = pair(info, i)
    return engine.submit(engine.make_request(request_id, params, **kwargs))


def mixed_requests(info):
    """(request_id, pair index, params, extra kwargs): every strategy and stop condition."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(30):
        kind = i % 6
        if kind == 0:
            params = DecodingParams()
        elif kind == 1:
            params = DecodingParams(
                strategy=Strategy.SAMPLE,
                sampling=SamplingParams(temperature=1.2, top_k=8, top_p=0.9, seed=100 + i),
            )
        elif kind == 2:
            params = DecodingParams(strategy=Strategy.BEAM, num_beams=3, length_penalty=0.8)
        elif kind == 3:
            params = DecodingParams(
                strategy=Strategy.SAMPLE, sampling=SamplingParams(seed=i), min_tokens=5,
                max_tokens=20, return_logprobs=True,
            )
        elif kind == 4:
            params = DecodingParams(min_tokens=3, stop_token_ids=(4, 5, 6), max_tokens=30)
        else:
            params = DecodingParams(strategy=Strategy.BEAM, num_beams=2, max_tokens=10)
        extra = {}
        if i % 10 == 9:
            extra["hidden_state"] = rng.uniform(-0.9, 0.9, size=info.hidden_size)
        out.append((f"r{i}", i, params, extra))
    return out


async def one_at_a_time(engine, info, requests):
    results = {}
    for request_id, i, params, extra in requests:
        handle = submit(engine, info, request_id, i, params, **extra)
        results[request_id] = await handle.result()
    return results


@pytest.mark.parametrize("split", [0, 1], ids=["one-graph-per-step", "greedy-rows-apart"])
def test_each_request_is_the_same_alone_and_in_a_busy_staggered_batch(runner, info, split):
    """With split=1 every busy step that mixes greedy rows with rows needing candidates runs
    the greedy rows on the ArgMax graph and the others on the TopK graph."""
    requests = mixed_requests(info)

    async def main():
        async with started(runner, info, split_min_greedy_rows=split) as engine:
            solo = await one_at_a_time(engine, info, requests)
            handles = []
            for n, (request_id, i, params, extra) in enumerate(requests):
                handles.append(submit(engine, info, request_id, i, params, **extra))
                if n % 4 == 3:  # arrivals in waves while earlier requests run
                    await wait_steps(engine, 2)
            busy = {h.request_id: await h.result() for h in handles}
            return solo, busy, engine.stats

    solo, busy, stats = run(main())
    assert stats.num_rows > stats.num_steps  # batches of more than one row did happen
    for request_id, out in solo.items():
        assert busy[request_id].token_ids == out.token_ids, request_id
        assert busy[request_id].finish_reason is out.finish_reason, request_id
        if out.logprobs is not None:
            assert busy[request_id].logprobs == pytest.approx(out.logprobs, abs=1e-4)


def test_greedy_engine_output_equals_pytorch_greedy_decode(trained, tiny_checkpoint):
    import torch

    from gruserve.export.model import greedy_decode

    runner, info = trained
    checkpoint, _ = tiny_checkpoint
    model = checkpoint.build_model()
    max_tokens = checkpoint.model_config.max_len
    indices = range(24)

    async def main():
        async with started(runner, info) as engine:
            handles = [
                submit(engine, info, f"g{i}", i, DecodingParams(max_tokens=max_tokens))
                for i in indices
            ]
            return [await h.result() for h in handles]

    outputs = run(main())
    for i, out in zip(indices, outputs, strict=True):
        user_id, item_id = pair(info, i)
        users = torch.tensor([info.users[user_id]])
        items = torch.tensor([info.items[item_id]])
        expected, rating = greedy_decode(
            model, users, items, info.bos_id, info.eos_id, max_tokens
        )
        assert out.token_ids == expected[0], (user_id, item_id)
        assert out.predicted_rating == pytest.approx(float(rating[0]), abs=1e-4)
        want = FinishReason.LENGTH if len(expected[0]) == max_tokens else FinishReason.EOS
        assert out.finish_reason is want


def test_beam_search_with_one_beam_is_greedy(runner, info):
    async def main():
        async with started(runner, info) as engine:
            greedy = [submit(engine, info, f"g{i}", i, DecodingParams()) for i in range(20)]
            beam = [
                submit(engine, info, f"b{i}", i, DecodingParams(strategy=Strategy.BEAM,
                                                                num_beams=1))
                for i in range(20)
            ]
            return [await h.result() for h in greedy], [await h.result() for h in beam]

    greedy, beam = run(main())
    for g, b in zip(greedy, beam, strict=True):
        assert b.token_ids == g.token_ids
        assert b.finish_reason is g.finish_reason


def test_seeded_sampling_repeats_and_seeds_differ(runner, info):
    def params(seed):
        return DecodingParams(
            strategy=Strategy.SAMPLE, min_tokens=12, max_tokens=12,
            sampling=SamplingParams(temperature=1.5, seed=seed),
        )

    async def main():
        async with started(runner, info) as engine:
            a = submit(engine, info, "a", 1, params(7))
            b = submit(engine, info, "b", 1, params(7))
            c = submit(engine, info, "c", 1, params(8))
            return [(await h.result()).token_ids for h in (a, b, c)]

    a, b, c = run(main())
    assert a == b
    assert a != c


def test_abort_mid_generation_frees_the_slot_and_leaves_the_others_alone(runner, info):
    long = DecodingParams(min_tokens=30, max_tokens=30)
    others = [("a", 1, long), ("b", 2, long), ("c", 3, DecodingParams(min_tokens=25,
                                                                      max_tokens=25))]

    async def main():
        async with started(runner, info) as engine:
            solo = await one_at_a_time(
                engine, info, [(rid, i, p, {}) for rid, i, p in others + [("d", 4, long)]]
            )
            victim_solo = await one_at_a_time(engine, info, [("victim", 5, long, {})])
        # 4 slots in use at most: the victim and three others fill them, "d" has to wait
        # the gate lets steps run one counted batch at a time, so no request can finish
        # behind the test's back however slow the machine is
        async with started(runner, info, max_batch_size=4) as engine:
            with StepGate(engine) as gate:
                victim = submit(engine, info, "victim", 5, long)
                handles = [submit(engine, info, rid, i, p) for rid, i, p in others]
                gate.allow(1)
                gate.wait_blocked(2)
                waiting = submit(engine, info, "d", 4, long)
                gate.allow(3)
                gate.wait_blocked(5)
                assert engine.core.scheduler.running_slots(victim.key) is not None
                assert engine.core.scheduler.running_slots(waiting.key) is None
                victim.abort()
                # the held step finishes; the next one applies the abort and admits "d"
                gate.allow(2)
                gate.wait_blocked(7)
                aborted = await victim.result()
                assert engine.core.scheduler.running_slots(waiting.key) is not None
                others_running = [not h.done for h in handles]
            results = {h.request_id: await h.result() for h in [*handles, waiting]}
            return solo, victim_solo, aborted, others_running, results

    solo, victim_solo, aborted, others_running, results = run(main())
    assert aborted.finish_reason is FinishReason.ABORTED
    assert 0 < len(aborted.token_ids) < 30
    assert aborted.token_ids == victim_solo["victim"].token_ids[: len(aborted.token_ids)]
    # at most 4 slots in use: "d" got in only because the abort freed the victim's slot
    assert all(others_running)
    for request_id, out in solo.items():
        assert results[request_id].token_ids == out.token_ids, request_id


def test_abort_before_admission_and_after_finish(runner, info):
    async def main():
        async with started(runner, info) as engine:
            h = submit(engine, info, "x", 1, DecodingParams())
            h.abort()  # still in the inbox: aborted before it ever runs
            aborted = await h.result()
            done = await submit(engine, info, "y", 1, DecodingParams()).result()
            engine.abort("y")  # finished: ignored
            again = await submit(engine, info, "y", 1, DecodingParams()).result()
            return aborted, done, again

    aborted, done, again = run(main())
    assert aborted.finish_reason is FinishReason.ABORTED and aborted.token_ids == []
    assert again.token_ids == done.token_ids and again.finish_reason is not FinishReason.ABORTED


def test_streaming_deltas_add_up_to_the_unary_result(runner, info):
    params = DecodingParams(min_tokens=10, max_tokens=20, return_logprobs=True)

    async def main():
        async with started(runner, info) as engine:
            unary = await submit(engine, info, "u", 6, params).result()
            handle = submit(engine, info, "s", 6, params, stream=True)
            deltas = [delta async for delta in handle]
            return unary, deltas

    unary, deltas = run(main())
    assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    assert [t for d in deltas for t in d.new_token_ids] == unary.token_ids
    assert [x for d in deltas for x in d.new_logprobs] == pytest.approx(unary.logprobs)
    assert deltas[0].predicted_rating == pytest.approx(unary.predicted_rating)


def test_stream_chunks_hold_tokens_but_never_the_first_or_the_last(runner, info):
    """A hold of 1000 s: were the first or the final chunk held, the test would hit its
    bound (TIMEOUT_S) instead of finishing."""
    params = DecodingParams(min_tokens=12, max_tokens=12, return_logprobs=True)

    async def main():
        async with started(runner, info) as engine:
            unary = await submit(engine, info, "u", 6, params).result()
            with StepGate(engine) as gate:
                handle = submit(engine, info, "s", 6, params, stream=True)
                chunks = handle.chunks(hold_s=1000.0, enough_tokens=4)
                gate.allow(1)
                first = await chunks.__anext__()  # one step ran: out at once
                gate.open()
                rest = [chunk async for chunk in chunks]
            return unary, first, rest

    unary, first, rest = run(main())
    assert len(first.new_token_ids) == 1 and not first.finished
    assert rest[-1].finished
    assert all(len(c.new_token_ids) >= 4 for c in rest[:-1])
    chunks = [first, *rest]
    assert [t for c in chunks for t in c.new_token_ids] == unary.token_ids
    assert [x for c in chunks for x in c.new_logprobs] == pytest.approx(unary.logprobs)


def test_coalesced_streams_lose_and_reorder_nothing(runner, info):
    requests = [r for r in mixed_requests(info) if r[2].strategy is not Strategy.BEAM][:12]

    async def main():
        async with started(runner, info) as engine:
            solo = await one_at_a_time(engine, info, requests)
            rounds = []
            for hold_s, enough in ((0.002, 3), (0.0005, 1), (0.05, 100)):
                handles = [submit(engine, info, rid, i, p, stream=True, **extra)
                           for rid, i, p, extra in requests]

                async def collect(handle, hold_s=hold_s, enough=enough):
                    return [c async for c in handle.chunks(hold_s=hold_s, enough_tokens=enough)]

                rounds.append(await asyncio.gather(*(collect(h) for h in handles)))
            return solo, rounds

    solo, rounds = run(main())
    for streams in rounds:
        for (rid, *_), chunks in zip(requests, streams, strict=True):
            assert chunks[-1].finished and not any(c.finished for c in chunks[:-1])
            assert [t for c in chunks for t in c.new_token_ids] == solo[rid].token_ids, rid


def test_min_tokens_on_the_greedy_graph_gives_the_tokens_of_the_topk_path(runner, info):
    """Greedy requests with min_tokens step on the ArgMax graph and read candidates only
    where its token would end them early; with return_logprobs the same requests take the
    TopK graph every step. Both must decode the same tokens."""
    assert runner.head_top_k > 0  # the synthetic bundle has a head graph
    requests = [(f"m{i}", i, DecodingParams(min_tokens=4 + i % 5, max_tokens=14,
                                            stop_token_ids=(4, 5) if i % 3 else ()))
                for i in range(10)]
    reads = []
    real = runner.candidates

    def counting(slots):
        reads.append(len(slots))
        return real(slots)

    async def main():
        runner.candidates = counting
        try:
            async with started(runner, info) as engine:
                cheap = {h.request_id: await h.result() for h in
                         [submit(engine, info, rid, i, p) for rid, i, p in requests]}
                topk = {h.request_id: await h.result() for h in [
                    submit(engine, info, rid, i, dataclasses.replace(p, return_logprobs=True))
                    for rid, i, p in requests]}
            return cheap, topk
        finally:
            del runner.candidates

    cheap, topk = run(main())
    assert reads  # some greedy token would have ended a request early and was replaced
    for rid, out in topk.items():
        assert cheap[rid].token_ids == out.token_ids, rid
        assert len(out.token_ids) >= dict((r, p) for r, _, p in requests)[rid].min_tokens


def test_queue_full_raises(runner, info):
    gate, entered = threading.Event(), threading.Event()

    class GatedRunner:
        """The real runner, but step() waits for the test to open the gate."""

        def __getattr__(self, name):
            return getattr(runner, name)

        def step(self, *args, **kwargs):
            entered.set()
            assert gate.wait(TIMEOUT_S)
            return runner.step(*args, **kwargs)

    async def main():
        config = SchedulerConfig(num_slots=NUM_SLOTS, max_queued=3)
        engine = make_engine(GatedRunner(), info, config)
        engine.start()
        try:
            handles = [submit(engine, info, "first", 0, DecodingParams())]
            while not entered.is_set():  # "first" is running: the decode thread is in step
                await asyncio.sleep(0.0005)
            handles += [submit(engine, info, f"q{i}", i, DecodingParams()) for i in range(3)]
            with pytest.raises(QueueFullError):
                submit(engine, info, "one-too-many", 9, DecodingParams())
            gate.set()
            results = [await h.result() for h in handles]
            # room again once the queue drained
            results.append(await submit(engine, info, "later", 9, DecodingParams()).result())
            return results
        finally:
            gate.set()
            engine.stop()

    results = run(main())
    assert all(r.finished for r in results) and len(results) == 5


def test_a_failing_runner_kills_the_engine_visibly(runner, info):
    calls = {"n": 0}

    class FailingRunner:
        def __getattr__(self, name):
            return getattr(runner, name)

        def step(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] > 3:
                raise RuntimeError("device lost")
            return runner.step(*args, **kwargs)

    async def main():
        engine = make_engine(FailingRunner(), info, SchedulerConfig(num_slots=NUM_SLOTS))
        engine.start()
        try:
            assert engine.healthy
            params = DecodingParams(min_tokens=20, max_tokens=20)
            handles = [submit(engine, info, f"r{i}", i, params) for i in range(3)]
            stream = submit(engine, info, "s", 4, params, stream=True)
            errors = []
            for h in handles:
                with pytest.raises(EngineDeadError) as info_:
                    await h.result()
                errors.append(info_.value)
            with pytest.raises(EngineDeadError):
                async for _ in stream:
                    pass
            assert not engine.healthy
            assert isinstance(engine.error, RuntimeError)
            with pytest.raises(EngineDeadError):
                submit(engine, info, "after", 0, DecodingParams())
            return errors
        finally:
            engine.stop()

    errors = run(main())
    assert all("device lost" in str(e) for e in errors)


def test_stop_fails_unfinished_requests(runner, info):
    async def main():
        engine = make_engine(runner, info, SchedulerConfig(num_slots=NUM_SLOTS, max_tokens=48))
        engine.start()
        # the gate holds the first step, so the request cannot finish before stop() lands
        with StepGate(engine) as gate:
            handle = submit(engine, info, "r", 0, DecodingParams(min_tokens=48, max_tokens=48))
            gate.wait_blocked(1)
            engine.stop(timeout=0)  # asks the loop to stop without waiting for it
        with pytest.raises(RequestAbortedError):
            await handle.result()
        assert not engine.healthy
        engine.stop()

    run(main())


def test_stats_and_observers(runner, info):
    seen: list[StepStats] = []

    async def main():
        async with started(runner, info) as engine:
            engine.observers.append(seen.append)
            engine.observers.append(lambda s: 1 / 0)  # a broken observer must not matter
            handles = [submit(engine, info, f"r{i}", i, DecodingParams()) for i in range(10)]
            outputs = [await h.result() for h in handles]
            await wait_steps(engine, 0)
            return outputs, engine.stats, engine.healthy

    outputs, stats, healthy = run(main())
    assert healthy
    assert stats.num_requests_finished == 10 and stats.num_admitted == 10
    assert stats.num_tokens == sum(len(o.token_ids) for o in outputs)
    assert stats.num_steps == len([s for s in seen if s.batch_size])
    assert stats.num_rows == sum(s.batch_size for s in seen)
    assert sum(s.num_tokens for s in seen) == stats.num_tokens
    assert sum(s.num_admitted for s in seen) == 10
    assert stats.num_ttft == 10 and stats.mean_ttft_seconds > 0
    assert stats.mean_batch_size > 1
    assert all(o.queue_s is not None and o.first_token_s >= o.queue_s for o in outputs)


def test_two_clients_may_use_the_same_request_id_at_once(runner, info):
    """The engine keys requests itself: a reused client id neither collides nor mixes results."""
    params = DecodingParams(min_tokens=10, max_tokens=10)

    async def main():
        async with started(runner, info) as engine:
            first = submit(engine, info, "same", 1, params)
            second = submit(engine, info, "same", 2, params)
            assert first.key != second.key
            return await first.result(), await second.result(), await one_at_a_time(
                engine, info, [("solo1", 1, params, {}), ("solo2", 2, params, {})]
            )

    first, second, solo = run(main())
    assert first.request_id == second.request_id == "same"
    assert first.token_ids == solo["solo1"].token_ids
    assert second.token_ids == solo["solo2"].token_ids
