"""MQAR under Zoology's protocol: the runner writes and resumes points, and (slow) softmax
attention solves MQAR with the fwjax model stack and recipe — the sanity check that every recall
comparison rests on."""

from __future__ import annotations

import json

import pytest

from experiments import recall_zoology


def test_a_tiny_point_is_written_and_skipped_when_run_again(tmp_path):
    point = (4, 16, "delta", 0)
    record = recall_zoology.run_point(point, steps=2, lr=1e-3, out=tmp_path)
    assert json.loads(recall_zoology._path(point, tmp_path).read_text()) == record
    assert 0.0 <= record["accuracy"] <= 1.0 and record["pairs"] == 4
    records = recall_zoology.write_outputs(tmp_path, tmp_path)
    assert len(records) == 1 and (tmp_path / "recall_zoology.md").read_text().count("|") > 4


@pytest.mark.slow  # ~2 min on 2 CPU cores
def test_softmax_attention_solves_zoology_mqar(tmp_path):
    """T 64, 8 pairs, vocabulary 1024, d_model 64: ≥ 0.99 answer accuracy in 2000 steps
    (measured 0.9985); fails if the model stack or the recipe regresses."""
    record = recall_zoology.run_point((8, 64, "softmax", 0), steps=2000, lr=3e-3, out=tmp_path)
    assert record["accuracy"] >= 0.99
