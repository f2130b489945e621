"""The training system: configs, sharded steps, checkpoints and exact resume, robustness, CLI."""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

from fwjax.cli import CONFIG_DIRS, load_train_config, main
from fwjax.train import NonFiniteLossError, Run, TrainConfig, train
from fwjax.train.config_io import structure, unstructure
from fwjax.train.metrics import read_metrics
from tests.xla_flags import FAST_COMPILE

REPO = Path(__file__).resolve().parents[2]

# A retrieval run that compiles and steps in a few seconds.
TINY_RETRIEVAL = [
    "retrieval.num_keys=8",
    "retrieval.d_key=16",
    "batch_size=8",
    "log_every=1",
    "eval_every=4",
    "progress_bar=false",
    "checkpoint.async_save=false",
]
TINY_LM = [
    "batch_size=8",
    "lm.segment_len=16",
    "lm.model.d_model=32",
    "lm.model.d_ff=64",
    "lm.model.num_heads=2",
    "lm.model.num_layers=1",
    "lm.model.dropout=0.1",
    "log_every=1",
    "eval_every=3",
    "eval_batches=2",
    "progress_bar=false",
    "checkpoint.async_save=false",
]


def _train_losses(workdir) -> list[float]:
    return [r["loss"] for r in read_metrics(workdir) if r["split"] == "train"]


def _params(workdir, overrides=()):
    from fwjax.cli import config_from_workdir

    run = Run(config_from_workdir(workdir, list(overrides)), workdir)
    run.checkpointer.close()
    return run.restored_step, jax.device_get(jax.tree.leaves(run.state.params))


# --- configs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(CONFIG_DIRS[0].glob("*.toml")), ids=lambda p: p.stem)
def test_every_config_file_loads_and_round_trips(path):
    config = load_train_config(str(path))
    assert structure(TrainConfig, json.loads(json.dumps(unstructure(config)))) == config


def test_overrides_are_typed_and_unknown_keys_named():
    config = load_train_config(
        "retrieval_delta",
        ["optimizer.learning_rate=3e-4", "retrieval.fast_weight.update_rule=sum", "steps=7"],
    )
    assert config.optimizer.learning_rate == 3e-4 and config.steps == 7
    assert config.retrieval.fast_weight.update_rule.value == "sum"
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['stepz'\]"):
        load_train_config("retrieval_delta", ["stepz=3"])
    with pytest.raises(ValueError, match="update_rule='hebb' is not one of"):
        load_train_config("retrieval_delta", ["retrieval.fast_weight.update_rule=hebb"])
    with pytest.raises(ValueError, match="batch_size=0 must be a positive int"):
        load_train_config("retrieval_delta", ["batch_size=0"])
    with pytest.raises(ValueError, match=r"weight_decay=0\.1 needs kind='adamw'"):
        load_train_config("retrieval_delta", ["optimizer.weight_decay=0.1"])
    with pytest.raises(FileNotFoundError, match="retrieval_delta"):
        load_train_config("no_such_config")


def test_global_batch_must_divide_data_parallel_size(tmp_path):
    config = load_train_config("retrieval_delta", [*TINY_RETRIEVAL, "batch_size=6"])
    with pytest.raises(ValueError, match=r"batch_size=6 must be divisible by the mesh's data=4"):
        train(config, tmp_path, devices=jax.devices()[:4])


def test_missing_text_path_is_named(tmp_path):
    config = load_train_config("lm_tiny", [*TINY_LM, "lm.text_path=/nonexistent/corpus.txt"])
    with pytest.raises(FileNotFoundError, match=r"/nonexistent/corpus\.txt"):
        train(config, tmp_path)


# --- training, sharding ------------------------------------------------------------------------


def test_retrieval_run_learns_and_writes_metrics(tmp_path):
    overrides = [*TINY_RETRIEVAL, "retrieval.d_key=64", "steps=150", "eval_every=50"]
    overrides += ["tensorboard=true"]
    summary = train(load_train_config("retrieval_delta", overrides), tmp_path)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    records = read_metrics(tmp_path)
    evals = [r for r in records if r["split"] == "eval"]
    assert len(evals) == 3 and evals[-1]["loss"] < 0.5 * evals[0]["loss"], evals
    assert evals[-1]["accuracy"] > 0.9
    assert summary["steps"] == 150 and summary["eval"]["loss"] == evals[-1]["loss"]
    assert (tmp_path / "summary.json").exists() and (tmp_path / "config.json").exists()
    assert all(np.isfinite(r["tokens_per_s"]) for r in records if r["split"] == "train")


