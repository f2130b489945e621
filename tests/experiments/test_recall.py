"""The recall sweep runner (experiments.recall) and its training loop (fwjax.train.recall):
one tiny point end to end, outputs written, resumption skips finished points."""

from __future__ import annotations

import csv
import json

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import recall
from fwjax.train.recall import RecallProtocol, answer_metrics

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
    with pytest.raises(ValueError, match="eval_batch_size=3 must divide"):
        RecallProtocol(eval_sequences=8, eval_batch_size=3)
    with pytest.raises(ValueError, match=r"embedding_std=0\.0 must be > 0"):
        RecallProtocol(embedding_std=0.0)


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
