import numpy as np
import pytest

from gruserve.export.vocab import SPECIAL_TOKENS, EntityIndex, Vocabulary


def test_special_tokens_have_fixed_ids():
    vocab = Vocabulary(SPECIAL_TOKENS + ("room",))
    assert (vocab.bos_id, vocab.eos_id, vocab.pad_id, vocab.unk_id) == (0, 1, 2, 3)
    assert SPECIAL_TOKENS == ("<bos>", "<eos>", "<pad>", "<unk>")


@pytest.mark.parametrize(
    "words",
    [
        ("room",),
        ("<eos>", "<bos>", "<pad>", "<unk>"),
        ("<bos>", "<eos>", "<pad>"),
        SPECIAL_TOKENS + ("room", "room"),
        SPECIAL_TOKENS + ("<bos>",),
    ],
)
def test_invalid_word_lists_are_rejected(words):
    with pytest.raises(ValueError):
        Vocabulary(words)


def test_build_orders_by_frequency_then_word_and_caps_size():
    texts = [
        ["the", "room", "was", "clean"],
        ["the", "staff", "was", "nice"],
        ["the", "bed"],
        ["<eos>", "<eos>", "<eos>", "<eos>", "<unk>"],  # specials never count
    ]
    vocab = Vocabulary.build(texts, max_size=3)
    # counts: the 3, was 2, then bed/clean/nice/room/staff 1 each -> "bed" wins the tie.
    assert vocab.words == SPECIAL_TOKENS + ("the", "was", "bed")
    assert len(vocab) == 7


def test_build_is_independent_of_row_order():
    texts = [["b", "a"], ["c"], ["a", "b", "c", "d"]]
    assert Vocabulary.build(texts, 10) == Vocabulary.build(list(reversed(texts)), 10)
    assert Vocabulary.build(texts, 10).words[4:] == ("a", "b", "c", "d")


def test_build_zero_size_keeps_only_specials():
    assert Vocabulary.build([["a"]], max_size=0).words == SPECIAL_TOKENS
    with pytest.raises(ValueError):
        Vocabulary.build([["a"]], max_size=-1)


def test_encode_maps_unknown_words_to_unk():
    vocab = Vocabulary(SPECIAL_TOKENS + ("room", "clean"))
    assert vocab.encode(["room", "is", "clean"]) == [4, 3, 5]
    assert vocab.encode([]) == []


def test_decode_round_trips_and_rejects_out_of_range():
    vocab = Vocabulary(SPECIAL_TOKENS + ("room", "clean"))
    assert vocab.decode([0, 4, 5, 1]) == ["<bos>", "room", "clean", "<eos>"]
    assert vocab.decode(np.array([4, 5], dtype=np.int64)) == ["room", "clean"]
    assert vocab.word(5) == "clean"
    for bad in (6, -1):
        with pytest.raises(ValueError, match=str(bad)):
            vocab.decode([4, bad])
        with pytest.raises(ValueError):
            vocab.word(bad)


def test_vocabulary_membership():
    vocab = Vocabulary(SPECIAL_TOKENS + ("room",))
    assert "room" in vocab and "pool" not in vocab


def test_entity_index_dense_ids_in_given_order():
    index = EntityIndex(["u9", "u3", "u5"])
    assert [index.index(u) for u in ("u9", "u3", "u5")] == [0, 1, 2]
    assert index.ids == ("u9", "u3", "u5")
    assert len(index) == 3
    assert "u3" in index and "u4" not in index
    assert index.get("u4") is None and index.get("u5") == 2


def test_entity_index_unknown_id_names_it():
    with pytest.raises(KeyError, match="u404"):
        EntityIndex(["u1"]).index("u404")


def test_entity_index_rejects_duplicates_and_non_strings():
    with pytest.raises(ValueError, match="u1"):
        EntityIndex(["u1", "u2", "u1"])
    with pytest.raises(TypeError):
        EntityIndex([1, 2])  # type: ignore[list-item]


def test_entity_index_build_dedups_by_first_appearance():
    index = EntityIndex.build(["b", "a", "b", "c", "a"])
    assert index.ids == ("b", "a", "c")
    assert EntityIndex.build([]).ids == ()
