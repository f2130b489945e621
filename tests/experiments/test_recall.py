"""The recall tasks' training loop (fwjax.train.recall): its config from the protocol file,
the answer metrics, and the deprecated wrapper."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import recall_zoology
from fwjax.cli import load_train_config
from fwjax.data.recall import MQARTask, MultiHopTask, ZoologyMQARTask
from fwjax.nn import ModelConfig
from fwjax.train.recall import (
    RecallProtocol,
    answer_metrics,
    recall_train_config,
    train_recall,
)


def test_recall_train_config_validates_the_task_and_its_fields():
    task = MQARTask(num_pairs=4)
    cfg = ModelConfig(vocab_size=task.vocab_size, d_model=8, num_layers=1, num_heads=1, d_ff=8)
    with pytest.raises(ValueError, match="eval_batch_size=3 must divide"):
        bad = {"recall.eval_sequences": 8, "recall.eval_batch_size": 3}
        recall_train_config(task, cfg, bad)
    with pytest.raises(ValueError, match=r"embedding_std=0\.0 must be > 0"):
        recall_train_config(task, cfg, {"recall.embedding_std": 0.0})
    with pytest.raises(ValueError, match="vocab_size=8 must be >="):
        recall_train_config(task, dataclasses.replace(cfg, vocab_size=8))
    with pytest.raises(TypeError, match="is not one of"):
        recall_train_config("mqar", cfg)


def test_the_config_file_is_the_zoology_runners_point():
    """``fwjax train --config recall_mqar_delta`` trains exactly the runner's point (T 64,
    16 pairs, d_model 64, the delta rule, lr 3e-3, 2000 steps, seed 0)."""
    task = ZoologyMQARTask(vocab_size=recall_zoology.VOCAB, length=64, num_pairs=16)
    model = recall_zoology.model_config("delta", 64, 64)
    fields = recall_zoology.training_fields(2000, 3e-3, 0)
    assert load_train_config("recall_mqar_delta") == recall_train_config(task, model, fields)


# ~8 s; a deprecated wrapper of run_recall, which the default suite covers directly.
@pytest.mark.slow
def test_train_recall_is_a_deprecated_wrapper_of_the_loop():
    """A tiny multi-hop run in the training loop: evaluations at steps 2 and 4 with per-hop
    accuracies; the deprecated ``train_recall`` warns."""
    task = MultiHopTask(2, num_entities=6, num_noise=2)
    cfg = ModelConfig(vocab_size=task.vocab_size, d_model=8, num_layers=1, num_heads=1, d_ff=8)
    with pytest.warns(DeprecationWarning, match="recall_train_config"):
        protocol = RecallProtocol(
            steps=4, batch_size=2, eval_every=2, eval_sequences=4, eval_batch_size=2, warmup_steps=0
        )
    lines = []
    with pytest.warns(DeprecationWarning, match="run_recall"):
        result = train_recall(task, cfg, protocol, log=lines.append)
    assert [h[0] for h in result.history] == [2, 4] and result.steps == 4 and len(lines) == 2
    assert set(result.hop_accuracy) <= {1, 2} and result.hop_accuracy
    assert 0.0 <= result.accuracy <= 1.0 and result.best_accuracy >= result.accuracy
    assert all(np.isfinite(h[1]) and np.isfinite(h[2]) for h in result.history)
    assert result.num_params > 0


def test_answer_metrics_count_only_masked_positions_per_hop():
    targets = jnp.array([[1, 2, 0, 3]])
    logits = jnp.eye(4)[jnp.array([[1, 0, 0, 3]])] * 10.0  # right at 0 and 3, wrong at 1
    mask = jnp.array([[True, True, False, True]])
    hops = jnp.array([[1, 2, 0, 2]])
    m = answer_metrics(logits, targets, mask, hops, max_hops=2)
    assert float(m["count"]) == 3 and float(m["correct"]) == 2
    np.testing.assert_array_equal(m["hop_correct"], [1, 1])
    np.testing.assert_array_equal(m["hop_count"], [1, 2])
