"""Text for language modelling: contiguous streams or random windows (:class:`Sampling`).

STREAMS (Transformer-XL style batching): the text is split into ``B`` contiguous streams; batch
``i`` holds segment ``i`` of every stream, so segment ``i + 1`` of a stream continues segment
``i`` and a model may carry its fast weights from one batch to the next. RANDOM_WINDOWS
(nanoGPT style): every row of batch ``i`` is a window at a uniformly random offset. Either way,
batches are pure functions of their index (and seed), so the data position of a run is one
integer.

:func:`load_lm_data` gives a tokeniser and the train / evaluation token arrays of an
:class:`LMDataset`: a text file split in memory (byte, char or word tokens), or a TFDS dataset
prepared without TensorFlow (:mod:`fwjax.data.tfds_builders`; needs the ``data`` extra).
"""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path

import numpy as np

from fwjax.data.tokenizers import BYTE_VOCAB_SIZE, Tokenizer, TokenizerKind

__all__ = [
    "BYTE_VOCAB_SIZE",
    "ContiguousStreams",
    "LMData",
    "LMDataset",
    "RandomWindows",
    "Sampling",
    "decode",
    "encode",
    "generated_text",
    "load_lm_data",
    "load_tokens",
    "train_validation_split",
]

_WORDS = {
    "det": ["the", "a", "every", "no", "some"],
    "adj": ["red", "quiet", "old", "quick", "bright", "small", "heavy", "green"],
    "noun": ["fox", "river", "king", "stone", "bird", "city", "song", "lamp", "ship"],
    "verb": ["sees", "follows", "remembers", "carries", "finds", "hears", "builds"],
}


