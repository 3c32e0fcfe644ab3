"""BeamGroup (pure numpy): hand-built candidates, no model."""

from __future__ import annotations

import numpy as np
import pytest

from gruserve.runtime.beam import BeamGroup
from gruserve.runtime.requests import FinishReason

EOS = 1
A, B, X, Y, P, Q, R, S, STOP = 10, 11, 12, 13, 14, 15, 16, 17, 50


def group(num_beams, *, slots=None, length_penalty=1.0, min_tokens=0, max_tokens=10, stop=()):
    slots = np.arange(100, 100 + num_beams) if slots is None else np.asarray(slots)
    return BeamGroup(
        slots=slots, num_beams=num_beams, length_penalty=length_penalty, eos_id=EOS,
        stop_ids=np.array(stop, np.int64), min_tokens=min_tokens, max_tokens=max_tokens,
    )


def cands(*rows):
    """rows of [(token, logprob), ...] -> (logprobs (n, K), ids (n, K)), sorted per row."""
    lps, ids = [], []
    for row in rows:
        row = sorted(row, key=lambda c: -c[1])
        ids.append([t for t, _ in row])
        lps.append([lp for _, lp in row])
    return np.array(lps, np.float32), np.array(ids, np.int64)


def lm(prefix: tuple[int, ...], k: int = 4, vocab: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic toy model: top-k log-probs over a small vocabulary, by prefix."""
    rng = np.random.default_rng(abs(hash(prefix)) % 2**32)
    logits = rng.normal(size=vocab) * 2.0
    logits[0] = -np.inf  # never <bos>
    logp = logits - np.logaddexp.reduce(logits[1:])
    ids = np.argsort(-logp, kind="stable")[:k]
    return logp[ids].astype(np.float32), ids.astype(np.int64)


def run_beam(g: BeamGroup, prefix=(0,)):
    """Drives a group with lm(); returns the best hypothesis and each step's read slots."""
    prefixes = [prefix]
    reads = []
    for _ in range(100):
        lps, ids = zip(*(lm(p) for p in prefixes), strict=True)
        result = g.advance(np.stack(lps), np.stack(ids))
        if result is None:
            return g.best(), reads
        read_slots, tokens = result
        reads.append(read_slots)
        parents = [int(np.flatnonzero(g.slots == s)[0]) for s in read_slots]
        prefixes = [prefixes[p] + (int(t),) for p, t in zip(parents, tokens, strict=True)]
    raise AssertionError("beam search did not end")


def run_greedy(prefix=(0,), max_tokens=10):
    tokens = []
    for _ in range(max_tokens):
        _, ids = lm(prefix + tuple(tokens))
        if ids[0] == EOS:
            return tokens, FinishReason.EOS
        tokens.append(int(ids[0]))
    return tokens, FinishReason.LENGTH


@pytest.mark.parametrize("start", range(20))
def test_one_beam_is_greedy(start):
    prefix = (0, start + 2)
    best, _ = run_beam(group(1, max_tokens=10), prefix)
    tokens, reason = run_greedy(prefix, max_tokens=10)
    assert best.tokens == tokens
    assert best.finish_reason is reason


def test_beam_reorders_from_another_beam_slot_and_beats_greedy():
    g = group(2, slots=[7, 3])
    # step 0 from the single initial state: A is the greedy choice
    read, tokens = g.advance(*cands([(A, -0.4), (B, -1.1), (EOS, -3.0)]))
    assert read.tolist() == [7, 7] and tokens.tolist() == [A, B]
    # step 1: B's continuations win; both live beams now come from beam 1 (slot 3)
    read, tokens = g.advance(
        *cands([(P, -3.0), (Q, -3.1), (EOS, -4.0)], [(R, -0.1), (S, -0.2), (EOS, -5.0)])
    )
    assert read.tolist() == [3, 3]  # beam 0 writes slot 7 from slot 3: read != write
    assert tokens.tolist() == [R, S]
    assert g.tokens.tolist() == [[B, R], [B, S]]
    # step 2: both end
    assert g.advance(*cands([(EOS, -0.1), (A, -2.0)], [(EOS, -0.3), (A, -2.0)])) is None
    best = g.best()
    assert best.tokens == [B, R] and best.finish_reason is FinishReason.EOS
    assert best.score == pytest.approx((-1.1 - 0.1 - 0.1) / 3)
    assert best.logprobs == pytest.approx([-1.1, -0.1])  # <eos> is scored, not returned


def test_eos_outside_the_best_num_beams_is_dropped():
    g = group(2)
    g.advance(*cands([(A, -0.1), (B, -0.2)]))
    # ranks: [A]+eos -0.2, [A, X] -0.25, [B]+eos -0.3 (rank 2 of 2 beams: dropped), [B, Y]
    result = g.advance(*cands([(EOS, -0.1), (X, -0.15)], [(EOS, -0.1), (Y, -0.2)]))
    assert result is not None
    assert [h.tokens for h in g.finished] == [[A]]
    assert g.tokens.tolist() == [[A, X], [B, Y]]


def test_min_tokens_suppresses_eos_and_stop_ids():
    g = group(2, min_tokens=1, stop=(STOP,))
    read, tokens = g.advance(*cands([(EOS, -0.01), (STOP, -0.02), (A, -3.0), (B, -4.0)]))
    assert tokens.tolist() == [A, B] and g.finished == []
    # from now on they end hypotheses
    assert g.advance(*cands([(EOS, -0.1), (A, -5.0)], [(STOP, -0.1), (A, -5.0)])) is None
    reasons = sorted(h.finish_reason.value for h in g.finished)
    assert reasons == ["eos", "stop_token"]
    assert g.best().tokens == [A]


def test_max_tokens_ends_live_beams_with_length():
    g = group(2, max_tokens=2)
    g.advance(*cands([(A, -0.1), (B, -0.2)]))
    assert g.advance(*cands([(X, -1.0), (Y, -1.5)], [(P, -0.1), (Q, -3.0)])) is None
    best = g.best()
    assert best.tokens == [B, P] and best.finish_reason is FinishReason.LENGTH
    assert len(g.finished) == 2


@pytest.mark.parametrize(("length_penalty", "winner"), [(0.0, [A]), (2.0, [B, X, Y])])
def test_length_penalty_decides_between_short_and_long(length_penalty, winner):
    g = group(2, length_penalty=length_penalty)
    g.advance(*cands([(A, -1.0), (B, -1.2)]))
    # [A] ends (sum -1.5, 2 scored tokens); B goes on
    g.advance(*cands([(EOS, -0.5), (X, -6.0)], [(X, -0.6), (Y, -6.0)]))
    g.advance(*cands([(Y, -0.6), (A, -0.7), (EOS, -6.0)], [(Y, -5.0), (EOS, -7.0), (B, -7.5)]))
    # [B, X, Y] ends (sum -2.5, 4 scored tokens)
    assert g.advance(*cands([(EOS, -0.1), (A, -8.0)], [(EOS, -9.0), (A, -9.5)])) is None
    assert sorted(len(h.tokens) for h in g.finished) == [1, 3]
    # raw sums: -1.5 beats -2.5; divided by length**2: -1.5/4 loses to -2.5/16
    assert g.best().tokens == winner


def test_keeps_only_the_best_num_beams_hypotheses():
    g = group(2, max_tokens=2)
    g.advance(*cands([(A, -0.1), (B, -0.2)]))
    # [A] ends at rank 0; [A, X] and [B, Y] live on and end at max_tokens: 3 for 2 places
    assert g.advance(*cands([(EOS, -0.1), (X, -0.2)], [(Y, -0.2), (EOS, -5.0)])) is None
    assert sorted(h.tokens for h in g.finished) == [[A], [A, X]]
    assert g.best().tokens == [A]


def test_all_candidates_suppressed_still_gives_an_answer():
    g = group(2, min_tokens=5)
    assert g.advance(*cands([(EOS, -0.1)])) is None
    assert g.best().tokens == [] and g.best().finish_reason is FinishReason.LENGTH
