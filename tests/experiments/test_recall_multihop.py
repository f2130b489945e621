"""Multi-hop recall under Zoology's recipe: a tiny point is written with its per-hop accuracies
and merged into the table."""

from __future__ import annotations

import json

from experiments import recall_multihop


def test_a_tiny_point_reports_both_hop_counts(tmp_path):
    point = (1, 16, "delta", 2, 0)
    record = recall_multihop.run_point(point, out=tmp_path)
    assert json.loads(recall_multihop._path(point, tmp_path).read_text()) == record
    assert 0.0 <= record["hop1_accuracy"] <= 1.0 and 0.0 <= record["hop2_accuracy"] <= 1.0
    recall_multihop.write_outputs(tmp_path, tmp_path)
    table = (tmp_path / "recall_multihop.md").read_text().splitlines()
    assert table[2].startswith("| 1 | 16 | delta | 2 | 1 | ")
    assert [step for step, _ in record["curve"]] == [1, 2]
