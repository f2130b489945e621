"""TFDS dataset builders for language modelling that need no TensorFlow.

Both builders write ``array_record`` files (``file_format="array_record"``) with shuffling
disabled, so examples keep the order of the text, and are read back with
``builder.as_data_source(split)`` (random access, no TensorFlow) batched by ``grain``. A split's
text is the concatenation of its examples.

* :class:`Wikitext103`: WikiText-103 (word level, the tokenised ``wiki.*.tokens`` files), one
  example per line. Reads ``wiki.{train,valid,test}.tokens`` (or ``wikitext-103-v1.zip``) from
  the manual directory when they are there, else downloads the official archive.
* :class:`LocalTextCorpus`: one local UTF-8 text file (e.g. Tiny Shakespeare) split by
  characters: the first ``1 − validation_fraction`` for ``train``, the rest ``validation``,
  in examples of :data:`CHUNK_CHARS` characters. The manual directory holds the file.

Requires the ``data`` extra (``tensorflow-datasets``, ``grain``, ``importlib_resources``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
import re
import sys
from pathlib import Path
from typing import ClassVar

import grain
import numpy as np
import tensorflow_datasets as tfds

from fwjax.data.tokenizers import Tokenizer, TokenizerKind

CHUNK_CHARS = 1 << 16
_LOCAL_TEXT_VERSION = "1.0.0"
WIKITEXT103_URL = "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip"
_WT_FILES = {
    "train": "wiki.train.tokens",
    "validation": "wiki.valid.tokens",
    "test": "wiki.test.tokens",
}


class _DropCustomConfigNotice(logging.Filter):
    """Drops TFDS's "Using custom data configuration" warning: every local text file is a
    custom configuration of :class:`LocalTextCorpus` by design."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Using custom data configuration")


logging.getLogger("absl").addFilter(_DropCustomConfigNotice())


def _text_features():
    return tfds.features.FeaturesDict({"text": tfds.features.Text()})


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Wikitext103(tfds.core.GeneratorBasedBuilder):
    """WikiText-103 (Merity et al., 2016), word level: one example ``{"text"}`` per line.

    Splits ``train``, ``validation``, ``test`` in file order (each line without its newline).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "One example per line of wiki.*.tokens, in order."
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put wiki.train.tokens, wiki.valid.tokens and wiki.test.tokens (or wikitext-103-v1.zip) "
        f"in the manual directory; otherwise {WIKITEXT103_URL} is downloaded."
    )

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description="WikiText-103, tokenised word-level files, one example per line.",
            features=_text_features(),
            homepage="https://blog.salesforceairesearch.com/the-wikitext-long-term-dependency-language-modeling-dataset/",
            disable_shuffling=True,
        )

    def _source_dir(self, dl_manager) -> Path:
        manual = getattr(dl_manager, "_manual_dir", None)
        if manual is not None and Path(manual).is_dir():
            manual = Path(manual)
            if all((manual / f).is_file() for f in _WT_FILES.values()):
                return manual
            for name in ("wikitext-103-v1.zip", "wikitext-103.zip"):
                if (manual / name).is_file():
                    return Path(dl_manager.extract(manual / name)) / "wikitext-103"
        return Path(dl_manager.download_and_extract(WIKITEXT103_URL)) / "wikitext-103"

    def _split_generators(self, dl_manager):
        source = self._source_dir(dl_manager)
        return {split: self._generate_examples(source / f) for split, f in _WT_FILES.items()}

    def _generate_examples(self, path: Path):
        with open(path, encoding="utf-8", newline="\n") as f:
            for i, line in enumerate(f):
                yield i, {"text": line.rstrip("\n")}


@dataclasses.dataclass(eq=False)  # TFDS's BuilderConfig is a non-frozen dataclass
class LocalTextConfig(tfds.core.BuilderConfig):
    """A local text corpus: ``filename`` in the manual directory, split by characters.

    Attributes:
      filename: the text file's name inside the manual directory.
      validation_fraction: the last fraction of the characters is the ``validation`` split.
    """

    filename: str = "input.txt"
    validation_fraction: float = 0.1


def local_text_config(filename: str, validation_fraction: float = 0.1) -> LocalTextConfig:
    """The :class:`LocalTextConfig` of a file, named after its stem and the fraction (so each
    file and split point is prepared into its own directory)."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"{validation_fraction=} must be in (0, 1)")
    stem = re.sub(r"[^a-z0-9_]", "_", Path(filename).stem.lower()) or "text"
    name = f"{stem}_val{round(validation_fraction * 1000):03d}"
    return LocalTextConfig(
        name=name,
        version=_LOCAL_TEXT_VERSION,
        description=f"{filename}, last {validation_fraction:g} of the characters for validation",
        filename=filename,
        validation_fraction=validation_fraction,
    )


class LocalTextCorpus(tfds.core.GeneratorBasedBuilder):
    """A character-level corpus from one local text file (examples of ``CHUNK_CHARS`` chars).

    The source file's SHA-256 is stored in the dataset's metadata; :func:`load_split_texts`
    refuses a prepared dataset whose source file has changed since.
    """

    VERSION = tfds.core.Version(_LOCAL_TEXT_VERSION)
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Train/validation split by characters, in order."
    }
    BUILDER_CONFIGS: ClassVar[list] = [local_text_config("tinyshakespeare.txt", 0.1)]
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put the text file named by the config in the manual directory."

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description="A local UTF-8 text file split by characters into train/validation.",
            features=_text_features(),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        path = Path(dl_manager.manual_dir) / self.builder_config.filename
        if not path.is_file():
            raise FileNotFoundError(f"{str(path)!r} not found (the corpus file of {self.name})")
        self.info.metadata["source_sha256"] = _sha256(path)
        text = path.read_text(encoding="utf-8")
        cut = round(len(text) * (1.0 - self.builder_config.validation_fraction))
        return {
            "train": self._generate_examples(text[:cut]),
            "validation": self._generate_examples(text[cut:]),
        }

    def _generate_examples(self, text: str):
        for i, start in enumerate(range(0, len(text), CHUNK_CHARS)):
            yield i, {"text": text[start : start + CHUNK_CHARS]}


