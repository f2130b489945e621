"""Tokenisers for language modelling: bytes, characters, and words (Transformer-XL style).

A :class:`Tokenizer` is a frozen value (kind + vocabulary) that encodes text to ``int32`` ids and
decodes them back. Character and word vocabularies are built from the training split only
(:meth:`Tokenizer.fit`) and saved as JSON next to a run's checkpoints, so ``fwjax eval`` and
``fwjax generate`` decode with exactly the vocabulary the model was trained with.

* BYTE: UTF-8 bytes, vocabulary 256 (needs no fitting).
* CHAR: the characters of the training split, sorted by code point, then :data:`UNK_CHAR`
  (U+FFFD) for characters the training split lacks.
* WORD: whitespace-separated words; every line ends with :data:`EOS` (empty lines too, as in
  Transformer-XL's WikiText-103 pipeline); words absent from the training split map to
  :data:`UNK`. The vocabulary is sorted by training frequency (ties by the word), ``<eos>``
  and ``<unk>`` included.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import json
from pathlib import Path

import numpy as np

EOS = "<eos>"
UNK = "<unk>"
UNK_CHAR = "\ufffd"
BYTE_VOCAB_SIZE = 256


class TokenizerKind(enum.Enum):
    """How text becomes tokens."""

    BYTE = "byte"
    CHAR = "char"
    WORD = "word"


def _lines(text: str) -> list[str]:
    """The lines of ``text`` split on ``\\n`` only (a final newline ends the last line)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """A tokeniser: its kind and vocabulary (empty for BYTE).

    Attributes:
      kind: :class:`TokenizerKind`.
      vocab: the symbols in id order (characters for CHAR, words for WORD; ``()`` for BYTE).
    """

    kind: TokenizerKind
    vocab: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "kind", TokenizerKind(self.kind))
        object.__setattr__(self, "vocab", tuple(self.vocab))
        if self.kind is TokenizerKind.BYTE and self.vocab:
            raise ValueError(f"a byte tokenizer has no vocabulary; got {len(self.vocab)} symbols")
        if self.kind is not TokenizerKind.BYTE:
            if len(set(self.vocab)) != len(self.vocab):
                raise ValueError(f"vocabulary of kind={self.kind.value!r} has duplicate symbols")
            need = UNK_CHAR if self.kind is TokenizerKind.CHAR else UNK
            if need not in self.vocab:
                raise ValueError(f"vocabulary of kind={self.kind.value!r} lacks {need!r}")
            if self.kind is TokenizerKind.WORD and EOS not in self.vocab:
                raise ValueError(f"word vocabulary lacks {EOS!r}")
            if self.kind is TokenizerKind.CHAR and any(len(c) != 1 for c in self.vocab):
                bad = [c for c in self.vocab if len(c) != 1][:3]
                raise ValueError(f"char vocabulary entries must be single characters; got {bad}")

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def fit(cls, kind: TokenizerKind | str, train_text: str) -> Tokenizer:
        """The tokeniser of ``kind`` with its vocabulary built from ``train_text``."""
        kind = TokenizerKind(kind)
        if kind is TokenizerKind.BYTE:
            return cls(kind)
        if kind is TokenizerKind.CHAR:
            chars = sorted(set(train_text) - {UNK_CHAR})
            return cls(kind, (*chars, UNK_CHAR))
        counts = collections.Counter()
        for line in _lines(train_text):
            counts.update(line.split())
        counts[EOS] += len(_lines(train_text))
        counts.setdefault(UNK, 0)
        words = sorted(counts, key=lambda w: (-counts[w], w))
        return cls(kind, tuple(words))

    @property
    def vocab_size(self) -> int:
        return BYTE_VOCAB_SIZE if self.kind is TokenizerKind.BYTE else len(self.vocab)

    @property
    def unit(self) -> str:
        """What one token is, for reporting (``byte``, ``char`` or ``word``)."""
        return self.kind.value

    # -- encode / decode ----------------------------------------------------------------------

    def encode(self, text: str) -> np.ndarray:
        """``text`` as token ids ``[N] int32`` (unknown symbols → the unknown id)."""
        if self.kind is TokenizerKind.BYTE:
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)
        if self.kind is TokenizerKind.CHAR:
            points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
            table = np.array([ord(c) for c in self.vocab], dtype=np.uint32)
            order = np.argsort(table)
            sorted_table = table[order]
            pos = np.clip(np.searchsorted(sorted_table, points), 0, len(table) - 1)
            found = sorted_table[pos] == points
            ids = np.where(found, order[pos], self._index[UNK_CHAR])
            return ids.astype(np.int32)
        index, unk, eos = self._index, self._index[UNK], self._index[EOS]
        ids: list[int] = []
        for line in _lines(text):
            ids.extend(index.get(w, unk) for w in line.split())
            ids.append(eos)
        return np.asarray(ids, dtype=np.int32)

    def token_id(self, symbol: str) -> int:
        """The id of one token given as text: a one-byte string (BYTE), a character of the
        vocabulary (CHAR) or a word of it (WORD, e.g. ``"<eos>"``).

        Raises:
          ValueError: ``symbol`` is not exactly one token of this tokeniser.
        """
        if self.kind is TokenizerKind.BYTE:
            raw = symbol.encode("utf-8")
            if len(raw) != 1:
                raise ValueError(f"{symbol=} is {len(raw)} bytes; a byte token is one byte")
            return raw[0]
        if symbol not in self._index:
            raise ValueError(f"{symbol=} is not in the {self.kind.value} vocabulary")
        return self._index[symbol]

    def decode(self, ids) -> str:
        """Token ids back to text (bytes: invalid UTF-8 → U+FFFD; words: ``<eos>`` → newline)."""
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(
                f"token ids must be in [0, {self.vocab_size}); got [{ids.min()}, {ids.max()}]"
            )
        if self.kind is TokenizerKind.BYTE:
            return bytes(ids.astype(np.uint8).tolist()).decode("utf-8", errors="replace")
        if self.kind is TokenizerKind.CHAR:
            return "".join(self.vocab[i] for i in ids)
        out, line = [], []
        for i in ids:
            word = self.vocab[i]
            if word == EOS:
                out.append(" ".join(line) + "\n")
                line = []
            else:
                line.append(word)
        return "".join(out) + " ".join(line)

    @property
    def _index(self) -> dict[str, int]:
        cached = self.__dict__.get("_index_cache")
        if cached is None:
            cached = {s: i for i, s in enumerate(self.vocab)}
            object.__setattr__(self, "_index_cache", cached)
        return cached

    # -- persistence --------------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind.value, "vocab": list(self.vocab)}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        data = json.loads(text)
        return cls(TokenizerKind(data["kind"]), tuple(data["vocab"]))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist")
        return cls.from_json(path.read_text(encoding="utf-8"))
