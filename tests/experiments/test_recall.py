"""The recall sweep runner (experiments.recall) and its training loop (fwjax.train.recall):
one tiny point end to end, outputs written, resumption skips finished points."""

from __future__ import annotations

import csv
import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import recall
from fwjax.cli import load_train_config
from fwjax.data.recall import MQARTask, MultiHopTask
from fwjax.nn import ModelConfig
from fwjax.train.recall import (
    RecallProtocol,
    answer_metrics,
    recall_train_config,
    train_recall,
)

TINY = recall.Scale(
    d_model=8,
    num_layers=1,
    multihop_layers=1,
    num_heads=1,
    d_ff=8,
    steps=2,
    batch_size=2,
    eval_sequences=2,
)


@pytest.mark.slow  # ~15 s of compiling; the generators and metrics keep default-suite tests
def test_a_tiny_point_end_to_end_and_resume(tmp_path):
    points = [recall.Point("multihop", "delta", 1)]
    out_dir, results = tmp_path / "points", tmp_path
    records = recall.run_sweep(points, TINY, out_dir=out_dir, results_dir=results, log=_quiet)
    (record,) = records
    assert record["length"] == points[0].make_task(TINY).length
    assert 0.0 <= record["accuracy"] <= 1.0 and record["steps"] == 2
    assert record["hop1_accuracy"] != "" or record["hop2_accuracy"] != ""
    stored = json.loads(recall.point_path(out_dir, points[0]).read_text())
    assert stored["accuracy"] == record["accuracy"]
    with (results / "recall.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["delta"]
    assert "| T | size | delta |" in (results / "recall.md").read_text()
    assert (results / "recall.png").stat().st_size > 0
    # Resume: the finished point is skipped (its file is untouched).
    mtime = recall.point_path(out_dir, points[0]).stat().st_mtime_ns
    lines = []
    recall.run_sweep(points, TINY, out_dir=out_dir, results_dir=results, log=_collect(lines))
    assert "1 of 1 points done, 0 to run" in lines[0]
    assert recall.point_path(out_dir, points[0]).stat().st_mtime_ns == mtime


def test_sweep_covers_every_variant_and_point_validation():
    points = recall.sweep(recall.TASKS, quick=False)
    assert {p.variant for p in points} == set(recall.VARIANTS)
    assert len({p.name for p in points}) == len(points)
    with pytest.raises(ValueError, match="variant='nope'"):
        recall.Point("mqar", "nope", 4)
    task = MQARTask(num_pairs=4)
    cfg = ModelConfig(vocab_size=task.vocab_size, d_model=8, num_layers=1, num_heads=1, d_ff=8)
    with pytest.raises(ValueError, match="eval_batch_size=3 must divide"):
        bad = {"recall.eval_sequences": 8, "recall.eval_batch_size": 3}
        recall_train_config(task, cfg, bad)
    with pytest.raises(ValueError, match=r"embedding_std=0\.0 must be > 0"):
        recall_train_config(task, cfg, {"recall.embedding_std": 0.0})
    with pytest.raises(ValueError, match="vocab_size=8 must be >="):
        recall_train_config(task, dataclasses.replace(cfg, vocab_size=8))


def test_the_config_file_is_the_sweeps_point():
    point = recall.Point("mqar", "delta", 16)
    task = point.make_task(recall.FULL)
    model = point.model_config(recall.FULL, task.vocab_size)
    config = recall_train_config(task, model, recall.FULL.fields(0, "delta"))
    assert load_train_config("recall_mqar_delta") == config


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


def _quiet(*args, **kwargs):
    pass


def _collect(lines):
    return lambda msg, **kwargs: lines.append(msg)
