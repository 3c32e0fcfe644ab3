import pickle
import shutil
from pathlib import Path

import pytest

from gruserve.export.corpus import (
    Corpus,
    CorpusError,
    Review,
    load_corpus,
    load_training_corpus,
    tokenize,
)
from gruserve.export.synthetic import SyntheticSpec, make_synthetic_corpus, write_synthetic_corpus


def _record(user="u1", item="i1", rating=4.0, template=None):
    template = template or ("room", "clean", "the room was clean", 1)
    return {"user": user, "item": item, "rating": rating, "template": template}


GOOD_RECORDS = [
    _record(),
    _record(user=7, item=42, rating=2, template=("staff", "rude", "Rude  STAFF", -1)),
    _record(user="u2", item="i1", rating=5.0, template=("view", "great", "great view", 1)),
]
GOOD_SPLITS = {"train": "0 1", "validation": "2", "test": "2"}


def _write(tmp_path: Path, records=None, splits=None, raw_pickle: bytes | None = None):
    """Write a corpus in the real NLG4RS layout: reviews.pickle + 1/{split}.index."""
    reviews_path = tmp_path / "reviews.pickle"
    if raw_pickle is None:
        raw_pickle = pickle.dumps(GOOD_RECORDS if records is None else records)
    reviews_path.write_bytes(raw_pickle)
    index_dir = tmp_path / "1"
    index_dir.mkdir()
    for name, text in (GOOD_SPLITS if splits is None else splits).items():
        (index_dir / f"{name}.index").write_text(text)
    return reviews_path, index_dir


def test_load_valid_corpus(tmp_path):
    corpus = load_corpus(*_write(tmp_path))
    assert corpus.reviews[1] == Review(
        user="7", item="42", rating=2.0, feature="staff", adjective="rude",
        text="Rude  STAFF", sentiment=-1,
    )  # fmt: skip
    assert isinstance(corpus.reviews[1].rating, float)
    assert (corpus.train, corpus.validation, corpus.test) == ((0, 1), (2,), (2,))
    assert [r.user for r in corpus.split("train")] == ["u1", "7"]
    assert corpus.split("test") == [corpus.reviews[2]]
    assert (corpus.min_rating, corpus.max_rating) == (2.0, 5.0)


def test_tokenize_lowercases_and_splits_on_whitespace():
    assert tokenize("Rude  STAFF\tand noise\n") == ["rude", "staff", "and", "noise"]
    assert Review("u", "i", 1.0, "f", "a", "The Room", 1).tokens == ["the", "room"]


def test_index_files_with_trailing_newline_and_str_paths(tmp_path):
    splits = {"train": "0 1\n", "validation": "2\n", "test": " 2 "}
    reviews_path, index_dir = _write(tmp_path, splits=splits)
    corpus = load_corpus(str(reviews_path), str(index_dir))
    assert corpus.train == (0, 1)


def test_index_dir_may_be_given_as_one_of_its_files(tmp_path):
    reviews_path, index_dir = _write(tmp_path)
    assert load_corpus(reviews_path, index_dir / "train.index") == load_corpus(
        reviews_path, index_dir
    )


def test_unknown_split_name():
    corpus = Corpus(reviews=(), train=(), validation=(), test=())
    with pytest.raises(ValueError, match="valid"):
        corpus.split("valid")


def test_missing_reviews_file(tmp_path):
    reviews_path, index_dir = _write(tmp_path)
    reviews_path.unlink()
    with pytest.raises(CorpusError, match=r"reviews\.pickle: reviews file not found"):
        load_corpus(reviews_path, index_dir)


def test_missing_index_dir(tmp_path):
    reviews_path, _ = _write(tmp_path)
    with pytest.raises(CorpusError, match="nowhere"):
        load_corpus(reviews_path, tmp_path / "nowhere")


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_missing_index_file_names_which(tmp_path, split):
    reviews_path, index_dir = _write(tmp_path)
    (index_dir / f"{split}.index").unlink()
    with pytest.raises(CorpusError, match=rf"{split}\.index not found"):
        load_corpus(reviews_path, index_dir)


@pytest.mark.parametrize("raw", [b"", b"not a pickle at all", pickle.dumps([1])[:-3]])
def test_unreadable_pickle(tmp_path, raw):
    reviews_path, index_dir = _write(tmp_path, raw_pickle=raw)
    with pytest.raises(CorpusError, match=r"reviews\.pickle: not a readable pickle"):
        load_corpus(reviews_path, index_dir)


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        ({"user": "u"}, r"reviews\.pickle: expected a list of review dicts, got dict"),
        ([], r"reviews\.pickle: holds no reviews"),
    ],
)
def test_pickle_not_a_list_of_reviews(tmp_path, records, expected):
    with pytest.raises(CorpusError, match=expected):
        load_corpus(*_write(tmp_path, records=records))


