"""The state-tracking runner: a tiny point (trained at one length, evaluated at a longer one) is
written, merged into the table with a column per evaluation length, and plotted."""

from __future__ import annotations

import json

from experiments import state_tracking


def test_a_tiny_point_is_written_with_its_longer_lengths(tmp_path):
    point = (8, 2, "delta", 0)
    record = state_tracking.run_point(point, steps=2, eval_lengths=(16,), out=tmp_path)
    assert json.loads(state_tracking._path(point, tmp_path).read_text()) == record
    assert set(record["longer"]) == {"16"}
    assert all(0.0 <= acc <= 1.0 for acc in record["longer"].values())
    records = state_tracking.write_outputs(tmp_path, tmp_path)
    table = (tmp_path / "state_tracking.md").read_text().splitlines()
    assert len(records) == 1 and "| T 16 |" in table[0]
    assert table[2].startswith("| 8 | 2 | delta | 1 |")
    assert (tmp_path / "state_tracking.png").stat().st_size > 0
