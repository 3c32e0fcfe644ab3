"""Each expected value is worked out by hand in the comment next to it."""

import itertools
import math
import random

import pytest

from gruserve.export.metrics import (
    bleu_score,
    feature_coverage_ratio,
    feature_diversity,
    feature_matching_ratio,
    mae,
    perplexity,
    rmse,
    rouge_scores,
    unique_sentence_ratio,
)


def s(text):
    return text.split()


def test_rmse_and_mae():
    # errors -1, 0, -2: MSE = (1 + 0 + 4) / 3 = 5/3, MAE = 3/3 = 1.
    assert rmse([1, 2, 3], [2, 2, 5]) == pytest.approx(math.sqrt(5 / 3))
    assert mae([1, 2, 3], [2, 2, 5]) == pytest.approx(1.0)


def test_rating_errors_clip_predictions_to_range():
    # 0 -> 1 and 6.5 -> 5 match the truth exactly; unclipped errors are 1 and 1.5.
    assert rmse([0, 6.5], [1, 5], min_rating=1, max_rating=5) == 0.0
    assert mae([0, 6.5], [1, 5]) == pytest.approx(1.25)


def test_rating_errors_reject_bad_input():
    with pytest.raises(ValueError):
        rmse([1, 2], [1])
    with pytest.raises(ValueError):
        mae([], [])


def test_perplexity():
    # mean NLL = 4 ln 2 / 4 = ln 2 -> exp(ln 2) = 2.
    assert perplexity(4 * math.log(2), 4) == pytest.approx(2.0)
    assert perplexity(0.0, 3) == 1.0
    with pytest.raises(ValueError):
        perplexity(1.0, 0)


def test_bleu_1_single_pair():
    # 3 of 4 unigrams match, equal lengths (bp = 1): 100 * 3/4.
    assert bleu_score([s("the room was clean")], [s("the room was dirty")], n=1) == 75.0


def test_bleu_4_corpus_level():
    # pair 1 identical: 1g 4/4, 2g 3/3, 3g 2/2, 4g 1/1.
    # pair 2 "a b c f" vs "a b c e": 1g 3/4, 2g 2/3, 3g 1/2, 4g 0/1.
    # corpus: p = 7/8, 5/6, 3/4, 1/2; lengths 8 vs 8 -> bp 1.
    # BLEU = 100 * (7/8 * 5/6 * 3/4 * 1/2) ** (1/4) = 100 * (105/384) ** 0.25 ~= 72.31
    refs = [s("a b c d"), s("a b c e")]
    hyps = [s("a b c d"), s("a b c f")]
    assert bleu_score(refs, hyps, n=4) == pytest.approx(100 * (105 / 384) ** 0.25)
    assert bleu_score(refs, hyps, n=4) == pytest.approx(72.31, abs=0.01)


def test_bleu_clips_repeated_ngrams():
    # "the" occurs once in the reference, so only 1 of 3 counts; hyp longer -> bp 1.
    assert bleu_score([s("the cat")], [s("the the the")], n=1) == pytest.approx(100 / 3)


def test_bleu_brevity_penalty():
    # p1 = 2/2, ref_len 4, hyp_len 2: bp = exp(1 - 4/2) = e^-1 ~= 36.79.
    assert bleu_score([s("a b c d")], [s("a b")], n=1) == pytest.approx(100 * math.exp(-1))


def test_bleu_smoothing():
    # "a b" vs "a b c", n = 4: matches/possible = 2/2, 1/1, 0/0, 0/0.
    # unsmoothed p3 = 0 -> BLEU 0; add-one: 3/3, 2/2, 1/1, 1/1 -> geo mean 1;
    # bp = exp(1 - 3/2) = e^-0.5 ~= 60.65.
    assert bleu_score([s("a b c")], [s("a b")], n=4) == 0.0
    assert bleu_score([s("a b c")], [s("a b")], n=4, smooth=True) == pytest.approx(
        100 * math.exp(-0.5)
    )


def test_bleu_edge_cases():
    assert bleu_score([s("a b")], [[]], n=1) == 0.0
    assert bleu_score([s("a b")], [[]], n=1, smooth=True) == 0.0
    with pytest.raises(ValueError):
        bleu_score([s("a")], [s("a"), s("b")], n=1)
    with pytest.raises(ValueError):
        bleu_score([], [], n=1)
    with pytest.raises(ValueError):
        bleu_score([s("a")], [s("a")], n=0)


