"""The loop's host side: periodic log lines without a bar, the bar on a terminal, resume cleanup
of metrics, and the signal handler."""

from __future__ import annotations

import io
import json

from fwjax.train.metrics import MetricsWriter, Progress, read_metrics


def test_log_lines_come_at_most_every_interval_with_eta():
    out = io.StringIO()
    progress = Progress(100, 20, bar=True, interval_s=3600.0, stream=out)  # no TTY: lines
    assert progress._bar is None
    progress.update(30, 10, {"loss": 1.25, "tokens/s": 1234.5})
    progress.update(40, 10, {"loss": 1.0, "tokens/s": 1300.0})  # within the interval
    progress.update(100, 60, {"loss": 0.5, "tokens/s": 1300.0})  # the last step: no line
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("fwjax train: step 30/100, loss 1.25, tokens/s 1234")
    assert "elapsed 0m00s" in lines[0] and "ETA " in lines[0]
    out = io.StringIO()
    progress = Progress(100, 0, bar=False, interval_s=0.0, stream=out)
    for step in (10, 20, 30):
        progress.update(step, 10, {"loss": 1.0})
    assert len(out.getvalue().splitlines()) == 3


def test_a_terminal_gets_a_bar(monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    out = io.StringIO()
    progress = Progress(10, 0, bar=True, stream=out)
    assert progress._bar is not None
    progress.update(5, 5, {"loss": 1.0})
    progress.close()
    assert out.getvalue() == ""  # no log lines next to the bar
    assert Progress(10, 0, bar=False)._bar is None


def test_records_after_the_restored_step_are_dropped(tmp_path):
    writer = MetricsWriter(tmp_path)
    for step in (10, 20, 30):
        writer.write(step, "train", {"loss": 1.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 40, "split": "tr')  # cut short by a kill
    assert writer.truncate_after(20) == 2
    assert [r["step"] for r in read_metrics(tmp_path)] == [10, 20]
    writer.write(30, "train", {"loss": 0.5})
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").open()] == [
        10,
        20,
        30,
    ]
    assert writer.truncate_after(None) == 3 and read_metrics(tmp_path) == []


def test_a_second_signal_aborts_at_once(monkeypatch, capsys):
    import signal

    import pytest

    from fwjax.train import loop

    def exit_now(code):
        raise SystemExit(code)

    monkeypatch.setattr(loop.os, "_exit", exit_now)
    with loop._StopSignals() as stop:
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        stop._handle(signal.SIGTERM, None)
        assert stop.received == signal.SIGTERM  # the loop saves and stops after this step
        with pytest.raises(SystemExit) as exit_info:
            stop._handle(signal.SIGINT, None)
    assert exit_info.value.code == 130
    assert signal.getsignal(signal.SIGTERM) is not stop._handle  # restored
    assert "aborting without a checkpoint" in capsys.readouterr().err


class _ClosedPipe(io.StringIO):
    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")


def test_a_closed_output_neither_stops_the_log_nor_the_signal_handler(monkeypatch):
    """A run whose reader has gone (its parent killed) still records a signal, and so still
    saves a checkpoint; its progress lines are dropped instead of raising."""
    import signal

    from fwjax.train import loop

    monkeypatch.setattr("sys.stderr", _ClosedPipe())
    with loop._StopSignals() as stop:
        stop._handle(signal.SIGINT, None)
        assert stop.received == signal.SIGINT
    progress = Progress(10, 0, False, stream=_ClosedPipe())
    progress.update(1, 1, {"loss": 1.0})
    progress.close()
