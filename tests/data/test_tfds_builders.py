"""TFDS builders without TensorFlow (array_record + data_source + grain), on generated text."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")
pytest.importorskip("grain")

from fwjax.data import tfds_builders
from fwjax.data.text import generated_text, load_lm_data
from fwjax.data.tokenizers import EOS, UNK


def test_local_text_corpus_splits_by_characters_in_order(tmp_path):
    # More than two chunks, non-ASCII characters in both splits.
    corpus = "Étude — ünïcode ✓\n" + generated_text(150_000, seed=3) + "\nÉtude — ünïcode ✓\n"
    path = tmp_path / "src" / "corpus.txt"
    path.parent.mkdir()
    path.write_text(corpus, encoding="utf-8")
    builder = tfds_builders.local_text_builder(path, 0.1, tmp_path / "tfds")
    cut = round(len(corpus) * 0.9)
    assert builder.info.splits["train"].num_examples == -(-cut // tfds_builders.CHUNK_CHARS)
    assert tfds_builders.read_split_text(builder, "train") == corpus[:cut]
    assert tfds_builders.read_split_text(builder, "validation") == corpus[cut:]

    data = load_lm_data("local_text", "char", text_path=str(path), data_dir=str(tmp_path / "tfds"))
    assert data.tokenizer.decode(data.valid) == corpus[cut:]
    assert len(data.train) == cut
    # Cached token ids next to the prepared dataset are reused.
    assert (builder.data_path / "fwjax_tokens" / "char_train.npy").is_file()
    again = load_lm_data("local_text", "char", text_path=str(path), data_dir=str(tmp_path / "tfds"))
    np.testing.assert_array_equal(again.valid, data.valid)

    # A changed source file is refused instead of silently reusing the stale dataset.
    path.write_text(corpus + "more", encoding="utf-8")
    with pytest.raises(ValueError, match="was prepared from a file with sha256"):
        tfds_builders.local_text_builder(path, 0.1, tmp_path / "tfds")


def _write_wikitext(folder):
    lines = {
        "train": [" = Title = ", "", " the cat sat on the mat . ", " the dog sat . "],
        "valid": [" the cat ran . ", "", " a zebra sat . "],
        "test": [" the mat . "],
    }
    for split, content in lines.items():
        (folder / f"wiki.{split}.tokens").write_text("\n".join(content) + "\n", encoding="utf-8")
    return lines


def test_wikitext103_from_manual_dir_word_level(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    lines = _write_wikitext(manual)
    data = load_lm_data(
        "wikitext103", "word", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual)
    )
    tok = data.tokenizer
    assert tok.vocab[0] == EOS and "zebra" not in tok.vocab
    words = [tok.vocab[i] for i in data.valid]
    assert words == ["the", "cat", UNK, ".", EOS, EOS, UNK, UNK, "sat", ".", EOS]
    assert len(data.train) == sum(len(line.split()) + 1 for line in lines["train"])
    test = load_lm_data(
        "wikitext103",
        "word",
        data_dir=str(tmp_path / "tfds"),
        manual_dir=str(manual),
        eval_split="test",
    )
    assert [test.tokenizer.vocab[i] for i in test.valid] == ["the", "mat", ".", EOS]
    with pytest.raises(ValueError, match="eval_split='dev'"):
        load_lm_data("wikitext103", "word", data_dir=str(tmp_path / "tfds"), eval_split="dev")


@pytest.mark.parametrize("text", ["", "x"])
def test_a_file_too_short_for_both_splits_is_named_before_tfds(tmp_path, text):
    path = tmp_path / "tiny.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=rf"tiny\.txt' has {len(text)} characters: too few"):
        tfds_builders.local_text_builder(path, 0.1, tmp_path / "tfds")
    assert not (tmp_path / "tfds").exists()


def test_the_custom_configuration_notice_is_dropped(tmp_path, caplog):
    path = tmp_path / "corpus.txt"
    path.write_text(generated_text(1000), encoding="utf-8")
    with caplog.at_level("INFO"):
        tfds_builders.local_text_builder(path, 0.1, tmp_path / "tfds")
    assert not [r for r in caplog.records if "custom data configuration" in r.getMessage()]


def test_preparing_prints_one_line_and_nothing_once_prepared(tmp_path, capfd):
    path = tmp_path / "corpus.txt"
    path.write_text(generated_text(1000), encoding="utf-8")
    capfd.readouterr()
    tfds_builders.local_text_builder(path, 0.1, tmp_path / "tfds")
    out, err = capfd.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"fwjax: preparing the dataset local_text_corpus in {tmp_path / 'tfds'}"
        "/local_text_corpus/corpus_val100/1.0.0 (once)"
    ]
    tfds_builders.local_text_builder(path, 0.1, tmp_path / "tfds")
    assert capfd.readouterr() == ("", "")