def generated_text(num_bytes: int = 200_000, seed: int = 0) -> str:
    """A deterministic toy corpus (needs no download): sentences of a small grammar,
    ``det adj noun verb det noun .`` with optional adjectives, in lines of a few sentences."""
    rng = np.random.default_rng(seed)
    pick = lambda kind: _WORDS[kind][rng.integers(len(_WORDS[kind]))]
    lines, size = [], 0
    while size < num_bytes:
        sentences = []
        for _ in range(rng.integers(1, 4)):
            words = [pick("det")]
            if rng.random() < 0.6:
                words.append(pick("adj"))
            words += [pick("noun"), pick("verb"), pick("det"), pick("noun")]
            sentences.append(" ".join(words) + ".")
        line = " ".join(sentences)
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines)[:num_bytes]


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes as token ids (``uint8`` → int32); vocabulary size 256."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def decode(tokens) -> str:
    """Token ids back to text (invalid UTF-8 sequences become U+FFFD)."""
    return bytes(np.asarray(tokens, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)


def _missing_text(path: Path) -> str:
    return (
        f"text_path={str(path)!r} does not exist (or is not a file); give the text with "
        f"--set lm.text_path=PATH (Tiny Shakespeare: {TINY_SHAKESPEARE_URL})"
    )


def load_tokens(text_path: str | None) -> np.ndarray:
    """The byte tokens of ``text_path``, or of :func:`generated_text` when it is None."""
    if text_path is None:
        return encode(generated_text())
    path = Path(text_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(_missing_text(path))
    return encode(path.read_text(encoding="utf-8"))


def train_validation_split(tokens: np.ndarray, validation_fraction: float):
    """The first ``1 − validation_fraction`` of the tokens for training, the rest validation."""
    cut = round(len(tokens) * (1.0 - validation_fraction))
    return tokens[:cut], tokens[cut:]


def document_fields(inputs: np.ndarray, previous: np.ndarray, separator: int) -> dict:
    """Packed documents in windows of a corpus whose documents end with ``separator``.

    Args:
      inputs: the windows' input tokens ``[R, T]``.
      previous: the token before each window ``[R]`` (``separator`` at the corpus start).
      separator: the id of the token that ends a document (e.g. ``<eos>``).

    Returns:
      ``dict(segment_ids [R, T] int32, document_start [R] bool)``: the document index of each
      step inside its window (a step after a separator starts a new document), and whether
      the window's first step starts one (a carried memory must then start empty).
    """
    ends = inputs == separator
    segment_ids = np.concatenate(
        [np.zeros_like(ends[:, :1], np.int32), np.cumsum(ends[:, :-1], axis=1, dtype=np.int32)],
        axis=1,
    )
    return dict(segment_ids=segment_ids, document_start=np.asarray(previous) == separator)


def previous_tokens(tokens: np.ndarray, starts: np.ndarray, separator: int) -> np.ndarray:
    """The token before each window start (``separator`` before the first token)."""
    return np.where(starts > 0, tokens[np.maximum(starts - 1, 0)], separator)


class ContiguousStreams:
    """``B`` parallel streams of ``T``-token segments over one token array.

    Stream ``b`` covers tokens ``[b·L, (b+1)·L + 1)`` with ``L = num_segments · T``; batch ``i``
    is segment ``i mod num_segments`` of every stream, inputs and next-token targets. With a
    document ``separator`` the batches also describe the packed documents
    (:func:`document_fields`).
    """

    def __init__(
        self, tokens: np.ndarray, batch_size: int, segment_len: int, separator: int | None = None
    ):
        tokens = np.asarray(tokens, dtype=np.int32)
        self.num_segments = (len(tokens) - 1) // (batch_size * segment_len)
        if self.num_segments < 1:
            raise ValueError(
                f"{len(tokens)=} tokens are too few for {batch_size=} streams of "
                f"{segment_len=} (need at least {batch_size * segment_len + 1})"
            )
        self.tokens = tokens
        self.batch_size = batch_size
        self.segment_len = segment_len
        self.separator = separator

    def __len__(self) -> int:
        return self.num_segments

    def __getitem__(self, index: int) -> dict:
        """:meth:`batch` (so a ``grain.MapDataset.source`` can wrap the streams)."""
        if not 0 <= index < self.num_segments:
            raise IndexError(f"{index=} out of range for {self.num_segments} segments")
        return self.batch(index)

    def batch(self, index: int, rows: slice | None = None) -> dict:
        """Segment ``index mod num_segments`` of every stream (of the streams ``rows`` only:
        nothing else is read).

        Returns:
          ``dict(inputs [R, T] int32, targets [R, T] int32, reset [R] bool)`` (``R = B`` without
          ``rows``); ``reset`` is True at the first segment of an epoch (a carried memory must
          start empty there) and, with a ``separator``, where a document starts at the
          segment's first step; then also ``segment_ids [R, T]`` (:func:`document_fields`).
        """
        t, n = self.segment_len, self.num_segments
        seg = index % n
        streams = np.arange(self.batch_size)[slice(None) if rows is None else rows]
        starts = streams * n * t + seg * t
        window = self.tokens[starts[:, None] + np.arange(t + 1)]
        reset = np.full((len(streams),), seg == 0)
        batch = dict(inputs=window[:, :-1], targets=window[:, 1:], reset=reset)
        if self.separator is None:
            return batch
        # Read the token before a segment only inside its own stream (at an epoch start the
        # memory resets anyway).
        previous = np.full(len(streams), self.separator)
        if seg > 0:
            previous = self.tokens[starts - 1]
        return _with_documents(batch, previous, self.separator)


class RandomWindows:
    """Batches of ``B`` windows of ``T + 1`` tokens at uniformly random offsets (nanoGPT's
    ``get_batch``), drawn from ``numpy.random.default_rng((seed, index))``: batch ``index`` is a
    pure function of the seed and the index, whatever came before.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        segment_len: int,
        seed: int = 0,
        separator: int | None = None,
    ):
        tokens = np.asarray(tokens, dtype=np.int32)
        if len(tokens) < segment_len + 1:
            raise ValueError(
                f"{len(tokens)=} tokens are too few for windows of {segment_len=} (need at least "
                f"{segment_len + 1})"
            )
        self.tokens = tokens
        self.batch_size = batch_size
        self.segment_len = segment_len
        self.seed = seed
        self.separator = separator

    def batch(self, index: int, rows: slice | None = None) -> dict:
        """Returns ``dict(inputs [R, T] int32, targets [R, T] int32, reset [R] bool)``, the
        windows ``rows`` of the batch (all ``B`` without ``rows``; only those are read);
        ``reset`` is all True (windows are independent: nothing may be carried across them);
        with a ``separator`` also ``segment_ids [R, T]`` (:func:`document_fields`)."""
        t = self.segment_len
        rng = np.random.default_rng((self.seed, index))
        starts = rng.integers(0, len(self.tokens) - t, size=self.batch_size)
        starts = starts if rows is None else starts[rows]
        window = self.tokens[starts[:, None] + np.arange(t + 1)]
        reset = np.ones((len(starts),), bool)
        batch = dict(inputs=window[:, :-1], targets=window[:, 1:], reset=reset)
        if self.separator is None:
            return batch
        previous = previous_tokens(self.tokens, starts, self.separator)
        return _with_documents(batch, previous, self.separator)


def _with_documents(batch: dict, previous, separator: int) -> dict:
    """``batch`` with ``segment_ids`` added and ``reset`` set where a document starts at a
    window's first step (``previous``: the token before each window)."""
    docs = document_fields(batch["inputs"], previous, separator)
    return {
        **batch,
        "segment_ids": docs["segment_ids"],
        "reset": batch["reset"] | docs["document_start"],
    }


class Sampling(enum.Enum):
    """How training batches are cut from the training tokens.

    Attributes:
      STREAMS: :class:`ContiguousStreams`: ``B`` contiguous streams, batch ``i`` holds segment
        ``i`` of each (needed to carry fast weights across segments: ``carry_state``).
      RANDOM_WINDOWS: :class:`RandomWindows`: independent windows at random offsets (nanoGPT).
    """

    STREAMS = "streams"
    RANDOM_WINDOWS = "random_windows"


class LMDataset(enum.Enum):
    """Where language-modelling text comes from.

    Attributes:
      TEXT_FILE: ``text_path`` (or :func:`generated_text` when None), read into memory and split
        by tokens: the last ``validation_fraction`` is validation. Needs no extra packages.
      LOCAL_TEXT: ``text_path`` through the TFDS :class:`~fwjax.data.tfds_builders.LocalTextCorpus`
        builder (split by characters; array_record files read with grain).
      WIKITEXT103: the TFDS :class:`~fwjax.data.tfds_builders.Wikitext103` builder (word level;
        ``manual_dir`` or a download); validation split ``validation`` (or ``test``).
    """

    TEXT_FILE = "text_file"
    LOCAL_TEXT = "local_text"
    WIKITEXT103 = "wikitext103"


@dataclasses.dataclass(frozen=True)
class LMData:
    """A tokeniser and the token arrays of a language-modelling corpus.

    Attributes:
      tokenizer: the :class:`~fwjax.data.tokenizers.Tokenizer` (vocabulary from ``train``).
      train: training tokens ``[N_train] int32``.
      valid: evaluation tokens ``[N_valid] int32`` (the validation or test split).
    """

    tokenizer: Tokenizer
    train: np.ndarray
    valid: np.ndarray


def load_lm_data(
    dataset: LMDataset | str,
    tokenizer: TokenizerKind | str,
    *,
    text_path: str | None = None,
    validation_fraction: float = 0.1,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    eval_split: str = "validation",
) -> LMData:
    """Loads, splits and tokenises a corpus.

    Args:
      dataset: :class:`LMDataset`.
      tokenizer: BYTE, CHAR or WORD (WORD: ``<eos>`` per line, ``<unk>`` for unknown words).
      text_path: the text file of TEXT_FILE / LOCAL_TEXT (TEXT_FILE: None = generated text).
      validation_fraction: TEXT_FILE / LOCAL_TEXT: the last fraction (of tokens for TEXT_FILE,
        of characters for LOCAL_TEXT) is the validation split.
      data_dir: the TFDS data directory (None: TFDS's default, ``~/tensorflow_datasets``).
      manual_dir: WIKITEXT103: a folder with ``wiki.*.tokens`` or the official zip.
      eval_split: WIKITEXT103: ``validation`` or ``test``; the others only have ``validation``.

    Raises:
      FileNotFoundError: a missing text file (naming its path).
      ValueError: a bad option value (naming it).
      ImportError: a TFDS dataset asked for without the ``data`` extra.
    """
    dataset, kind = LMDataset(dataset), TokenizerKind(tokenizer)
    if dataset is LMDataset.TEXT_FILE:
        if text_path is None:
            text = generated_text()
        else:
            path = Path(text_path).expanduser()
            if not path.is_file():
                raise FileNotFoundError(_missing_text(path))
            text = path.read_text(encoding="utf-8")
        if kind is TokenizerKind.BYTE:
            train, valid = train_validation_split(encode(text), validation_fraction)
            return LMData(Tokenizer(kind), train, valid)
        # Split by characters first so the vocabulary comes from the training text only.
        cut = round(len(text) * (1.0 - validation_fraction))
        tok = Tokenizer.fit(kind, text[:cut])
        return LMData(tok, tok.encode(text[:cut]), tok.encode(text[cut:]))
    if dataset is LMDataset.LOCAL_TEXT and text_path is None:
        raise ValueError(f"dataset={dataset.value!r} needs text_path (a local text file)")
    try:
        from fwjax.data import tfds_builders
    except ImportError as e:
        raise ImportError(
            f"dataset={dataset.value!r} needs the data extra (pip install 'fwjax[data]'): {e}"
        ) from e
    if dataset is LMDataset.LOCAL_TEXT:
        if text_path is None:
            raise ValueError("dataset='local_text' needs text_path")
        if eval_split != "validation":
            raise ValueError(f"dataset='local_text' has no split {eval_split=}")
        builder = tfds_builders.local_text_builder(text_path, validation_fraction, data_dir)
        join = ""
    else:
        if eval_split not in ("validation", "test"):
            raise ValueError(f"{eval_split=} must be 'validation' or 'test'")
        builder = tfds_builders.wikitext103_builder(data_dir, manual_dir)
        join = "\n"
    tok, ids = tfds_builders.tokenized_splits(builder, kind, ("train", eval_split), join=join)
    return LMData(tok, ids["train"], ids[eval_split])
