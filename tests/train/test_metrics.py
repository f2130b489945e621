"""The loop's host side: periodic log lines without a bar, the bar on a terminal, resume cleanup
of metrics, the signal handler, and Weights & Biases logging (offline)."""

from __future__ import annotations

import dataclasses
import io
import json

import pytest

from fwjax.train.metrics import MetricsWriter, Progress, WandbOptions, read_metrics


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


# --- Weights & Biases (the optional `wandb` extra), offline ------------------------------------


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B in offline mode with every file it writes under ``tmp_path/wandb_home``."""
    pytest.importorskip("wandb")
    home = tmp_path / "wandb_home"
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(home))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return home


def _offline_runs(home):
    """The offline run directories, once W&B's service has written them out (``finish``
    returns before the service has flushed an offline run's log; ``teardown`` waits for it)."""
    import wandb

    wandb.teardown()
    return sorted((home / "wandb").glob("offline-run-*"))


def _log_bytes(run_dir) -> bytes:
    """The records of an offline run's ``.wandb`` log, without the 7-byte record header that
    starts each 32 KiB block (so that no key is cut by a block boundary)."""
    [path] = run_dir.glob("*.wandb")
    raw = path.read_bytes()
    return b"".join(raw[i : i + 32768][7 if i else 0 :] for i in range(0, len(raw), 32768))


def test_a_wandb_offline_run_writes_its_files_and_resumes_its_id(tmp_path, wandb_offline):
    workdir = tmp_path / "run"
    options = WandbOptions(project="fwjax-test", name="tiny", mode="offline", config={"seed": 7})
    writer = MetricsWriter(workdir, wandb=options)
    writer.write(1, "train", {"loss": 2.5, "accuracy": 0.25, "per_head": [1.0, 2.0]})
    writer.write(2, "eval", {"loss": 2.0, "changed": "text is not logged"})
    writer.close()
    run_id = (workdir / "wandb_run_id").read_text().strip()
    [run_dir] = _offline_runs(wandb_offline)
    assert run_dir.name.endswith(f"-{run_id}")
    data = _log_bytes(run_dir)
    assert b"train/loss" in data and b"eval/loss" in data and b"train/accuracy" in data
    assert b"per_head" not in data and b"changed" not in data
    assert b"seed" in data  # the run's config
    assert len(read_metrics(workdir)) == 2  # the JSONL file is written as always
    # A resumed run (same workdir) logs to the same W&B run id.
    writer = MetricsWriter(workdir, wandb=options)
    writer.write(3, "train", {"loss": 1.5})
    writer.close()
    assert len(_offline_runs(wandb_offline)) == 2
    assert all(d.name.endswith(f"-{run_id}") for d in _offline_runs(wandb_offline))


def test_training_with_wandb_true_logs_the_run(tmp_path, wandb_offline):
    from fwjax.train import TrainConfig, train
    from fwjax.train.config import CheckpointConfig, RetrievalTaskConfig

    config = TrainConfig(
        task="retrieval",
        retrieval=RetrievalTaskConfig(num_keys=8, d_key=16),
        steps=2,
        batch_size=8,
        eval_every=2,
        log_every=1,
        progress_bar=False,
        checkpoint=CheckpointConfig(async_save=False),
        wandb=True,
        wandb_project="fwjax-test",
        wandb_mode="offline",
    )
    train(config, tmp_path / "run")
    [run_dir] = _offline_runs(wandb_offline)
    data = _log_bytes(run_dir)
    assert b"train/loss" in data and b"train/grad_norm" in data and b"eval/accuracy" in data
    assert b"wandb_project" in data and b"num_keys" in data  # the run's config


def test_stored_configs_from_before_the_wandb_and_param_dtype_fields_still_load(tmp_path):
    from fwjax.train import TrainConfig
    from fwjax.train.config import LMTaskConfig
    from fwjax.train.config_io import unstructure
    from fwjax.train.workdir import check_config, stored_config

    config = TrainConfig(task="lm", lm=LMTaskConfig())
    stored = unstructure(config)
    for key in ("wandb", "wandb_project", "wandb_name", "wandb_mode"):
        del stored[key]  # a config.json written before these fields existed
    del stored["lm"]["model"]["param_dtype"]
    (tmp_path / "config.json").write_text(json.dumps(stored))
    old = stored_config(tmp_path)
    assert old == config and not old.wandb and old.lm.model.param_dtype == "float32"
    # Turning W&B on for a stored run is a runtime change (recorded, not refused).
    new = dataclasses.replace(config, wandb=True, wandb_mode="offline")
    assert set(check_config(tmp_path, old, new)) == {"wandb", "wandb_mode"}