def test_rouge_single_pair():
    # ref "the room was clean", hyp "the room was very clean"
    # R1: sets of 4 and 5 unigrams, 4 shared: P = 4/5, R = 1, F = 2*0.8/1.8 = 8/9.
    # R2: {the room, room was, was clean} vs {the room, room was, was very, very clean}:
    #     2 shared: P = 2/4, R = 2/3, F = 2*(1/3)/(7/6) = 4/7.
    # RL: LCS "the room was clean" = 4: R = 1, P = 0.8, beta = P/R = 0.8,
    #     F = (1 + 0.64) * 1 * 0.8 / (1 + 0.64 * 0.8) = 1.312 / 1.512 (not 8/9: PETER's beta).
    scores = rouge_scores([s("the room was clean")], [s("the room was very clean")])
    expected = {
        "rouge_1/f": 8 / 9, "rouge_1/p": 0.8, "rouge_1/r": 1.0,
        "rouge_2/f": 4 / 7, "rouge_2/p": 0.5, "rouge_2/r": 2 / 3,
        "rouge_l/f": 1.312 / 1.512, "rouge_l/p": 0.8, "rouge_l/r": 1.0,
    }  # fmt: skip
    assert scores.keys() == expected.keys()
    for key, value in expected.items():
        assert scores[key] == pytest.approx(100 * value, rel=1e-6), key


def test_rouge_averages_over_sentences():
    # pair 1 as above (R1 F = 8/9), pair 2 identical (F = 1): mean = (8/9 + 1) / 2 = 17/18.
    # pair 3 shares nothing: mean with three pairs = (8/9 + 1 + 0) / 3 = 17/27.
    refs = [s("the room was clean"), s("nice pool")]
    hyps = [s("the room was very clean"), s("nice pool")]
    assert rouge_scores(refs, hyps)["rouge_1/f"] == pytest.approx(100 * 17 / 18, rel=1e-6)
    scores = rouge_scores(refs + [s("a b")], hyps + [s("c d")])
    assert scores["rouge_1/f"] == pytest.approx(100 * 17 / 27, rel=1e-6)


def test_rouge_counts_distinct_ngrams_like_peter():
    # sets: {good, room} on both sides -> P = R = 1 (multiset counting would give 2/3).
    # LCS of "good good room" / "good room room" = 2 ("good room"): P = R = 2/3, F = 2/3.
    scores = rouge_scores([s("good good room")], [s("good room room")])
    assert scores["rouge_1/p"] == pytest.approx(100.0)
    assert scores["rouge_l/f"] == pytest.approx(100 * 2 / 3, rel=1e-6)


def test_rouge_empty_hypothesis_scores_zero():
    scores = rouge_scores([s("a b")], [[]])
    assert all(value == 0.0 for value in scores.values())


def test_unique_sentence_ratio():
    # 2 distinct of 3: ("a", "b") twice and ("c",).
    assert unique_sentence_ratio([s("a b"), s("a b"), s("c")]) == pytest.approx(2 / 3)
    # same words, different order are different sentences.
    assert unique_sentence_ratio([s("a b"), s("b a")]) == 1.0
    with pytest.raises(ValueError):
        unique_sentence_ratio([])


def test_feature_matching_ratio():
    # sentence 1 names "room" (yes), 2 names "staff" not "room" (no), 3 names "view" (yes): 2/3.
    hyps = [s("nice room"), s("bad staff"), s("great view")]
    assert feature_matching_ratio(hyps, ["room", "room", "view"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        feature_matching_ratio(hyps, ["room"])


def test_feature_coverage_ratio():
    # room, staff and view appear; pool never does: 3 of 4. "nice" is not a feature.
    hyps = [s("nice room"), s("bad staff and room"), s("great view")]
    features = ["room", "staff", "view", "pool", "room"]
    assert feature_coverage_ratio(hyps, features) == pytest.approx(3 / 4)


def test_feature_diversity_hand_computed():
    # feature sets: A {room, staff}, B {room}, C {view}, D {}, E {room, staff}.
    # shared per pair: AB 1, AE 2, BE 1, all other 7 pairs 0 -> 4 / C(5, 2) = 4/10.
    hyps = [s("room and staff"), s("nice room"), s("view"), s("nothing here"), s("room room staff")]
    assert feature_diversity(hyps, ["room", "staff", "view", "pool"]) == pytest.approx(0.4)
    # first four only: AB 1 over 6 pairs.
    assert feature_diversity(hyps[:4], ["room", "staff", "view"]) == pytest.approx(1 / 6)
    with pytest.raises(ValueError):
        feature_diversity(hyps[:1], ["room"])


def _peter_feature_diversity(hypotheses, features):
    """PETER's O(n^2) pair loop, kept here as the reference for the counting version."""
    sets = [set(h) & set(features) for h in hypotheses]
    pairs = list(itertools.combinations(sets, 2))
    return sum(len(a & b) for a, b in pairs) / len(pairs)


def test_feature_diversity_matches_pairwise_definition():
    rng = random.Random(0)
    words = ["room", "staff", "view", "pool", "the", "was", "nice"]
    hyps = [[rng.choice(words) for _ in range(rng.randint(0, 6))] for _ in range(60)]
    features = ["room", "staff", "view", "pool"]
    assert feature_diversity(hyps, features) == pytest.approx(
        _peter_feature_diversity(hyps, features)
    )
