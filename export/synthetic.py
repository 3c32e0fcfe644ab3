"""A synthetic review corpus with known ground truth, in the NLG4RS on-disk format.

Why synthetic: the real corpora are large downloads with licences, and they cannot tell you
whether a model learned the *right* thing. Here every review is generated from a small hidden
world, so tests and demos can check that a trained model predicts ratings that track item
quality and writes tips about the aspect the user cares about.

The hidden world:

- each user has a preferred aspect (room, staff, ...), a rating bias in [-0.5, 0.5] and a
  favourite phrasing (template);
- each item has a quality level 0..3 (bad, ok, good, great) on every aspect, correlated
  across aspects through a per-item base quality;
- a review of item i by user u rates `round(1 + 4/3 * q + bias_u + N(0, RATING_NOISE))`,
  clipped to 1..5, where q is i's quality on u's aspect; its tip names u's aspect with an
  adjective drawn from q's adjective set, in u's favourite template most of the time.

Noise (each with probability `spec.noise`, independently): the tip talks about a different
aspect than the preferred one (the record's `feature` then names that aspect), and a filler
word is put in front of the tip. The rating always follows the preferred aspect.

Learning it takes both embeddings: the aspect comes from the user, the adjective from the
(item, aspect) pair, the phrasing from the user; the adjective synonyms and template choice
keep it from being a lookup table. Everything is drawn from `numpy.random.default_rng(seed)`
in a fixed order, so one seed gives byte-identical files.

A lexicon (off in the default spec, on in `REFERENCE_SPEC`) makes the vocabulary as large as
a real corpus's (NRT keeps 20,000 words) and the tips as long and as varied: pseudo-words
(three consonant-vowel syllables, never an English word of the templates) name each item
(`num_item_words`, mentioned "near the <word>") and are each user's pet words
(`num_user_words`, put in front); a Zipf-distributed filler lexicon (`num_filler_words`)
supplies a tail of `mean_filler_words` words on average; a few tips shrink to the adjective
alone, "<adjective> <aspect>" or "<aspect> was <adjective>". Tips run from 1 to 20+ words.
The ground truth is unchanged: `feature` is the aspect the tip talks about. These draws come
after all of the default spec's, so a spec without a lexicon gives the same corpus as before.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .corpus import INDEX_DIR, REVIEWS_FILE, SPLITS, Corpus, records_to_reviews

ASPECTS: tuple[str, ...] = (
    "room", "staff", "location", "breakfast", "price", "pool",
    "bed", "view", "service", "wifi", "bathroom", "restaurant",
)  # fmt: skip
QUALITY_NAMES: tuple[str, ...] = ("bad", "ok", "good", "great")
ADJECTIVES: tuple[tuple[str, ...], ...] = (
    ("terrible", "awful", "poor"),
    ("average", "okay", "decent"),
    ("good", "nice", "pleasant"),
    ("excellent", "amazing", "perfect"),
)
# Parallel lists: a user's favourite phrasing is an index into both, so the style survives
# a change of sentiment.
POSITIVE_TEMPLATES: tuple[str, ...] = (
    "the {aspect} was {adj}",
    "{adj} {aspect} and friendly people",
    "we loved the {adj} {aspect}",
    "really {adj} {aspect} , would stay again",
)
NEGATIVE_TEMPLATES: tuple[str, ...] = (
    "the {aspect} was {adj}",
    "{adj} {aspect} , not worth the money",
    "we did not like the {adj} {aspect}",
    "the {aspect} was {adj} , sadly",
)
FILLERS: tuple[str, ...] = ("honestly", "overall", "well", "also")
FAVOURITE_TEMPLATE_PROB = 0.7  # else a template drawn uniformly
RATING_NOISE = 0.35  # std of the Gaussian added before rounding
MAX_USER_BIAS = 0.5
# the lexicon (see the module docstring)
ITEM_WORD_PROB = 0.6  # a tip mentions one of its item's words
USER_WORD_PROB = 0.4  # a tip starts with one of its user's pet words
ZIPF_EXPONENT = 1.0  # filler word of rank r is drawn with probability ~ 1 / r
SYLLABLES: tuple[str, ...] = tuple(c + v for c in "bdfgklmnprstvz" for v in "aeiou")
PICKLE_PROTOCOL = 4  # fixed so the bytes do not depend on the Python version's default


@dataclass(frozen=True)
class SyntheticSpec:
    """Size and randomness of a synthetic corpus. The defaults train in about a CPU minute."""

    seed: int = 0
    num_users: int = 200
    num_items: int = 100
    num_reviews: int = 12000
    num_aspects: int = 8
    noise: float = 0.05
    train_fraction: float = 0.8
    validation_fraction: float = 0.1
    # the lexicon (0 = none: the small default corpus)
    num_item_words: int = 0  # pseudo-words per item
    num_user_words: int = 0  # pet words per user
    num_filler_words: int = 0  # Zipf-distributed filler lexicon
    mean_filler_words: float = 0.0  # filler words appended per tip, on average
    short_tip_prob: float = 0.0  # a tip of 1-3 words: "<adjective>", "<adjective> <aspect>", ...

    def __post_init__(self) -> None:
        if self.num_users < 1 or self.num_items < 1:
            raise ValueError("num_users and num_items must be >= 1")
        if not 2 <= self.num_aspects <= len(ASPECTS):
            raise ValueError(f"num_aspects must be in [2, {len(ASPECTS)}], got {self.num_aspects}")
        if not 3 <= self.num_reviews <= self.num_users * self.num_items:
            raise ValueError(
                f"num_reviews must be in [3, num_users * num_items = "
                f"{self.num_users * self.num_items}] (one review per pair), got {self.num_reviews}"
            )
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"noise must be in [0, 1], got {self.noise}")
        if not (
            0 < self.train_fraction < 1
            and 0 < self.validation_fraction < 1
            and self.train_fraction + self.validation_fraction < 1
        ):
            raise ValueError("train_fraction and validation_fraction must be > 0 and sum below 1")
        for name in ("num_item_words", "num_user_words", "num_filler_words"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.mean_filler_words < 0 or (self.mean_filler_words and not self.num_filler_words):
            raise ValueError("mean_filler_words must be >= 0, and > 0 only with num_filler_words")
        if not 0.0 <= self.short_tip_prob <= 1.0:
            raise ValueError(f"short_tip_prob must be in [0, 1], got {self.short_tip_prob}")
        num_words = (
            self.num_items * self.num_item_words + self.num_users * self.num_user_words
            + self.num_filler_words
        )
        if num_words > len(SYLLABLES) ** 3 // 2:
            raise ValueError(f"the lexicon asks for {num_words} pseudo-words; at most "
                             f"{len(SYLLABLES) ** 3 // 2}")

    @property
    def has_lexicon(self) -> bool:
        return bool(
            self.num_item_words or self.num_user_words or self.num_filler_words
            or self.short_tip_prob
        )


# The reference-size corpus (bench/train_reference.py trains the reference model on it): a
# vocabulary of more than 20,000 word types in the training split, tips of 1 to 20+ words.
REFERENCE_SPEC = SyntheticSpec(
    seed=0,
    num_users=2000,
    num_items=1500,
    num_reviews=30000,
    num_aspects=12,
    noise=0.05,
    train_fraction=0.8,
    validation_fraction=0.1,
    num_item_words=4,
    num_user_words=2,
    num_filler_words=30000,
    mean_filler_words=3.0,
    short_tip_prob=0.05,
)


@dataclass(frozen=True)
class GroundTruth:
    """The hidden world a synthetic corpus was drawn from, keyed by external ids."""

    aspects: tuple[str, ...]
    user_aspect: dict[str, str]
    user_bias: dict[str, float]
    item_quality: dict[str, tuple[int, ...]]  # quality level per aspect, in `aspects` order

    def quality(self, item: str, aspect: str) -> int:
        return self.item_quality[item][self.aspects.index(aspect)]


def synthetic_ground_truth(spec: SyntheticSpec = SyntheticSpec()) -> GroundTruth:
    return _generate(spec)[0]


def make_synthetic_corpus(spec: SyntheticSpec = SyntheticSpec()) -> Corpus:
    """The corpus in memory, equal to what `write_synthetic_corpus` + `load_corpus` give."""
    _, records, splits = _generate(spec)
    reviews = records_to_reviews(records, source=f"synthetic corpus (seed {spec.seed})")
    return Corpus(reviews=reviews, **splits)


def write_synthetic_corpus(
    out_dir: str | os.PathLike[str], spec: SyntheticSpec = SyntheticSpec()
) -> tuple[Path, Path]:
    """Write `reviews.pickle` and `index/{train,validation,test}.index` under `out_dir`.

    Files are replaced atomically, so rerunning (or a crash midway) never leaves a mix of two
    corpora. Returns (reviews_path, index_dir) ready for `load_corpus`.
    """
    out = Path(out_dir)
    index_dir = out / INDEX_DIR
    index_dir.mkdir(parents=True, exist_ok=True)
    _, records, splits = _generate(spec)
    reviews_path = out / REVIEWS_FILE
    _write_atomic(reviews_path, pickle.dumps(records, protocol=PICKLE_PROTOCOL))
    for name in SPLITS:
        text = " ".join(str(row) for row in splits[name])
        _write_atomic(index_dir / f"{name}.index", text.encode("utf-8"))
    return reviews_path, index_dir


def _generate(spec: SyntheticSpec) -> tuple[GroundTruth, list[dict], dict[str, tuple[int, ...]]]:
    rng = np.random.default_rng(spec.seed)
    aspects = ASPECTS[: spec.num_aspects]
    user_ids = [f"u{u:04d}" for u in range(spec.num_users)]
    item_ids = [f"i{i:04d}" for i in range(spec.num_items)]

    # The world. Draw order is part of the format: changing it changes every corpus.
    user_aspect = rng.integers(0, spec.num_aspects, spec.num_users)
    user_bias = rng.uniform(-MAX_USER_BIAS, MAX_USER_BIAS, spec.num_users)
    user_style = rng.integers(0, len(POSITIVE_TEMPLATES), spec.num_users)
    item_base = rng.uniform(0.0, 3.0, spec.num_items)
    item_quality = np.clip(
        np.rint(item_base[:, None] + rng.normal(0.0, 0.9, (spec.num_items, spec.num_aspects))),
        0,
        len(QUALITY_NAMES) - 1,
    ).astype(np.int64)  # (I, A)

    # The reviews: distinct (user, item) pairs, so no pair sits in both train and test.
    n = spec.num_reviews
    pairs = rng.choice(spec.num_users * spec.num_items, size=n, replace=False)
    users, items = np.divmod(pairs, spec.num_items)
    off_aspect = rng.random(n) < spec.noise
    aspect_shift = rng.integers(1, spec.num_aspects, n)  # never 0: a noisy tip changes aspect
    with_filler = rng.random(n) < spec.noise
    filler = rng.integers(0, len(FILLERS), n)
    favourite = rng.random(n) < FAVOURITE_TEMPLATE_PROB
    any_template = rng.integers(0, len(POSITIVE_TEMPLATES), n)
    adjective_pick = rng.integers(0, len(ADJECTIVES[0]), n)
    rating_noise = rng.normal(0.0, RATING_NOISE, n)
    order = rng.permutation(n)

    preferred = user_aspect[users]
    rating_quality = item_quality[items, preferred]
    ratings = np.clip(np.rint(1 + 4 / 3 * rating_quality + user_bias[users] + rating_noise), 1, 5)
    talked = np.where(off_aspect, (preferred + aspect_shift) % spec.num_aspects, preferred)
    talked_quality = item_quality[items, talked]
    template = np.where(favourite, user_style[users], any_template)

    lexicon = _Lexicon(spec, users, items, rng) if spec.has_lexicon else None

    records = []
    for k in range(n):
        quality = int(talked_quality[k])
        aspect = aspects[talked[k]]
        adjective = ADJECTIVES[quality][adjective_pick[k]]
        sentiment = 1 if quality >= 2 else -1
        templates = POSITIVE_TEMPLATES if sentiment > 0 else NEGATIVE_TEMPLATES
        text = templates[template[k]].format(aspect=aspect, adj=adjective)
        if with_filler[k]:
            text = f"{FILLERS[filler[k]]} {text}"
        if lexicon is not None:
            text = lexicon.tip(k, text, aspect, adjective)
        records.append(
            {
                "user": user_ids[users[k]],
                "item": item_ids[items[k]],
                "rating": float(ratings[k]),
                "template": (aspect, adjective, text, sentiment),
            }
        )

    truth = GroundTruth(
        aspects=aspects,
        user_aspect={uid: aspects[a] for uid, a in zip(user_ids, user_aspect, strict=True)},
        user_bias={uid: float(b) for uid, b in zip(user_ids, user_bias, strict=True)},
        item_quality={
            iid: tuple(int(q) for q in row) for iid, row in zip(item_ids, item_quality, strict=True)
        },
    )
    return truth, records, _split(spec, order, users, items)


class _Lexicon:
    """The pseudo-words of a spec with a lexicon, and the per-review draws that use them."""

    def __init__(self, spec: SyntheticSpec, users: np.ndarray, items: np.ndarray, rng) -> None:
        n = spec.num_reviews
        num_item = spec.num_items * spec.num_item_words
        num_user = spec.num_users * spec.num_user_words
        words = _pseudo_words(num_item + num_user + spec.num_filler_words, rng)
        self.item_words = np.array(words[:num_item], dtype=object).reshape(
            spec.num_items, spec.num_item_words)
        self.user_words = np.array(words[num_item:num_item + num_user], dtype=object).reshape(
            spec.num_users, spec.num_user_words)
        self.filler = words[num_item + num_user:]
        self.users, self.items = users, items
        self.mention_item = (rng.random(n) < ITEM_WORD_PROB) & (spec.num_item_words > 0)
        self.item_pick = rng.integers(0, max(spec.num_item_words, 1), n)
        self.mention_user = (rng.random(n) < USER_WORD_PROB) & (spec.num_user_words > 0)
        self.user_pick = rng.integers(0, max(spec.num_user_words, 1), n)
        self.short = rng.random(n) < spec.short_tip_prob
        self.short_form = rng.integers(0, 3, n)
        if spec.mean_filler_words > 0:
            # geometric on {0, 1, ...} with the given mean
            tail = rng.geometric(1.0 / (1.0 + spec.mean_filler_words), n) - 1
            ranks = np.arange(1, spec.num_filler_words + 1, dtype=np.float64)
            weights = ranks ** -ZIPF_EXPONENT
            drawn = rng.choice(
                spec.num_filler_words, size=int(tail.sum()), p=weights / weights.sum()
            )
        else:
            tail, drawn = np.zeros(n, dtype=np.int64), np.zeros(0, dtype=np.int64)
        self.tail_ends = np.cumsum(tail)
        self.tail_drawn = drawn

    def tip(self, k: int, text: str, aspect: str, adjective: str) -> str:
        if self.short[k]:
            return (adjective, f"{adjective} {aspect}", f"{aspect} was {adjective}")[
                self.short_form[k]]
        if self.mention_item[k]:
            text = f"{text} near the {self.item_words[self.items[k], self.item_pick[k]]}"
        if self.mention_user[k]:
            text = f"{self.user_words[self.users[k], self.user_pick[k]]} {text}"
        start = self.tail_ends[k - 1] if k else 0
        tail = [self.filler[w] for w in self.tail_drawn[start:self.tail_ends[k]]]
        return " ".join([text, *tail])


def _pseudo_words(count: int, rng: np.random.Generator) -> list[str]:
    """`count` distinct three-syllable pseudo-words in a seeded order. None is a word of the
    templates (those have other shapes), so aspects and adjectives keep their meaning."""
    reserved = set(" ".join((*POSITIVE_TEMPLATES, *NEGATIVE_TEMPLATES)).split())
    reserved |= set(ASPECTS) | set(FILLERS) | {a for level in ADJECTIVES for a in level}
    reserved |= {"near", "the"}
    space = len(SYLLABLES) ** 3
    picked = rng.choice(space, size=min(space, count + len(reserved)), replace=False)
    words = []
    for code in picked:
        a, rest = divmod(int(code), len(SYLLABLES) ** 2)
        b, c = divmod(rest, len(SYLLABLES))
        word = SYLLABLES[a] + SYLLABLES[b] + SYLLABLES[c]
        if word not in reserved:
            words.append(word)
        if len(words) == count:
            break
    return words


def _split(
    spec: SyntheticSpec, order: np.ndarray, users: np.ndarray, items: np.ndarray
) -> dict[str, tuple[int, ...]]:
    """Cut the shuffled rows into splits, then pull cold-start rows into train.

    A user or item never seen in training has an untrained embedding, which would make the
    held-out metrics measure initialisation noise; the NLG4RS splits avoid this too.
    """
    n = len(order)
    num_train = round(n * spec.train_fraction)
    num_validation = round(n * spec.validation_fraction)
    train = set(order[:num_train].tolist())
    held_out = {
        "validation": order[num_train : num_train + num_validation].tolist(),
        "test": order[num_train + num_validation :].tolist(),
    }
    seen_users = {int(users[r]) for r in train}
    seen_items = {int(items[r]) for r in train}
    splits: dict[str, tuple[int, ...]] = {}
    for name, rows in held_out.items():
        kept = []
        for row in rows:
            if int(users[row]) in seen_users and int(items[row]) in seen_items:
                kept.append(row)
            else:
                train.add(row)
                seen_users.add(int(users[row]))
                seen_items.add(int(items[row]))
        splits[name] = tuple(sorted(kept))
    splits["train"] = tuple(sorted(train))
    for name in SPLITS:
        if not splits[name]:
            raise ValueError(f"spec {spec} leaves the {name} split empty; add reviews")
    return splits


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a corpus is not a secret
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
