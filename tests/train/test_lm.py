"""Language modelling: tokenisers in training, whole-split evaluation modes, eval/generate CLI."""

from __future__ import annotations

import json
import types

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from fwjax.cli import load_train_config, main
from fwjax.data.tokenizers import Tokenizer
from fwjax.train import Run, train
from fwjax.train.config import LMEvalMode
from fwjax.train.config_io import unstructure, with_overrides
from fwjax.train.tasks import LMTrainTask, _windows, evaluate_lm

TINY_CHAR = [
    "batch_size=8",
    "lm.tokenizer=char",
    "lm.validation_fraction=0.003",
    "lm.segment_len=16",
    "lm.eval_stride=8",
    "lm.carry_state=true",
    "lm.model.d_model=32",
    "lm.model.d_ff=64",
    "lm.model.num_heads=2",
    "lm.model.num_layers=1",
    "log_every=1",
    "eval_every=2",
    "eval_batches=1",
    "progress_bar=false",
    "checkpoint.async_save=false",
]


@pytest.mark.parametrize("mode", list(LMEvalMode))
@pytest.mark.parametrize(("n", "t", "stride", "streams"), [(100, 16, 4, 1), (37, 8, 8, 3)])
def test_every_target_is_scored_exactly_once(mode, n, t, stride, streams):
    index, mask = _windows(n, mode, t, stride, streams)
    counts = np.bincount(index[mask], minlength=n)
    np.testing.assert_array_equal(counts, np.ones(n))
    if mode is LMEvalMode.SLIDING:  # every scored token (past the first window) sees t - stride
        pos = np.broadcast_to(np.arange(t), index.shape)
        assert (pos[mask][index[mask] >= t] >= t - stride).all()


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    """An untrained char-level run, saved as a workdir (config + step-0 checkpoint)."""
    config = load_train_config("lm_tiny", TINY_CHAR)
    workdir = tmp_path_factory.mktemp("run")
    (workdir / "config.json").write_text(json.dumps(unstructure(config)))
    run = Run(config, workdir, devices=jax.devices()[:1])
    run.checkpointer.save(run.state, {"step": 0})
    run.checkpointer.close()
    return run


def _full_sequence_loss(run) -> float:
    tokens = np.asarray(run.task.valid_tokens)

    @jax.jit
    def forward(params, rest, inputs):
        return run.model_def.merge(params, rest, train=False)(inputs)[0]

    logits = forward(run.state.params, run.state.rest, tokens[None, :-1])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[None, 1:])
    return float(nll.mean())


def test_vocab_size_comes_from_the_char_tokenizer(char_run):
    tok = char_run.task.tokenizer
    assert tok.kind.value == "char" and tok.vocab_size < 40  # the generated corpus' characters
    assert char_run.task.model_config.vocab_size == tok.vocab_size
    assert char_run.state.params["head"]["kernel"][...].shape[-1] == tok.vocab_size


def test_carried_eval_equals_one_pass_over_the_whole_split(char_run):
    """Carrying the fast weights across all segments (any T) is the same as reading the whole
    validation text at once."""
    full = _full_sequence_loss(char_run)
    carried = evaluate_lm(char_run, "carried", segment_len=16, streams=1)
    carried_odd = evaluate_lm(char_run, "carried", segment_len=13, streams=1)
    n = len(char_run.task.valid_tokens) - 1
    assert carried["tokens"] == carried_odd["tokens"] == n
    np.testing.assert_allclose(carried["loss"], full, rtol=2e-5)
    np.testing.assert_allclose(carried_odd["loss"], full, rtol=2e-5)
    assert carried["bpc"] == pytest.approx(full / np.log(2), rel=2e-5)


def test_sliding_with_stride_t_is_independent_segments(char_run):
    segments = evaluate_lm(char_run, "segments")
    same = evaluate_lm(char_run, "sliding", stride=16)
    np.testing.assert_allclose(same["loss"], segments["loss"], rtol=1e-6)
    overlap = evaluate_lm(char_run, "sliding", stride=4)
    assert overlap["tokens"] == segments["tokens"] == len(char_run.task.valid_tokens) - 1
    assert abs(overlap["loss"] - segments["loss"]) > 1e-6  # more context per scored token
    with pytest.raises(ValueError, match=r"stride=17 must be in \[1, segment_len=16\]"):
        evaluate_lm(char_run, "sliding", stride=17)


