"""The decode loops of bench/serve.py's peers (bench/decode_loop.py, bench/raw_loop.py) on the
synthetic bundle: they must give every request the tokens gruserve gives it, or the benchmark
compares unequal work. The Triton wrapper itself needs PyTriton (the bench environment) and
is checked by bench/serve.py's parity line instead."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from gruserve.runtime.client import GruserveClient
from gruserve.runtime.providers import SessionConfig
from gruserve.runtime.runner import StepRunner

from .serving import running_server

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import workloads  # noqa: E402
from decode_loop import RowParams, decode_static  # noqa: E402
from raw_loop import ContinuousLoop  # noqa: E402
from workloads import WORKLOADS, RequestSequence  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def small_top_k():
    """The test bundle exports 16 candidates; the benchmark's top_k 40 needs the reference 64."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(workloads.SAMPLING, "top_k", 8)
        yield


@pytest.fixture(scope="module")
def runner(synthetic_bundle):
    return StepRunner(synthetic_bundle, num_slots=32, config=SessionConfig(intra_op_threads=1))


@pytest.fixture(scope="module")
def requests(synthetic_bundle):
    sequence = RequestSequence(
        WORKLOADS["uniform-mixed"], synthetic_bundle.users, synthetic_bundle.items, seed=5
    )
    return [sequence.spec(i) for i in range(12)]


@pytest.fixture(scope="module")
def gruserve_tokens(synthetic_bundle_dir, requests):
    with running_server(synthetic_bundle_dir) as server, GruserveClient(server.target) as client:
        return [list(client.generate(user=s.user, item=s.item, **s.decoding()).token_ids)
                for s in requests]


def _params(bundle, specs) -> RowParams:
    users = {u: i for i, u in enumerate(bundle.users)}
    items = {v: i for i, v in enumerate(bundle.items)}
    return RowParams(
        users=np.array([users[s.user] for s in specs]),
        items=np.array([items[s.item] for s in specs]),
        lengths=np.array([s.max_tokens for s in specs]),
        temperature=np.array([s.temperature for s in specs], np.float32),
        top_k=np.array([s.decoding().get("top_k", 0) for s in specs], np.int32),
        top_p=np.array([s.decoding().get("top_p", 1.0) for s in specs], np.float32),
        seeds=np.array([s.seed for s in specs]),
    )


@pytest.mark.parametrize("compact", [False, True])
def test_static_batch_gives_each_request_gruserves_tokens(
    synthetic_bundle, runner, requests, gruserve_tokens, compact
):
    assert any(s.sample for s in requests) and not all(s.sample for s in requests)
    assert len({s.max_tokens for s in requests}) > 3
    ids = synthetic_bundle.special_ids
    result = decode_static(runner, ids["bos"], ids["eos"], _params(synthetic_bundle, requests),
                           compact)
    got = [row[:n].tolist() for row, n in zip(result.tokens, result.num_tokens, strict=True)]
    assert got == gruserve_tokens
    assert all((row[n:] == -1).all() for row, n in zip(result.tokens, result.num_tokens,
                                                       strict=True))


def _loop(bundle, runner, concurrency: int) -> ContinuousLoop:
    ids = bundle.special_ids
    sequence = RequestSequence(WORKLOADS["uniform-mixed"], bundle.users, bundle.items, seed=5)
    return ContinuousLoop(runner, ids["bos"], ids["eos"], sequence,
                          {u: i for i, u in enumerate(bundle.users)},
                          {v: i for i, v in enumerate(bundle.items)}, concurrency)


def test_the_plain_loop_steps_every_row_to_the_longest_and_compacting_only_live_ones(
    synthetic_bundle, runner, requests
):
    ids = synthetic_bundle.special_ids
    params = _params(synthetic_bundle, requests)
    plain = decode_static(runner, ids["bos"], ids["eos"], params, compact=False)
    compact = decode_static(runner, ids["bos"], ids["eos"], params, compact=True)
    # a row takes one step per token, plus the one that produced its <eos> if it stopped early
    row_steps = plain.num_tokens + (plain.num_tokens < params.lengths)
    assert plain.num_steps == compact.num_steps == row_steps.max()
    assert plain.num_rows_stepped == len(requests) * plain.num_steps
    assert compact.num_rows_stepped == row_steps.sum() < plain.num_rows_stepped


def test_the_raw_loop_refills_rows_with_the_sequence_and_decodes_like_gruserve(
    synthetic_bundle, runner, gruserve_tokens
):
    loop = _loop(synthetic_bundle, runner, concurrency=3)
    loop.run(measure_start_s=0.0, end_s=float("inf"), max_requests=12)
    assert sorted(r.index for r in loop.records) == list(range(12))
    by_index = {r.index: r for r in loop.records}
    assert all(by_index[i].code == "OK" for i in range(12))
    assert [by_index[i].num_tokens for i in range(12)] == [len(t) for t in gruserve_tokens]
    # every request's first token is stamped at a step, and it ends after it
    assert all(r.sent_s <= r.chunk_s[0] <= r.done_s for r in loop.records)


def test_the_raw_loop_admits_nothing_after_its_window(synthetic_bundle, runner):
    loop = _loop(synthetic_bundle, runner, concurrency=4)
    loop.run(measure_start_s=0.0, end_s=0.0)  # over before the first step: drain only
    assert [r.index for r in loop.records] == [0, 1, 2, 3]
    assert all(r.code == "OK" for r in loop.records)


def test_the_raw_loop_staggers_its_rows_first_requests(synthetic_bundle, runner):
    loop = _loop(synthetic_bundle, runner, concurrency=4)
    loop.run(measure_start_s=0.0, end_s=0.0, stagger_s=0.2)
    starts = [r.sent_s for r in loop.records]
    assert len(starts) == 4 and all(r.code == "OK" for r in loop.records)
    # row k starts 0.05 * k after row 0 (not before; a busy machine may start it later)
    assert all(b - starts[0] >= 0.05 * k - 1e-3 for k, b in enumerate(starts))