def _without(key):
    record = _record()
    del record[key]
    return record


@pytest.mark.parametrize(
    ("bad_record", "expected"),
    [
        ("just a string", "row 1: expected a dict, got str"),
        (_without("user"), "row 1: missing key 'user'"),
        (_without("item"), "row 1: missing key 'item'"),
        (_without("rating"), "row 1: missing key 'rating'"),
        (_without("template"), "row 1: missing key 'template'"),
        (_record(template=("room", "clean", "text")), "row 1: template must be a 4-tuple"),
        (_record(template="room clean text 1"), "row 1: template must be a 4-tuple"),
        (_record(template=("room", "clean", None, 1)), "row 1: template text must be a string"),
        (_record(template=("room", "clean", "t", "pos")), "row 1: template sentiment is not"),
        (_record(template=("room", "clean", "t", 0.5)), "row 1: template sentiment is not"),
        (_record(rating="4"), "row 1: rating is not a number"),
        (_record(rating=None), "row 1: rating is not a number"),
        (_record(rating=True), "row 1: rating is not a number"),
        (_record(rating=float("nan")), "row 1: rating is not finite"),
    ],
)
def test_malformed_record_names_row_and_problem(tmp_path, bad_record, expected):
    records = [_record(), bad_record, _record()]
    with pytest.raises(CorpusError, match=r"reviews\.pickle: ") as info:
        load_corpus(*_write(tmp_path, records=records))
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", ["3", "-1", "99"])
def test_row_number_out_of_range(tmp_path, value):
    splits = dict(GOOD_SPLITS, validation=f"2 {value}")
    with pytest.raises(CorpusError) as info:
        load_corpus(*_write(tmp_path, splits=splits))
    message = str(info.value)
    assert "validation.index" in message
    assert f"row number {value} " in message
    assert "corpus of 3 reviews" in message


@pytest.mark.parametrize("token", ["x", "1.5", "1,2"])
def test_non_integer_token(tmp_path, token):
    splits = dict(GOOD_SPLITS, test=f"0 {token}")
    with pytest.raises(CorpusError, match=rf"test\.index: token 1 is '{token}', not an integer"):
        load_corpus(*_write(tmp_path, splits=splits))


@pytest.mark.parametrize("text", ["", " \n"])
def test_empty_split(tmp_path, text):
    splits = dict(GOOD_SPLITS, train=text)
    with pytest.raises(CorpusError, match=r"train\.index: empty split"):
        load_corpus(*_write(tmp_path, splits=splits))


def test_corpus_error_is_a_value_error():
    assert issubclass(CorpusError, ValueError)


# ---------------------------------------------------------------- --data resolution

LAYOUT_SPEC = SyntheticSpec(seed=5, num_users=20, num_items=15, num_reviews=240)


def test_load_training_corpus_synthetic():
    assert load_training_corpus("synthetic", seed=3) == make_synthetic_corpus(SyntheticSpec(seed=3))


@pytest.fixture(scope="module")
def nlg4rs_dir(tmp_path_factory):
    """The NLG4RS layout: DIR/reviews.pickle and the split folders DIR/1, DIR/2."""
    root = tmp_path_factory.mktemp("nlg4rs")
    _, index = write_synthetic_corpus(root, LAYOUT_SPEC)
    shutil.copytree(index, root / "1")
    shutil.copytree(index, root / "2")
    (root / "2" / "test.index").write_text("0 1 2")
    shutil.rmtree(index)
    return root


def test_load_training_corpus_nlg4rs_layouts(nlg4rs_dir, tmp_path):
    expected = make_synthetic_corpus(LAYOUT_SPEC)
    assert load_training_corpus(nlg4rs_dir) == expected  # the lowest split folder, 1/
    assert load_training_corpus(str(nlg4rs_dir / "reviews.pickle")) == expected
    assert load_training_corpus(nlg4rs_dir, index_dir="2").test == (0, 1, 2)
    assert load_training_corpus(nlg4rs_dir, index_dir=nlg4rs_dir / "2").test == (0, 1, 2)
    # what write_synthetic_corpus writes: DIR/index/
    write_synthetic_corpus(tmp_path, LAYOUT_SPEC)
    assert load_training_corpus(tmp_path) == expected


def test_load_training_corpus_unrecognised_layouts(tmp_path):
    with pytest.raises(CorpusError, match="no such directory"):
        load_training_corpus(tmp_path / "missing")
    with pytest.raises(CorpusError, match="no reviews.pickle"):
        load_training_corpus(tmp_path)
    write_synthetic_corpus(tmp_path, LAYOUT_SPEC)
    shutil.rmtree(tmp_path / "index")
    with pytest.raises(CorpusError, match="layout not recognised"):
        load_training_corpus(tmp_path)
    with pytest.raises(CorpusError, match="index directory not found"):
        load_training_corpus(tmp_path, index_dir="7")
