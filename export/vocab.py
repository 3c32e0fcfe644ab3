"""Word vocabulary and dense entity indexes.

The id layout is part of the bundle contract: the runtime decodes token ids it receives from
ORT with the same table the model was trained with, and it looks up `<bos>`, `<eos>`, `<pad>`
and `<unk>` by id. Fixing the four special tokens to ids 0..3 (the NRT/PETER convention) means
a vocabulary file can be checked by reading its first four entries.

Both classes are immutable after construction and validate their input, so a vocabulary or
index loaded from a bundle either works or fails loudly at load time, never mid-request.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence

SPECIAL_TOKENS: tuple[str, ...] = ("<bos>", "<eos>", "<pad>", "<unk>")
BOS, EOS, PAD, UNK = SPECIAL_TOKENS


class Vocabulary:
    """A fixed word <-> id table whose first entries are always `SPECIAL_TOKENS`."""

    def __init__(self, words: Sequence[str]) -> None:
        words = tuple(words)
        if words[: len(SPECIAL_TOKENS)] != SPECIAL_TOKENS:
            raise ValueError(
                f"vocabulary must start with {SPECIAL_TOKENS}, got {words[: len(SPECIAL_TOKENS)]}"
            )
        index: dict[str, int] = {}
        for i, word in enumerate(words):
            if not isinstance(word, str):
                raise ValueError(f"vocabulary entry {i} is not a string: {word!r}")
            if word in index:
                raise ValueError(f"duplicate word {word!r} at ids {index[word]} and {i}")
            index[word] = i
        self._words = words
        self._index = index

    @classmethod
    def build(cls, texts: Iterable[Sequence[str]], max_size: int) -> Vocabulary:
        """Keep the `max_size` most frequent words (specials not counted against the limit).

        Ties are broken by the word itself so that the same corpus always yields the same ids;
        `Counter.most_common` would break them by first appearance, which depends on row order.
        Callers that want feature words in the vocabulary (as PETER does) pass them as texts.
        """
        if max_size < 0:
            raise ValueError(f"max_size must be >= 0, got {max_size}")
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(text)
        for token in SPECIAL_TOKENS:
            counts.pop(token, None)
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        return cls(SPECIAL_TOKENS + tuple(word for word, _ in ranked[:max_size]))

    @property
    def bos_id(self) -> int:
        return self._index[BOS]

    @property
    def eos_id(self) -> int:
        return self._index[EOS]

    @property
    def pad_id(self) -> int:
        return self._index[PAD]

    @property
    def unk_id(self) -> int:
        return self._index[UNK]

    @property
    def words(self) -> tuple[str, ...]:
        return self._words

    def __len__(self) -> int:
        return len(self._words)

    def __contains__(self, word: object) -> bool:
        return word in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._words)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self._words == other._words

    def __hash__(self) -> int:
        return hash(self._words)

    def __repr__(self) -> str:
        return f"Vocabulary(size={len(self)})"

    def encode(self, words: Sequence[str]) -> list[int]:
        """Map words to ids; out-of-vocabulary words become `unk_id` (never an error)."""
        unk = self.unk_id
        return [self._index.get(word, unk) for word in words]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Map ids back to words; an id outside the table is a caller bug, so it raises."""
        return [self.word(i) for i in ids]

    def word(self, i: int) -> str:
        """The word for id `i`. Negative ids are rejected rather than indexing from the end."""
        i = operator.index(i)  # accepts numpy integers, rejects floats
        if not 0 <= i < len(self._words):
            raise ValueError(f"token id {i} out of range for a vocabulary of {len(self)}")
        return self._words[i]


class EntityIndex:
    """Dense ids 0..n-1 for external string ids (users or items).

    External ids are strings everywhere (the corpus loader converts with `str()`, gRPC sends
    strings), so a non-string is rejected: an index built from ints would silently miss every
    lookup made with the same ids as strings.
    """

    def __init__(self, ids: Sequence[str]) -> None:
        ids = tuple(ids)
        index: dict[str, int] = {}
        for i, ext_id in enumerate(ids):
            if not isinstance(ext_id, str):
                raise TypeError(f"external id at position {i} is not a string: {ext_id!r}")
            if ext_id in index:
                raise ValueError(f"duplicate id {ext_id!r} at positions {index[ext_id]} and {i}")
            index[ext_id] = i
        self._ids = ids
        self._index = index

    @classmethod
    def build(cls, ids: Iterable[str]) -> EntityIndex:
        """Index ids in order of first appearance, dropping repeats."""
        return cls(tuple(dict.fromkeys(ids)))

    @property
    def ids(self) -> tuple[str, ...]:
        return self._ids

    def index(self, ext_id: str) -> int:
        try:
            return self._index[ext_id]
        except KeyError:
            raise KeyError(f"unknown id {ext_id!r}") from None

    def get(self, ext_id: str) -> int | None:
        return self._index.get(ext_id)

    def __contains__(self, ext_id: object) -> bool:
        return ext_id in self._index

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EntityIndex) and self._ids == other._ids

    def __hash__(self) -> int:
        return hash(self._ids)

    def __repr__(self) -> str:
        return f"EntityIndex(size={len(self)})"
