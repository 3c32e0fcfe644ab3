"""Loader for the NLG4RS review corpora used by NRT and PETER (TripAdvisor, Amazon, Yelp).

On disk a corpus is `reviews.pickle`, a pickled list of dicts with keys `user`, `item`,
`rating` and `template = (feature, adjective, text, sentiment)`, plus an index directory
holding `train.index`, `validation.index` and `test.index`, each one line of space-separated
row numbers into that list. The built-in synthetic corpus is written in the same format, so
this one loader serves both.

Every way a file can be wrong is reported as a one-line `CorpusError` that names the file
(and the row or token), because these files come from elsewhere and a bare `KeyError` or
`IndexError` deep in training says nothing about which download is broken.

Security: `pickle.load` runs code chosen by whoever wrote the file. Only load corpora from
sources you trust, exactly as with the original PETER code.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "validation", "test")
REVIEWS_FILE = "reviews.pickle"
# the index directory beside reviews.pickle that write_synthetic_corpus writes
INDEX_DIR = "index"
# the `--data` keyword for the built-in synthetic corpus
SYNTHETIC = "synthetic"
RECORD_KEYS: tuple[str, ...] = ("user", "item", "rating", "template")


class CorpusError(ValueError):
    """A corpus file is missing or malformed; the message names the file."""


@dataclass(frozen=True)
class Review:
    """One review: who, what, how much, and the tip text with its (feature, adjective)."""

    user: str
    item: str
    rating: float
    feature: str
    adjective: str
    text: str
    sentiment: int

    @property
    def tokens(self) -> list[str]:
        return tokenize(self.text)


def tokenize(text: str) -> list[str]:
    """Split a tip into words. NLG4RS text is already tokenized, so lower + split suffices."""
    return text.lower().split()


@dataclass(frozen=True)
class Corpus:
    """All reviews plus the three splits as row numbers into `reviews`."""

    reviews: tuple[Review, ...]
    train: tuple[int, ...]
    validation: tuple[int, ...]
    test: tuple[int, ...]

    def split(self, name: str) -> list[Review]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return [self.reviews[row] for row in getattr(self, name)]

    @property
    def min_rating(self) -> float:
        return min(review.rating for review in self.reviews)

    @property
    def max_rating(self) -> float:
        return max(review.rating for review in self.reviews)


def load_corpus(reviews_path: str | os.PathLike[str], index_dir: str | os.PathLike[str]) -> Corpus:
    """Load and validate `reviews.pickle` and its split index files.

    `index_dir` is the directory that holds the three `.index` files; a path to one of those
    files is accepted too (its directory is used), since that is what a shell completes to.
    """
    reviews_path = Path(reviews_path)
    index_path = _resolve_index_dir(Path(index_dir))
    records = _read_pickle(reviews_path)
    reviews = records_to_reviews(records, source=str(reviews_path))
    splits = {
        name: read_index_file(index_path / f"{name}.index", num_reviews=len(reviews))
        for name in SPLITS
    }
    return Corpus(reviews=reviews, **splits)


def load_training_corpus(
    data: str | os.PathLike[str],
    *,
    index_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
) -> Corpus:
    """The corpus named by a `--data` argument.

    - `"synthetic"`: the built-in corpus with ground truth, `SyntheticSpec(seed=seed)`
      (the keyword always wins; write `./synthetic` for a directory of that name);
    - a directory holding `reviews.pickle` (or the path of that file), with its split files
      taken from `index_dir` if given (absolute, or relative to the data directory, so
      `index_dir="2"` picks NLG4RS split 2), else found in the data directory itself, in
      `DIR/index/` (what `write_synthetic_corpus` writes), or in the NLG4RS split folders
      `DIR/1/ ... DIR/5/` (the lowest-numbered one; pass `index_dir` to pick another).

    A layout that matches none of these raises `CorpusError` saying what was looked for.
    """
    if isinstance(data, str) and data == SYNTHETIC:
        # imported here: synthetic.py builds on this module
        from .synthetic import SyntheticSpec, make_synthetic_corpus

        if index_dir is not None:
            raise CorpusError("index_dir is meaningless with the built-in synthetic corpus")
        return make_synthetic_corpus(SyntheticSpec(seed=seed))
    path = Path(data)
    if path.is_file() and path.name == REVIEWS_FILE:
        path = path.parent
    if not path.exists():
        raise CorpusError(
            f"{path}: no such directory; --data takes {SYNTHETIC!r} or a directory "
            f"holding {REVIEWS_FILE} and its split index files"
        )
    if not path.is_dir():
        raise CorpusError(f"{path}: expected a directory holding {REVIEWS_FILE}, got a file")
    reviews = path / REVIEWS_FILE
    if not reviews.is_file():
        raise CorpusError(f"{path}: no {REVIEWS_FILE} in this directory")
    if index_dir is not None:
        chosen = Path(index_dir)
        if not chosen.exists() and not chosen.is_absolute() and (path / chosen).exists():
            chosen = path / chosen
        return load_corpus(reviews, chosen)
    return load_corpus(reviews, _find_index_dir(path))


def _has_index_files(directory: Path) -> bool:
    return all((directory / f"{name}.index").is_file() for name in SPLITS)


def _find_index_dir(data_dir: Path) -> Path:
    if _has_index_files(data_dir):
        return data_dir
    if _has_index_files(data_dir / INDEX_DIR):
        return data_dir / INDEX_DIR
    numbered = sorted(
        (p for p in data_dir.iterdir() if p.is_dir() and p.name.isdigit() and _has_index_files(p)),
        key=lambda p: int(p.name),
    )
    if numbered:
        if len(numbered) > 1:
            log.info(
                "%s: using split folder %s of %s; pass --index-dir to pick another",
                data_dir,
                numbered[0].name,
                ", ".join(p.name for p in numbered),
            )
        return numbered[0]
    files = ", ".join(f"{name}.index" for name in SPLITS)
    raise CorpusError(
        f"{data_dir}: corpus layout not recognised: {files} not found in the directory, "
        f"in {INDEX_DIR}/, or in a numbered NLG4RS split folder (1/, 2/, ...); "
        f"pass --index-dir"
    )


def records_to_reviews(records: object, source: str) -> tuple[Review, ...]:
    """Validate the unpickled object and convert each dict record into a `Review`.

    Shared with the synthetic generator so that both paths apply the same conversions.
    """
    if not isinstance(records, list):
        raise CorpusError(
            f"{source}: expected a list of review dicts, got {type(records).__name__}"
        )
    if not records:
        raise CorpusError(f"{source}: holds no reviews")
    return tuple(_record_to_review(record, row, source) for row, record in enumerate(records))


def read_index_file(path: Path, num_reviews: int) -> tuple[int, ...]:
    """Parse one split file: space-separated row numbers, each in [0, num_reviews)."""
    if not path.is_file():
        raise CorpusError(f"{path}: {path.name} not found in index directory {path.parent}")
    try:
        tokens = path.read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError) as exc:
        raise CorpusError(f"{path}: cannot read index file ({exc})") from exc
    if not tokens:
        raise CorpusError(f"{path}: empty split, no row numbers")
    rows = []
    for position, token in enumerate(tokens):
        try:
            row = int(token)
        except ValueError:
            raise CorpusError(
                f"{path}: token {position} is {token!r}, not an integer row number"
            ) from None
        if not 0 <= row < num_reviews:
            raise CorpusError(
                f"{path}: row number {row} (token {position}) out of range "
                f"for a corpus of {num_reviews} reviews"
            )
        rows.append(row)
    return tuple(rows)


def _resolve_index_dir(index_dir: Path) -> Path:
    if index_dir.is_file() and index_dir.name in {f"{name}.index" for name in SPLITS}:
        return index_dir.parent
    if not index_dir.is_dir():
        raise CorpusError(f"{index_dir}: index directory not found")
    return index_dir


def _read_pickle(path: Path) -> object:
    if not path.exists():
        raise CorpusError(f"{path}: reviews file not found")
    if not path.is_file():
        raise CorpusError(f"{path}: reviews path is not a file")
    try:
        with path.open("rb") as f:
            return pickle.load(f)
    except Exception as exc:  # pickle raises many unrelated types for a corrupt file
        raise CorpusError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from exc


def _record_to_review(record: object, row: int, source: str) -> Review:
    where = f"{source}: row {row}"
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: expected a dict, got {type(record).__name__}")
    for key in RECORD_KEYS:
        if key not in record:
            raise CorpusError(f"{where}: missing key {key!r}")
    template = record["template"]
    if not isinstance(template, (tuple, list)) or len(template) != 4:
        raise CorpusError(
            f"{where}: template must be a 4-tuple (feature, adjective, text, sentiment), "
            f"got {_describe(template)}"
        )
    feature, adjective, text, sentiment = template
    for name, value in (("feature", feature), ("adjective", adjective), ("text", text)):
        if not isinstance(value, str):
            raise CorpusError(f"{where}: template {name} must be a string, got {_describe(value)}")
    return Review(
        user=str(record["user"]),
        item=str(record["item"]),
        rating=_as_number(record["rating"], f"{where}: rating"),
        feature=feature,
        adjective=adjective,
        text=text,
        sentiment=_as_sentiment(sentiment, f"{where}: template sentiment"),
    )


def _as_sentiment(value: object, what: str) -> int:
    number = _as_number(value, what)
    if not number.is_integer():
        raise CorpusError(f"{what} is not an integer: {number}")
    return int(number)


def _as_number(value: object, what: str) -> float:
    # bool is an int subclass; a True rating is a bug upstream, not a 1-star review.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise CorpusError(f"{what} is not a number: {_describe(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise CorpusError(f"{what} is not finite: {number}")
    return number


def _describe(value: object) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    if isinstance(value, Sequence) and not isinstance(value, str):
        return f"{type(value).__name__} of length {len(value)}: {text}"
    return f"{type(value).__name__} {text}"
