from collections import Counter

import numpy as np
import pytest

from gruserve.export.corpus import load_corpus, tokenize
from gruserve.export.synthetic import (
    ADJECTIVES,
    ASPECTS,
    FILLERS,
    REFERENCE_SPEC,
    SyntheticSpec,
    make_synthetic_corpus,
    synthetic_ground_truth,
    write_synthetic_corpus,
)
from gruserve.export.vocab import Vocabulary

SMALL = SyntheticSpec(seed=3, num_users=40, num_items=30, num_reviews=900)
LEXICON = SyntheticSpec(
    seed=5, num_users=60, num_items=40, num_reviews=2000, num_item_words=3, num_user_words=2,
    num_filler_words=3000, mean_filler_words=3.0, short_tip_prob=0.1,
)


def _files(reviews_path, index_dir):
    return [reviews_path.read_bytes()] + [
        (index_dir / f"{name}.index").read_bytes() for name in ("train", "validation", "test")
    ]


def test_same_seed_gives_byte_identical_files(tmp_path):
    first = _files(*write_synthetic_corpus(tmp_path / "a", SMALL))
    second = _files(*write_synthetic_corpus(tmp_path / "b", SMALL))
    assert first == second


def test_different_seeds_give_different_corpora(tmp_path):
    other = SyntheticSpec(seed=4, num_users=40, num_items=30, num_reviews=900)
    assert _files(*write_synthetic_corpus(tmp_path / "a", SMALL)) != _files(
        *write_synthetic_corpus(tmp_path / "b", other)
    )
    assert make_synthetic_corpus(SMALL) != make_synthetic_corpus(other)


def test_writing_twice_is_idempotent(tmp_path):
    first = _files(*write_synthetic_corpus(tmp_path, SMALL))
    paths = write_synthetic_corpus(tmp_path, SMALL)
    assert _files(*paths) == first
    # no temporary files left behind
    names = sorted(p.name for p in tmp_path.rglob("*"))
    assert names == ["index", "reviews.pickle", "test.index", "train.index", "validation.index"]


def test_written_corpus_loads_and_equals_in_memory_one(tmp_path):
    reviews_path, index_dir = write_synthetic_corpus(tmp_path, SMALL)
    assert reviews_path == tmp_path / "reviews.pickle"
    assert index_dir == tmp_path / "index"
    assert load_corpus(reviews_path, index_dir) == make_synthetic_corpus(SMALL)


def test_splits_partition_rows_and_hold_out_only_seen_entities():
    corpus = make_synthetic_corpus()
    rows = corpus.train + corpus.validation + corpus.test
    assert sorted(rows) == list(range(len(corpus.reviews)))
    assert len(corpus.train) / len(rows) == pytest.approx(0.8, abs=0.01)
    train_users = {r.user for r in corpus.split("train")}
    train_items = {r.item for r in corpus.split("train")}
    for name in ("validation", "test"):
        assert all(r.user in train_users and r.item in train_items for r in corpus.split(name))


def test_each_user_has_many_reviews_and_pairs_are_distinct():
    corpus = make_synthetic_corpus()
    per_user = Counter(r.user for r in corpus.reviews)
    assert len(per_user) == 200 and min(per_user.values()) >= 30
    assert len({(r.user, r.item) for r in corpus.reviews}) == len(corpus.reviews)


def test_tips_are_short_lowercase_tokens():
    for review in make_synthetic_corpus().reviews:
        assert review.text == " ".join(tokenize(review.text))
        assert 3 <= len(review.text.split()) <= 12
        assert review.feature in review.text.split()
        assert review.adjective in review.text.split()


def test_feature_is_the_users_preferred_aspect_except_noise():
    spec = SyntheticSpec()
    truth = synthetic_ground_truth(spec)
    reviews = make_synthetic_corpus(spec).reviews
    on_aspect = np.mean([r.feature == truth.user_aspect[r.user] for r in reviews])
    # 5% noise on 12000 reviews: std of the rate is 0.2%, so 1.5 points is > 7 sigma.
    assert 1 - spec.noise - 0.015 < on_aspect < 1 - spec.noise + 0.015
    with_filler = np.mean([r.text.split()[0] in FILLERS for r in reviews])
    assert spec.noise - 0.015 < with_filler < spec.noise + 0.015


def test_without_noise_every_tip_is_on_aspect():
    spec = SyntheticSpec(seed=1, num_users=30, num_items=20, num_reviews=500, noise=0.0)
    truth = synthetic_ground_truth(spec)
    for review in make_synthetic_corpus(spec).reviews:
        assert review.feature == truth.user_aspect[review.user]
        assert review.text.split()[0] not in FILLERS