def test_steps_per_call_and_early_stopping(tmp_path):
    """Four steps per jitted call (a scan) train as one step per call; a reached target stops
    the run at that evaluation with its checkpoint, and the summary names the reason."""
    base = [*TINY_RETRIEVAL, "steps=8", "log_every=4"]
    one = train(load_train_config("retrieval_delta", base), tmp_path / "one")
    four = train(load_train_config("retrieval_delta", [*base, "steps_per_call=4"]), tmp_path / "4")
    assert "stop_reason" not in one
    assert four["train"]["loss"] == pytest.approx(one["train"]["loss"], rel=1e-5)
    assert four["eval"]["loss"] == pytest.approx(one["eval"]["loss"], rel=1e-5)
    # A loss near 0.5 (predictions near 0) is below 10: the first evaluation (step 4) stops.
    stop_at = [*base, "early_stopping.target=10.0"]
    stopped = train(load_train_config("retrieval_delta", stop_at), tmp_path / "stop")
    assert (stopped["steps"], stopped["stop_reason"]) == (4, "target")
    run = Run(load_train_config("retrieval_delta", stop_at), tmp_path / "stop")
    run.checkpointer.close()
    assert run.restored_step == 4


def test_one_device_and_eight_devices_give_the_same_losses(tmp_path):
    """Data parallel (4) × tensor parallel (2) over 8 simulated devices vs one device, both with
    scanned (stacked) layers; the 8-device run also shards its parameters over ``data`` (FSDP)
    and rematerialises its blocks around the fast weight op (options that must not change a
    loss)."""
    overrides = [*TINY_LM, "steps=2", "lm.model.scan_layers=true"]
    train(load_train_config("lm_tiny", overrides), tmp_path / "one", devices=jax.devices()[:1])
    mesh = ["mesh.data=4", "mesh.model=2", "mesh.fsdp=true", "lm.model.remat=fast_weight"]
    train(load_train_config("lm_tiny", overrides + mesh), tmp_path / "eight")
    assert len(jax.devices()) == 8
    np.testing.assert_allclose(
        _train_losses(tmp_path / "one"), _train_losses(tmp_path / "eight"), rtol=1e-5
    )


def test_fsdp_shards_parameters_and_optimizer_state_over_data(tmp_path):
    """With ``mesh.fsdp`` every device holds a quarter (data=4) of each matrix's model-width
    axis, in the parameters and in Adam's moments; without it, only tensor parallelism."""
    for fsdp in (False, True):
        overrides = [*TINY_LM, "mesh.data=4", "mesh.model=2", f"mesh.fsdp={str(fsdp).lower()}"]
        run = Run(load_train_config("lm_tiny", overrides), tmp_path / str(fsdp))
        run.checkpointer.close()
        # The feed-forward's first matrix [embed, mlp] and its Adam moments.
        path = "['blocks'][0]['ff']['up']['kernel']"
        found = [
            x
            for state in (run.state.params, run.state.opt_state)
            for p, x in jax.tree_util.tree_leaves_with_path(state)
            if path in jax.tree_util.keystr(p)
        ]
        assert len(found) == 3  # the parameter, mu and nu
        for x in found:
            assert tuple(x.sharding.spec) == (("data" if fsdp else None), "model")
            shard = x.addressable_shards[0].data.shape
            assert shard == (32 // (4 if fsdp else 1), 64 // 2)


# --- checkpoints -------------------------------------------------------------------------------


def _cli(workdir, steps, every):
    return [
        sys.executable,
        "-m",
        "fwjax.cli",
        "train",
        "--config",
        "retrieval_delta",
        "--workdir",
        str(workdir),
        # d_key 64 and 20 keys: steps slow enough (milliseconds) to kill the run mid-way.
        *[f"--set={s}" for s in TINY_RETRIEVAL if "async" not in s and "retrieval." not in s],
        f"--set=steps={steps}",
        f"--set=checkpoint.every_steps={every}",
        "--set=checkpoint.keep=3",
        "--set=eval_every=1000",
    ]


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env["XLA_FLAGS"] = FAST_COMPILE  # one device, like a user's laptop
    return env


@pytest.mark.slow  # ≈ 45 s; the fault-injection test (also slow) kills at random steps and saves
def test_sigkill_mid_run_then_restart_ends_with_the_same_parameters(tmp_path):
    steps, every = 200, 20
    # Both runs in fresh one-device processes: bit-identical results are expected.
    subprocess.run(_cli(tmp_path / "whole", steps, every), env=_env(), check=True, cwd=REPO)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(killed, steps, every), env=_env(), cwd=REPO)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "40").exists() and proc.poll() is None:
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoints" / str(steps)).exists(), "the run finished before the kill"
    subprocess.run(_cli(killed, steps, every), env=_env(), check=True, cwd=REPO)
    restored_whole, whole = _params(tmp_path / "whole")
    restored_killed, resumed = _params(killed)
    assert restored_whole == restored_killed == steps
    chex.assert_trees_all_equal(whole, resumed)  # bit-identical, leaf by leaf
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["resumed_from"] is not None and 40 <= summary["resumed_from"] < steps


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    config = load_train_config(
        "retrieval_delta", [*TINY_RETRIEVAL, "steps=8", "checkpoint.every_steps=4"]
    )
    train(config, tmp_path, devices=jax.devices()[:1])
    latest = tmp_path / "checkpoints" / "8"
    files = [p for p in latest.rglob("*") if p.is_file() and p.stat().st_size > 0]
    assert files
    for p in files:
        p.write_bytes(b"\x00garbage")
    with caplog.at_level(logging.WARNING, logger="fwjax"):
        step, _ = _params(tmp_path)
    assert step == 4
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "checkpoint step 8 could not be restored" in warning and "corrupt" in warning
    assert (tmp_path / "corrupt" / "8").is_dir() and not latest.exists()


