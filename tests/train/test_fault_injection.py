"""Fault injection: a training run killed with SIGKILL at random points, asynchronous saves
included, and restarted each time, ends exactly where an uninterrupted run ends.

Slow (about a minute on 2 CPU cores): ``pytest -m slow tests/train/test_fault_injection.py``.
"""

from __future__ import annotations

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

from fwjax.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
STEPS = 120
OVERRIDES = [
    "retrieval.num_keys=20",
    "retrieval.d_key=64",
    "batch_size=16",
    f"steps={STEPS}",
    "log_every=5",
    "eval_every=40",
    "progress_bar=false",
    "checkpoint.every_steps=10",
    "checkpoint.keep=2",
    "checkpoint.async_save=true",
]


def _command(workdir: Path) -> list[str]:
    sets = [f"--set={s}" for s in OVERRIDES]
    return [sys.executable, "-m", "fwjax.cli", "train", "--config", "retrieval_delta",
            "--workdir", str(workdir), *sets]  # fmt: skip


def _env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)  # one device in every process: bit-identical results
    return env


def _saving(workdir: Path) -> bool:
    """An asynchronous save is in flight: Orbax writes into a ``*.orbax-checkpoint-tmp*``
    folder and renames it when the step is committed."""
    try:
        return any("orbax-checkpoint-tmp" in e.name for e in os.scandir(workdir / "checkpoints"))
    except FileNotFoundError:
        return False


def _last_train_step(workdir: Path) -> int:
    try:
        records = read_metrics(workdir)
    except ValueError:  # a line being written
        return -1
    return max((r["step"] for r in records if r["split"] == "train"), default=-1)


def _run_and_kill(workdir: Path, kind: str, target: int) -> bool:
    """Starts the run; SIGKILLs it at train step ``target`` (``kind="step"``) or during the first
    asynchronous save after that step (``kind="save"``). Returns whether it was killed."""
    proc = subprocess.Popen(_command(workdir), cwd=REPO, env=_env(), stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while proc.poll() is None:
            assert time.time() < deadline, "the run neither finished nor reached the kill point"
            reached = _last_train_step(workdir) >= target
            if reached and (kind == "step" or _saving(workdir)):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.0005 if reached else 0.01)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _final_params(workdir: Path):
    from fwjax.cli import config_from_workdir
    from fwjax.train import Run

    run = Run(config_from_workdir(workdir), workdir, devices=jax.devices()[:1])
    run.checkpointer.close()
    return run.restored_step, jax.device_get(jax.tree.leaves(run.state.params))


def _records(workdir: Path, split: str) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(workdir) if r["split"] == split]


@pytest.mark.slow
def test_sigkill_at_random_points_and_during_async_saves_loses_and_repeats_nothing(tmp_path):
    whole = tmp_path / "whole"
    subprocess.run(_command(whole), cwd=REPO, env=_env(), check=True, stderr=subprocess.DEVNULL)
    rng = np.random.default_rng(int(os.environ.get("FWJAX_FAULT_SEED", "0")))
    plan = [("step", int(rng.integers(1, 30))), ("save", int(rng.integers(30, 50)))]
    plan += [("step", int(rng.integers(50, 80))), ("save", int(rng.integers(80, 110)))]
    killed = tmp_path / "killed"
    kills = [(kind, target) for kind, target in plan if _run_and_kill(killed, kind, target)]
    assert any(kind == "save" for kind, _ in kills), f"no kill landed in a save: {kills}"
    subprocess.run(_command(killed), cwd=REPO, env=_env(), check=True, stderr=subprocess.DEVNULL)

    step_whole, params_whole = _final_params(whole)
    step_killed, params_killed = _final_params(killed)
    assert step_whole == step_killed == STEPS
    chex.assert_trees_all_equal(params_whole, params_killed)  # bit-identical, leaf by leaf
    for split in ("train", "eval"):
        steps = [s for s, _ in _records(killed, split)]
        assert steps == sorted(set(steps)), f"{split} steps repeated: {steps}"
        assert _records(killed, split) == _records(whole, split), split
