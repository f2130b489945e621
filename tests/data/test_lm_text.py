"""Tokenisers, contiguous streams and in-memory text loading (generated text only)."""

from __future__ import annotations

import numpy as np
import pytest

from fwjax.data import text
from fwjax.data.tokenizers import EOS, UNK, UNK_CHAR, Tokenizer, TokenizerKind
from fwjax.train.mesh import ProcessRows

WORDS_TRAIN = "the cat sat\nthe dog\n\nthe cat ran\n"


def test_byte_tokenizer_round_trips_utf8():
    tok = Tokenizer.fit("byte", "ignored")
    s = "héllo\nwörld"
    ids = tok.encode(s)
    assert tok.vocab_size == 256 and ids.dtype == np.int32 and len(ids) == len(s.encode())
    assert tok.decode(ids) == s


def test_char_tokenizer_vocab_from_train_and_unknowns():
    tok = Tokenizer.fit(TokenizerKind.CHAR, "abca\nb")
    assert tok.vocab == ("\n", "a", "b", "c", UNK_CHAR)
    ids = tok.encode("cab\nz")
    np.testing.assert_array_equal(ids, [3, 1, 2, 0, 4])
    assert tok.decode(ids) == "cab\n" + UNK_CHAR
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 5\); got \[0, 9\]"):
        tok.decode([0, 9])


def test_word_tokenizer_eos_per_line_unk_and_frequency_order():
    tok = Tokenizer.fit("word", WORDS_TRAIN)
    # 4 lines -> 4 <eos>; "the" 3 times; then "cat" 2; ties by the word; <unk> last (count 0).
    assert tok.vocab[:3] == (EOS, "the", "cat") and tok.vocab[-1] == UNK
    ids = tok.encode("the bird sat\n\n")
    words = [tok.vocab[i] for i in ids]
    assert words == ["the", UNK, "sat", EOS, EOS]
    assert tok.decode(ids) == "the <unk> sat\n\n"
    # A final line without a newline still ends with <eos> (as a file's last line).
    assert [tok.vocab[i] for i in tok.encode("the cat")] == ["the", "cat", EOS]


def test_tokenizer_json_round_trip_and_validation(tmp_path):
    tok = Tokenizer.fit("word", WORDS_TRAIN)
    tok.save(tmp_path / "tok.json")
    assert Tokenizer.load(tmp_path / "tok.json") == tok
    with pytest.raises(ValueError, match="lacks '<unk>'"):
        Tokenizer("word", ("a", EOS))
    with pytest.raises(ValueError, match="duplicate"):
        Tokenizer("char", ("a", "a", UNK_CHAR))
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        Tokenizer.load(tmp_path / "nope.json")


def test_contiguous_streams_continue_and_are_pure():
    tokens = np.arange(1000, dtype=np.int32)
    streams = text.ContiguousStreams(tokens, batch_size=3, segment_len=10)
    n = len(streams)
    assert n == 999 // 30
    b0, b1 = streams.batch(0), streams.batch(1)
    # Segment 1 of each stream starts where segment 0 ended; targets are inputs shifted by one.
    np.testing.assert_array_equal(b1["inputs"][:, 0], b0["inputs"][:, -1] + 1)
    np.testing.assert_array_equal(b0["targets"], b0["inputs"] + 1)
    assert b0["reset"].all() and not b1["reset"].any()
    # Wrap-around at the epoch end, and batches are pure functions of the index.
    np.testing.assert_array_equal(streams.batch(n)["inputs"], b0["inputs"])
    np.testing.assert_array_equal(streams[1]["inputs"], b1["inputs"])
    with pytest.raises(IndexError, match=f"index={n} out of range"):
        streams[n]
    with pytest.raises(ValueError, match="too few"):
        text.ContiguousStreams(tokens[:20], batch_size=3, segment_len=10)


def test_contiguous_streams_batch_with_grain():
    grain = pytest.importorskip("grain")
    streams = text.ContiguousStreams(np.arange(500, dtype=np.int32), batch_size=2, segment_len=8)
    ds = grain.MapDataset.source(streams)
    assert len(ds) == len(streams)
    np.testing.assert_array_equal(ds[3]["inputs"], streams.batch(3)["inputs"])


@pytest.mark.parametrize("kind", ["byte", "char", "word"])
def test_text_file_split_vocab_from_train_only(tmp_path, kind):
    path = tmp_path / "corpus.txt"
    corpus = text.generated_text(20_000, seed=1) + "\nzebra zebra zebra\n"
    path.write_text(corpus)
    data = text.load_lm_data("text_file", kind, text_path=str(path), validation_fraction=0.1)
    tok = data.tokenizer
    assert tok.kind is TokenizerKind(kind)
    if kind == "byte":
        assert len(data.train) + len(data.valid) == len(corpus.encode())
    else:
        cut = round(len(corpus) * 0.9)
        assert "zebra" not in tok.vocab and "z" not in tok.vocab  # only in the validation text
        np.testing.assert_array_equal(data.train, tok.encode(corpus[:cut]))
        np.testing.assert_array_equal(data.valid, tok.encode(corpus[cut:]))
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        text.load_lm_data("text_file", kind, text_path=str(tmp_path / "missing.txt"))


def test_local_text_needs_a_path():
    with pytest.raises(ValueError, match="needs text_path"):
        text.load_lm_data("local_text", "char")


def test_a_missing_text_file_says_how_to_give_one(tmp_path):
    from fwjax.data.text import load_tokens

    with pytest.raises(FileNotFoundError, match=r"nope\.txt.*--set lm\.text_path=PATH.*char-rnn"):
        load_tokens(str(tmp_path / "nope.txt"))


@pytest.mark.parametrize("sampling", ["streams", "windows"])
def test_a_process_reads_only_its_rows(sampling):
    """``batch(i, rows)`` is rows ``rows`` of ``batch(i)`` (the same global batch whatever the
    split over processes), read from those rows' tokens only."""
    tokens = np.arange(1000, dtype=np.int32)
    if sampling == "streams":
        source = text.ContiguousStreams(tokens, batch_size=4, segment_len=10)
    else:
        source = text.RandomWindows(tokens, batch_size=4, segment_len=10, seed=3)
    rows = ProcessRows(index=1, count=2)
    for i in (0, 5):
        whole, part = source.batch(i), source.batch(i, rows.of(4))
        for name in whole:
            np.testing.assert_array_equal(part[name], whole[name][2:4])
    assert rows.take({"x": np.arange(6)})["x"].tolist() == [3, 4, 5]
    with pytest.raises(ValueError, match="do not split over 2 processes"):
        rows.of(5)
    with pytest.raises(ValueError, match="index=2 must be in"):
        ProcessRows(index=2, count=2)