def test_only_the_noise_of_a_set_aside_checkpoints_failed_reads_is_silenced(
    tmp_path, caplog, monkeypatch
):
    """After a failed read, asyncio logs the other read tasks' exceptions when they are collected
    and TensorStore raises "Event loop is closed" into the unraisable hook, whenever threads and
    garbage collection get to it; both are silenced for the set-aside checkpoint only."""
    import asyncio
    import types

    from fwjax.train.checkpoint import _FailedReadNoise

    passed_on = []
    monkeypatch.setattr(sys, "unraisablehook", passed_on.append)
    noise = _FailedReadNoise()
    noise.watch(tmp_path / "checkpoints" / "4")
    assert sys.unraisablehook == noise.unraisablehook

    async def read(path):
        raise ValueError(f'OUT_OF_RANGE: Error reading local file "{path}/state/d/0"')

    def unretrieved_task_failure(path):
        loop = asyncio.new_event_loop()
        task = loop.create_task(read(path))
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
        del task
        gc.collect()  # asyncio logs "Task exception was never retrieved" here

    try:
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            unretrieved_task_failure(tmp_path / "checkpoints" / "4")
            assert not caplog.records
            unretrieved_task_failure(tmp_path / "checkpoints" / "2")  # not set aside: logged
            (record,) = caplog.records
            assert record.getMessage().startswith("Task exception was never retrieved")
            logging.getLogger("asyncio").error("Task exception was never retrieved")
            assert len(caplog.records) == 2
    finally:
        logging.getLogger("asyncio").removeFilter(noise)

    closed = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
    other = types.SimpleNamespace(exc_value=RuntimeError("another error"))
    sys.unraisablehook(closed)
    sys.unraisablehook(other)
    assert passed_on == [other]


# --- non-finite losses -----------------------------------------------------------------------


def _poison_batch(monkeypatch, at_steps):
    """Batches at ``at_steps`` query a key id out of the embedding's range: NaN embeddings."""
    from fwjax.train.tasks import RetrievalTrainTask

    original = RetrievalTrainTask.train_batch

    def poisoned(self, index, *rows):
        batch = original(self, index, *rows)
        if index in at_steps:
            batch["queries"] = batch["queries"] + 10_000
        return batch

    monkeypatch.setattr(RetrievalTrainTask, "train_batch", poisoned)


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_good_checkpoint(tmp_path, monkeypatch):
    _poison_batch(monkeypatch, {6})
    config = load_train_config(
        "retrieval_delta", [*TINY_RETRIEVAL, "steps=12", "checkpoint.every_steps=4"]
    )
    with pytest.raises(NonFiniteLossError, match=r"at step 6 .*last good checkpoint is step 4"):
        train(config, tmp_path, devices=jax.devices()[:1])
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [4]