def test_carried_eval_refuses_softmax_layers():
    config = load_train_config(
        "lm_tiny",
        [*TINY_CHAR, "lm.carry_state=false", 'lm.model.layer_kinds=["softmax"]'],
    )
    run = types.SimpleNamespace(task=LMTrainTask(config))  # refused before any model is built
    with pytest.raises(ValueError, match="mode='carried' needs fast weight layers only"):
        evaluate_lm(run, "carried")


def test_generate_cli_decodes_with_the_saved_char_vocabulary(char_run, capsys):
    workdir = str(char_run.workdir)
    assert main(["generate", "--workdir", workdir, "--prompt", "the ", "--tokens", "12"]) == 0
    tok = Tokenizer.load(char_run.workdir / "tokenizer.json")
    assert tok == char_run.task.tokenizer and tok.kind.value == "char"
    out = capsys.readouterr().out
    sample = out[: out.rindex("\n")] if out.endswith("\n") else out
    assert sample.startswith("the ") and len(sample) == 4 + 12
    assert set(sample) <= set(tok.vocab)


def test_word_tokens_train_from_a_text_file(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("\n".join(f"w{i % 7} w{i % 5} w{i % 3}" for i in range(600)) + "\n")
    config = load_train_config(
        "lm_tiny",
        [*TINY_CHAR, "lm.tokenizer=word", f"lm.text_path={path}", "lm.validation_fraction=0.2"],
    )
    task = LMTrainTask(config)
    tok = task.tokenizer
    assert tok.vocab[0] == "<eos>" and task.model_config.vocab_size == tok.vocab_size == 9
    model = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0)))
    assert model.head.kernel.get_value().shape == (32, 9)
    assert model.embed.embedding.get_value().shape[0] == 9
    batch = task.train_batch(0)
    assert set(np.unique(batch["targets"])) <= set(range(9))


# --- packed documents ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def packed_run(tmp_path_factory):
    """The char run with documents packed: each line of the corpus is a document."""
    config = with_overrides(
        load_train_config("lm_tiny", TINY_CHAR), {"lm.document_separator": "\n"}
    )
    run = Run(config, tmp_path_factory.mktemp("packed"), devices=jax.devices()[:1])
    run.checkpointer.close()
    return run


def test_packed_batches_mark_the_documents(packed_run):
    task = packed_run.task
    newline = task.tokenizer.token_id("\n")
    assert task.separator == newline
    streams = task.train_streams
    # The first batch (past the epoch start) in which some window begins a document.
    index = next(i for i in range(1, len(streams)) if streams.batch(i)["reset"].any())
    batch = task.train_batch(index)
    inputs, ids = batch["inputs"], batch["segment_ids"]
    # A step after a separator starts a new document; a window that begins one resets.
    np.testing.assert_array_equal(np.diff(ids, axis=1), inputs[:, :-1] == newline)
    previous = streams.tokens[np.arange(8) * streams.num_segments * 16 + index * 16 - 1]
    np.testing.assert_array_equal(batch["reset"], previous == newline)


def test_packed_carried_eval_equals_one_packed_pass_over_the_whole_split(packed_run):
    """Windows of any length with the memory carried (and emptied where a window begins a
    document) score every token as one packed pass over the whole split does; documents never
    see each other."""
    run = packed_run
    tokens = np.asarray(run.task.valid_tokens)
    newline = run.task.separator
    ids = np.concatenate([[0], np.cumsum(tokens[:-2] == newline)])[None].astype(np.int32)

    @jax.jit
    def forward(params, rest, inputs, segment_ids):
        return run.model_def.merge(params, rest, train=False)(inputs, segment_ids=segment_ids)[0]

    logits = forward(run.state.params, run.state.rest, tokens[None, :-1], ids)
    full = float(optax.softmax_cross_entropy_with_integer_labels(logits, tokens[None, 1:]).mean())
    for t in (16, 13):
        carried = evaluate_lm(run, "carried", segment_len=t, streams=1)
        np.testing.assert_allclose(carried["loss"], full, rtol=2e-5)
    # Without packing the same parameters give another loss: the documents saw each other.
    unpacked = forward(run.state.params, run.state.rest, tokens[None, :-1], None)
    other = optax.softmax_cross_entropy_with_integer_labels(unpacked, tokens[None, 1:]).mean()
    assert abs(float(other) - full) > 1e-4


@pytest.mark.slow  # packed training is also run by the two-process test of test_train.py
def test_packed_training_runs_with_a_carried_memory(tmp_path):
    overrides = [*TINY_CHAR, "steps=3", r'lm.document_separator="\n"']
    summary = train(load_train_config("lm_tiny", overrides), tmp_path, devices=jax.devices()[:1])
    assert np.isfinite(summary["train"]["loss"]) and summary["steps"] == 3
