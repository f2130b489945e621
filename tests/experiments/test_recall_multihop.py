"""Multi-hop recall under Zoology's recipe: a tiny point is written with its per-hop accuracies
and merged into the table."""

from __future__ import annotations

import json

from experiments import recall_multihop


def test_a_tiny_point_reports_both_hop_counts(tmp_path):
    point = (1, 16, "delta", 2, 0, 1)  # the first training batch scores 1-hop answers only
    record = recall_multihop.run_point(point, out=tmp_path)
    path = recall_multihop._path(point, tmp_path)
    assert path.name == "depth1_ff16_delta_steps2_onehop1_seed0.json"
    assert json.loads(path.read_text()) == record
    assert record["one_hop_steps"] == 1
    assert 0.0 <= record["hop1_accuracy"] <= 1.0 and 0.0 <= record["hop2_accuracy"] <= 1.0
    recall_multihop.write_outputs(tmp_path, tmp_path)
    table = (tmp_path / "recall_multihop.md").read_text().splitlines()
    assert table[2].startswith("| 1 | 16 | delta | 2 | 1 | 1 | ")
    assert [step for step, _ in record["curve"]] == [1, 2]


def test_points_without_a_curriculum_keep_their_file_names(tmp_path):
    old = recall_multihop._path((2, 128, "softmax", 12000, 0), tmp_path)
    assert old == recall_multihop._path((2, 128, "softmax", 12000, 0, 0), tmp_path)
    assert old.name == "depth2_ff128_softmax_steps12000_seed0.json"