@pytest.mark.slow  # the STOP policy test below keeps non-finite handling in the default suite
def test_nonfinite_updates_are_skipped_when_configured(tmp_path, monkeypatch):
    _poison_batch(monkeypatch, {2, 3})
    overrides = [*TINY_RETRIEVAL, "steps=6", "nonfinite=skip", "checkpoint.every_steps=100"]
    summary = train(load_train_config("retrieval_delta", overrides), tmp_path)
    assert summary["steps"] == 6 and np.isfinite(summary["eval"]["loss"])
    monkeypatch.undo()
    _poison_batch(monkeypatch, {1, 2, 3, 4})
    overrides += ["max_consecutive_nonfinite=3"]
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite steps"):
        train(load_train_config("retrieval_delta", overrides), tmp_path / "again")


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_train_eval_generate(tmp_path, capsys):
    workdir = str(tmp_path)
    args = ["train", "--config", "lm_tiny", "--workdir", workdir]
    diagnostics = "--set=lm.model.fast_weight.diagnostics=true"
    assert main([*args, *[f"--set={s}" for s in TINY_LM], "--set=steps=3", diagnostics]) == 0
    memory = [r for r in read_metrics(workdir) if r["split"] == "memory"]
    assert memory and len(memory[-1]["blocks.0.attention.retrieval_cosine"]) == 2  # per head
    capsys.readouterr()
    assert main(["eval", "--workdir", workdir]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["step"] == 3 and record["bpc"] > 0
    assert main(["generate", "--workdir", workdir, "--prompt", "the fox", "--tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("the fox") and len(out.encode()) >= len("the fox") + 1


def test_two_processes_train_in_lockstep(tmp_path):
    """jax.distributed over 2 local CPU processes (2 devices each): the same losses everywhere
    and as one process on 4 devices, and each process reads only its own rows of the text (its
    token array fails any read outside its streams, in training and evaluation), documents
    packed (each line one document)."""
    port = 20000 + os.getpid() % 20000
    overrides = [*TINY_LM, "steps=4", "eval_every=4", r'lm.document_separator="\n"']
    script = tmp_path / "worker.py"
    script.write_text(
        "import os, sys, json\n"
        f"os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2 {FAST_COMPILE}'\n"
        "import numpy as np\n"
        "from fwjax.cli import load_train_config\n"
        "from fwjax.data import text\n"
        "from fwjax.train import initialize_distributed, train\n"
        "class OwnRowsOnly:\n"
        "    def __init__(self, tokens, lo, hi):\n"
        "        self.tokens, self.lo, self.hi = tokens, lo, hi\n"
        "    def __len__(self):\n"
        "        return len(self.tokens)\n"
        "    def __getitem__(self, index):\n"
        "        i = np.asarray(index)\n"
        "        assert self.lo <= i.min() and i.max() < self.hi, (self.lo, self.hi, i.min())\n"
        "        return self.tokens[index]\n"
        "plain_init = text.ContiguousStreams.__init__\n"
        "def guarded_init(self, tokens, batch_size, segment_len, **kw):\n"
        "    import jax\n"
        "    plain_init(self, tokens, batch_size, segment_len, **kw)\n"
        "    span, per = self.num_segments * segment_len, batch_size // jax.process_count()\n"
        "    lo = jax.process_index() * per * span\n"
        "    self.tokens = OwnRowsOnly(self.tokens, lo, lo + per * span + 1)\n"
        "text.ContiguousStreams.__init__ = guarded_init\n"
        "pid, wd = int(sys.argv[1]), sys.argv[2]\n"
        f"overrides = {overrides!r} + [\n"
        f"    'distributed.coordinator_address=\"localhost:{port}\"',\n"
        "    'distributed.num_processes=2', f'distributed.process_id={pid}']\n"
        "config = load_train_config('lm_tiny', overrides)\n"
        "initialize_distributed(config.distributed)\n"
        "import jax\n"
        "assert jax.process_count() == 2 and jax.device_count() == 4\n"
        "s = train(config, wd)\n"
        "print('RESULT', json.dumps([s['train']['loss'], s['eval']['loss']]), flush=True)\n"
    )
    env = _env()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), str(tmp_path / "run")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    results = [json.loads(o.split("RESULT ")[-1]) for o in outs]
    assert results[0] == results[1]
    single = train(
        load_train_config("lm_tiny", overrides),
        tmp_path / "single",
        devices=jax.devices()[:4],
    )
    np.testing.assert_allclose(
        results[0], [single["train"]["loss"], single["eval"]["loss"]], rtol=1e-5
    )