def read_split_text(builder: tfds.core.DatasetBuilder, split: str, *, join: str = "") -> str:
    """A prepared split's text: its examples in order, read with grain, joined by ``join``
    (and ``join`` after the last one when it is a newline, as in the source file)."""
    source = builder.as_data_source(split)
    batches = grain.MapDataset.source(source).batch(4096, batch_fn=list)
    parts = [ex["text"].decode("utf-8") for batch in batches for ex in batch]
    text = join.join(parts)
    return text + join if join == "\n" and parts else text


def prepare(builder: tfds.core.DatasetBuilder, download_config=None) -> tfds.core.DatasetBuilder:
    """Prepares ``builder`` (array_record files) unless it already is.

    Preparing prints one line to stderr instead of TFDS's banners and progress bars (which
    fill a log with carriage returns when stderr is not a terminal).

    Args:
      builder: the dataset builder.
      download_config: a ``tfds.download.DownloadConfig`` (e.g. with the manual directory).

    Returns:
      ``builder``, prepared.
    """
    if builder.is_prepared():
        return builder
    print(
        f"fwjax: preparing the dataset {builder.name} in {builder.data_dir} (once)", file=sys.stderr
    )
    tfds.display_progress_bar(False)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            builder.download_and_prepare(
                download_config=download_config, file_format="array_record"
            )
    finally:
        tfds.display_progress_bar(True)
    return builder


def local_text_builder(
    text_path: str | Path, validation_fraction: float, data_dir: str | Path | None
) -> LocalTextCorpus:
    """The prepared :class:`LocalTextCorpus` of ``text_path``.

    Raises:
      FileNotFoundError: ``text_path`` is missing.
      ValueError: the file is too short to give both splits a character, or the dataset in
        ``data_dir`` was prepared from a different file content.
    """
    path = Path(text_path).expanduser().absolute()
    if not path.is_file():
        raise FileNotFoundError(f"text_path={str(path)!r} does not exist (or is not a file)")
    config = local_text_config(path.name, validation_fraction)
    length = len(path.read_text(encoding="utf-8"))
    cut = round(length * (1.0 - validation_fraction))
    if cut == 0 or cut == length:  # a split without examples: TFDS refuses to write it
        raise ValueError(
            f"text_path={str(path)!r} has {length} characters: too few for a train and a "
            f"validation split with {validation_fraction=}"
        )
    builder = LocalTextCorpus(config=config, data_dir=data_dir, file_format="array_record")
    prepare(builder, tfds.download.DownloadConfig(manual_dir=str(path.parent)))
    stored = builder.info.metadata.get("source_sha256") if builder.info.metadata else None
    actual = _sha256(path)
    if stored is not None and stored != actual:
        raise ValueError(
            f"{builder.data_dir} was prepared from a file with sha256 {stored}, but {path} now "
            f"has {actual}; delete that directory or use another data_dir"
        )
    return builder


def wikitext103_builder(
    data_dir: str | Path | None, manual_dir: str | Path | None = None
) -> Wikitext103:
    """The prepared :class:`Wikitext103` (from ``manual_dir`` if it holds the files)."""
    builder = Wikitext103(data_dir=data_dir, file_format="array_record")
    dl_config = tfds.download.DownloadConfig(
        manual_dir=None if manual_dir is None else str(Path(manual_dir).expanduser())
    )
    return prepare(builder, dl_config)


def tokenized_splits(
    builder: tfds.core.DatasetBuilder,
    kind: TokenizerKind,
    splits: tuple[str, ...],
    *,
    join: str,
    cache: bool = True,
) -> tuple[Tokenizer, dict[str, np.ndarray]]:
    """The tokeniser (vocabulary from ``train``) and the token ids of ``splits``.

    With ``cache``, the vocabulary and ids are stored next to the prepared dataset
    (``<data_dir>/fwjax_tokens/``) and reused (WikiText-103's train split takes a minute to
    tokenise).

    Returns:
      ``(tokenizer, {split: int32 [N]})``.
    """
    kind = TokenizerKind(kind)
    cache_dir = Path(builder.data_dir) / "fwjax_tokens"
    vocab_path = cache_dir / f"{kind.value}_vocab.json"
    paths = {s: cache_dir / f"{kind.value}_{s}.npy" for s in splits}
    if cache and vocab_path.is_file() and all(p.is_file() for p in paths.values()):
        return Tokenizer.load(vocab_path), {s: np.load(p) for s, p in paths.items()}
    texts = {s: read_split_text(builder, s, join=join) for s in {"train", *splits}}
    tokenizer = Tokenizer.fit(kind, texts["train"])
    ids = {s: tokenizer.encode(texts[s]) for s in splits}
    if cache:
        cache_dir.mkdir(parents=True, exist_ok=True)
        for s, p in paths.items():
            np.save(p, ids[s])
        tokenizer.save(vocab_path)
    return tokenizer, ids
