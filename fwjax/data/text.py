"""Byte-level text as contiguous streams (Transformer-XL style batching).

The text is split into ``B`` contiguous streams; batch ``i`` holds segment ``i`` of every stream,
so segment ``i + 1`` of a stream continues segment ``i`` and a model may carry its fast weights
from one batch to the next. Batches are pure functions of their index (wrapping around at the
end of an epoch, where ``reset`` tells a carrying model to start from empty memories), so the
data position of a run is one integer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

BYTE_VOCAB_SIZE = 256

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


def load_tokens(text_path: str | None) -> np.ndarray:
    """The byte tokens of ``text_path``, or of :func:`generated_text` when it is None."""
    if text_path is None:
        return encode(generated_text())
    path = Path(text_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"text_path={str(path)!r} does not exist (or is not a file)")
    return encode(path.read_text(encoding="utf-8"))


def train_validation_split(tokens: np.ndarray, validation_fraction: float):
    """The first ``1 − validation_fraction`` of the tokens for training, the rest validation."""
    cut = round(len(tokens) * (1.0 - validation_fraction))
    return tokens[:cut], tokens[cut:]


class ContiguousStreams:
    """``B`` parallel streams of ``T``-token segments over one token array.

    Stream ``b`` covers tokens ``[b·L, (b+1)·L + 1)`` with ``L = num_segments · T``; batch ``i``
    is segment ``i mod num_segments`` of every stream, inputs and next-token targets.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, segment_len: int):
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

    def __len__(self) -> int:
        return self.num_segments

    def batch(self, index: int) -> dict:
        """Segment ``index mod num_segments`` of every stream.

        Returns:
          ``dict(inputs [B, T] int32, targets [B, T] int32, reset [B] bool)``; ``reset`` is True
          at the first segment of an epoch (a carried memory must start empty there).
        """
        t, n = self.segment_len, self.num_segments
        seg = index % n
        starts = np.arange(self.batch_size) * n * t + seg * t
        window = self.tokens[starts[:, None] + np.arange(t + 1)]
        reset = np.full((self.batch_size,), seg == 0)
        return dict(inputs=window[:, :-1], targets=window[:, 1:], reset=reset)