def test_adjective_and_sentiment_follow_item_quality():
    truth = synthetic_ground_truth(SMALL)
    for review in make_synthetic_corpus(SMALL).reviews:
        quality = truth.quality(review.item, review.feature)
        assert review.adjective in ADJECTIVES[quality]
        assert review.sentiment == (1 if quality >= 2 else -1)


def test_ratings_are_1_to_5_and_track_quality_on_the_users_aspect():
    spec = SyntheticSpec()
    truth = synthetic_ground_truth(spec)
    reviews = make_synthetic_corpus(spec).reviews
    ratings = np.array([r.rating for r in reviews])
    quality = np.array([truth.quality(r.item, truth.user_aspect[r.user]) for r in reviews])
    assert set(np.unique(ratings)) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert np.corrcoef(ratings, quality)[0, 1] > 0.85
    means = [ratings[quality == q].mean() for q in range(4)]
    assert means == sorted(means) and means[3] - means[0] > 3


@pytest.fixture(scope="module")
def reference_corpus():
    return make_synthetic_corpus(REFERENCE_SPEC)


def test_reference_preset_fills_the_reference_vocabulary(reference_corpus):
    train = reference_corpus.split("train")
    types = Counter(word for review in train for word in review.tokens)
    assert len(types) >= 20_000
    # what training builds: the 20,000 most frequent words + 4 specials = the reference ntoken
    assert len(Vocabulary.build((r.tokens for r in train), max_size=20_000)) == 20_004
    lengths = Counter(len(r.tokens) for r in reference_corpus.reviews)
    assert set(range(1, 16)) <= set(lengths) and max(lengths) > 15
    for review in reference_corpus.reviews[:2000]:
        assert review.feature in ASPECTS and review.adjective in review.tokens
        # a one-word tip is the adjective alone; every longer one names its aspect
        assert review.feature in review.tokens or review.tokens == [review.adjective]


def test_lexicon_words_belong_to_their_item_and_user():
    reviews = make_synthetic_corpus(LEXICON).reviews
    item_words, user_words = {}, {}
    for r in reviews:
        words = r.tokens
        if "near" in words:
            item_words.setdefault(r.item, set()).add(words[words.index("near") + 2])
        if words[0] not in {"the", "we", "really", r.adjective, r.feature, *FILLERS}:
            user_words.setdefault(r.user, set()).add(words[0])
    assert len(item_words) == LEXICON.num_items and len(user_words) == LEXICON.num_users
    assert all(len(w) <= LEXICON.num_item_words for w in item_words.values())
    assert all(len(w) <= LEXICON.num_user_words for w in user_words.values())
    every_item_word = [w for words in item_words.values() for w in words]
    assert len(every_item_word) == len(set(every_item_word))  # no word names two items
    assert not set(every_item_word) & {w for ws in user_words.values() for w in ws}


def test_lexicon_filler_follows_zipf_and_tips_vary_in_length():
    reviews = make_synthetic_corpus(LEXICON).reviews
    fixed = {w for r in reviews for w in (r.feature, r.adjective)}
    counts = Counter(w for r in reviews for w in r.tokens if w not in fixed)
    ranked = [c for _, c in counts.most_common()]
    # p(rank r) ~ 1/r: the top filler word is far more common than the 100th
    assert ranked[0] > 20 * ranked[99]
    lengths = Counter(len(r.tokens) for r in reviews)
    assert {1, 2, 3} <= set(lengths) and max(lengths) > 15
    assert sum(lengths[n] for n in (1, 2, 3)) == pytest.approx(0.1 * len(reviews), rel=0.25)


def test_lexicon_corpus_is_deterministic_and_keeps_the_ground_truth(tmp_path):
    first = _files(*write_synthetic_corpus(tmp_path / "a", LEXICON))
    assert first == _files(*write_synthetic_corpus(tmp_path / "b", LEXICON))
    truth = synthetic_ground_truth(LEXICON)
    for review in make_synthetic_corpus(LEXICON).reviews:
        assert review.adjective in ADJECTIVES[truth.quality(review.item, review.feature)]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_item_words": -1},
        {"mean_filler_words": 2.0},  # no filler lexicon to draw from
        {"short_tip_prob": 1.5},
        {"num_filler_words": 10**6},
        {"num_aspects": 13},
        {"num_aspects": 1},
        {"num_users": 0},
        {"num_users": 2, "num_items": 2, "num_reviews": 5},
        {"noise": 1.5},
        {"train_fraction": 0.95, "validation_fraction": 0.1},
    ],
)
def test_invalid_specs_are_rejected(kwargs):
    with pytest.raises(ValueError):
        SyntheticSpec(**kwargs)
