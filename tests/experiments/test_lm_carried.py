"""Smoke test of the carried-memory driver: a tiny pair trains, evaluates and reports."""

import json

import numpy as np
import pytest

from experiments import lm_carried

TINY = [
    "steps=3",
    "batch_size=8",
    "eval_every=3",
    "eval_batches=1",
    "log_every=1",
    "checkpoint.every_steps=3",
    "lm.segment_len=8",
    "lm.eval_stride=4",
    "lm.model.d_model=16",
    "lm.model.num_layers=1",
    "lm.model.num_heads=2",
    "lm.model.d_ff=32",
    "lm.model.max_len=8",
]


def test_make_config_pairs_differ_only_in_carry():
    a = lm_carried.make_config("l2", True, 1)
    b = lm_carried.make_config("l2", False, 1)
    assert a.lm.carry_state and not b.lm.carry_state
    assert a.lm.model == b.lm.model and a.lm.model.fast_weight.normalization.value == "l2"
    assert a.lm.model.positional.value == "none" and a.lm.sampling.value == "streams"
    assert a.seed == 1 and a.lm.model.fast_weight.diagnostics
    with pytest.raises(ValueError, match="norm="):
        lm_carried.make_config("nope", True, 0)


@pytest.mark.slow  # two tiny trainings and their evaluations: ~15 s idle, ~45 s on busy cores
@pytest.mark.parametrize("norm", ["linear"])
def test_tiny_pair_runs_evaluates_and_reports(tmp_path, monkeypatch, norm):
    monkeypatch.setattr(lm_carried, "CHUNKS", (1, 4, None))  # fewer shapes to compile
    rng = np.random.default_rng(0)
    words = ["the", "king", "shall", "die", "and", "live", "to", "see", "it", "so"]
    text = " ".join(rng.choice(words, size=1500)) + "\n"
    path = tmp_path / "text.txt"
    path.write_text(text)
    extra = [*TINY, f'lm.text_path="{path}"']
    out = tmp_path / "results"
    recs = [
        lm_carried.run_one(norm, carry, 0, runs=tmp_path / "runs", out=out, extra=extra)
        for carry in (True, False)
    ]
    n = len(text) - round(len(text) * 0.9) - 1  # validation pairs
    for rec in recs:
        loss = rec["eval"]["loss"]
        assert list(loss) == ["8", "32", "stream"]
        assert all(np.isfinite(v) and 0 < v < 10 for v in loss.values())
        trace = rec["eval"]["stream_trace"]
        assert len(trace["state_norm"]) == -(-n // 8)  # one record per segment of the stream
        assert len(trace["state_norm"][0]) == 1 and "normalizer_norm" in trace  # 1 layer, z
        # The carried key accumulator only grows along the stream.
        z = [x[0] for x in trace["normalizer_norm"]]
        assert z[-1] > z[0] > 0
        assert rec["eval"]["minus_segments_by_distance"]["8"][0] == 0.0
        assert len(rec["training_memory"]) == 3
        assert json.loads((out / f"{rec['name']}.json").read_text())["seed"] == 0
    lm_carried.write_report(out, tmp_path / "report.md")
    text = (tmp_path / "report.md").read_text()
    assert "| linear | 1 |" in text and "linear_carry_s0" in text
