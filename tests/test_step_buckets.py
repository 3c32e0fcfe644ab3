"""Bucketed steps (the CUDA-graph path): padding to fixed shapes changes no result and never
touches a real slot. Runs on any provider; capture itself needs CUDA (tests/test_runner.py)."""

from __future__ import annotations

import numpy as np
import pytest

from gruserve.runtime.providers import SessionConfig
from gruserve.runtime.runner import StepRunner
from gruserve.runtime.step_buckets import bucket_sizes

NUM_SLOTS = 16


def test_bucket_sizes_double_up_to_the_slot_count():
    assert bucket_sizes(1) == (1,)
    assert bucket_sizes(5) == (1, 2, 4, 5)
    assert bucket_sizes(256) == (1, 2, 4, 8, 16, 32, 64, 128, 256)


@pytest.fixture
def runners(synthetic_bundle):
    plain = StepRunner(synthetic_bundle, num_slots=NUM_SLOTS, config=SessionConfig(device="cpu"))
    bucketed = StepRunner(
        synthetic_bundle, num_slots=NUM_SLOTS, config=SessionConfig(device="cpu", cuda_graphs=True)
    )
    everyone = np.arange(NUM_SLOTS)
    for runner in (plain, bucketed):
        runner.encode(everyone, everyone % 9, everyone % 7)
    return plain, bucketed


@pytest.mark.parametrize("rows", [1, 3, 5, 9, NUM_SLOTS])
@pytest.mark.parametrize("want_topk", [False, True])
def test_padded_steps_give_the_unpadded_results(runners, rows, want_topk):
    plain, bucketed = runners
    slots = np.arange(NUM_SLOTS)[::-1][:rows].copy()  # includes the last real slot
    tokens = np.arange(rows) % 11 + 4
    for _ in range(3):
        a = plain.step(slots, slots, tokens, want_topk=want_topk)
        b = bucketed.step(slots, slots, tokens, want_topk=want_topk)
        assert b.next_tokens.shape == (rows,)
        np.testing.assert_array_equal(a.next_tokens, b.next_tokens)
        if want_topk:
            np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=1e-5)
            np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        tokens = a.next_tokens
    everyone = np.arange(NUM_SLOTS)
    np.testing.assert_allclose(
        plain.read_states(everyone), bucketed.read_states(everyone), atol=1e-5
    )


def test_padding_rows_write_only_the_scratch_slot(runners):
    _, bucketed = runners
    everyone = np.arange(NUM_SLOTS)
    before = bucketed.read_states(everyone).copy()
    stepped = np.array([2, 7, 11])  # 3 rows: one padding row in the bucket of 4
    out = bucketed.step(stepped, stepped, np.array([5, 6, 7]))
    assert out.next_tokens.shape == (3,)
    after = bucketed.read_states(everyone)
    untouched = np.setdiff1d(everyone, stepped)
    np.testing.assert_array_equal(after[:, untouched], before[:, untouched])
    assert not np.allclose(after[:, stepped], before[:, stepped])
