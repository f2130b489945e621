"""The experiments' figure style: legends outside the panels, readable log ticks, and the LM and
normalisation figures drawn from stored-result records."""


import numpy as np
import pytest

pytest.importorskip("matplotlib")

from experiments import lm, normalisation
from experiments.plotting import MAX_WIDTH_IN, STYLE, legend_below, log_ticks, style


def _boxes_overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_legend_below_never_covers_a_panel():
    with style() as plt:
        fig, axes = plt.subplots(1, 2, figsize=(MAX_WIDTH_IN, 4), layout="constrained")
        for i, ax in enumerate(axes):
            for j in range(9):
                ax.plot(np.arange(10), np.arange(10) * (j + i), label=f"curve {j}")
        legend_below(fig, axes, ncol=5)
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        (legend,) = fig.legends
        assert len(legend.get_texts()) == 9  # each label once, over both panels
        box = legend.get_window_extent(renderer)
        for ax in axes:
            assert not _boxes_overlap(box, ax.get_window_extent(renderer))
        assert box.y1 <= min(ax.get_window_extent(renderer).y0 for ax in axes)
        plt.close(fig)


def test_log_ticks_label_exactly_the_given_values():
    with style() as plt:
        fig, ax = plt.subplots()
        ax.plot([240, 960, 3840], [0.2, 0.4, 0.5])
        ax.set_xscale("log")
        log_ticks(ax.xaxis, [240, 960, 3840])
        fig.canvas.draw()
        labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
        assert labels == ["240", "960", "3840"]
        assert [t.get_text() for t in ax.xaxis.get_minorticklabels() if t.get_text()] == []
        plt.close(fig)


def test_style_is_readable_at_page_width():
    """At about 800 px wide, the smallest font of a MAX_WIDTH_IN-wide figure is >= 9 px."""
    smallest = min(STYLE[k] for k in STYLE if k.endswith(("size", "labelsize")))
    assert smallest * 800 / (72 * MAX_WIDTH_IN) >= 9


def _lm_record(budget, model, seed, losses):
    return {
        "budget": budget,
        "model": model,
        "seed": seed,
        "tokens": 1000,
        "steps": 100,
        "curve": {"train": [], "eval": [[25 * (i + 1), x] for i, x in enumerate(losses)]},
    }


def test_lm_curves_figure_from_records(tmp_path):
    records = [
        _lm_record("small", "softmax", 0, [2.5, 2.2, 2.0, 1.9]),
        _lm_record("small", "softmax", 1, [2.4, 2.1, 2.0, 1.8]),
        _lm_record("small", "delta", 0, [2.3, 2.0, 1.9, 1.7]),
        _lm_record("long", "delta", 0, [2.6, 2.0, 1.8, 1.6]),
    ]
    earlier = {k: v for k, v in _lm_record("x", "linear", 0, [2.5, 2.4]).items() if k != "budget"}
    path = tmp_path / "curves.png"
    lm.plot_curves([*records, earlier], path)
    assert path.stat().st_size > 10_000
    lm.plot_curves([{**records[0], "curve": {"train": [], "eval": []}}], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()  # nothing to draw: no file


def test_normalisation_figure_from_records(tmp_path, monkeypatch):
    trace = [[t, 1.0 + t / 100] for t in range(0, 480, 48)]
    syn = [
        {
            "config": config,
            "n_keys": 120,
            "replays": [
                {"length": n, "loss": 0.01 * (i + 1), "state_norm_trace": trace}
                for i, n in enumerate((240, 960, 3840))
            ],
        }
        for config in normalisation.CONFIGS
    ]
    segments = [
        {"bpc": 2.0 + 0.01 * i, "bpc_reset": 2.0, "layers": [{"state_norm_final": 10.0 + i}]}
        for i in range(30)
    ]
    lms = [
        {"run": run, "config": config, "segment_len": 256, "per_segment": segments}
        for run, config in normalisation.LM_RUNS.items()
    ]
    monkeypatch.setattr(normalisation, "RESULTS", tmp_path)
    normalisation._plot(syn, lms)
    assert (tmp_path / "normalisation.png").stat().st_size > 10_000
