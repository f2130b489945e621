"""The training loop: resume, step, log, evaluate, checkpoint — the same code on a laptop and a
multi-host pod.

:func:`train` runs a :class:`~fwjax.train.config.TrainConfig` in a work directory:

* ``workdir/config.json``: the resolved config (``fwjax eval`` / ``generate`` read it back); a
  different model, data or optimizer config in the same workdir is refused
  (:mod:`fwjax.train.workdir`);
* ``workdir/checkpoints/``: Orbax checkpoints (resumed from automatically: restarting the same
  command after a crash or an interrupt continues from the last good checkpoint and ends with
  the same parameters as an uninterrupted run); unreadable ones go to ``workdir/corrupt/``;
* ``workdir/metrics.jsonl``: train and eval metrics; ``workdir/summary.json``: the final line;
* ``workdir/tokenizer.json``: a language model's vocabulary, written when training starts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fwjax.train import mesh as mesh_lib
from fwjax.train import workdir as workdir_lib
from fwjax.train.checkpoint import Checkpointer
from fwjax.train.config import DistributedConfig, NonFinitePolicy, TaskKind, TrainConfig
from fwjax.train.config_io import unstructure
from fwjax.train.metrics import MetricsWriter, Progress, WandbOptions, read_metrics, say
from fwjax.train.optim import make_optimizer
from fwjax.train.step import create_train_state, make_eval_step, make_train_step, scan_steps
from fwjax.train.tasks import make_task

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """A non-finite loss or gradient stopped the run (policy STOP, or too many SKIPs)."""


def initialize_distributed(config: DistributedConfig) -> None:
    """Calls ``jax.distributed.initialize`` when configured (before any other JAX call)."""
    if config.coordinator_address is not None:
        jax.distributed.initialize(
            coordinator_address=config.coordinator_address,
            num_processes=config.num_processes,
            process_id=config.process_id,
        )
    elif config.auto:
        jax.distributed.initialize()


class Run:
    """A built run: task, mesh, jitted steps and the (restored or fresh) state."""

    def __init__(self, config: TrainConfig, workdir: str | Path, devices=None):
        self.config = config
        self.workdir = Path(workdir)
        self.task = make_task(config)
        self.mesh = mesh_lib.make_mesh(config.mesh, devices)
        self.rows = mesh_lib.process_rows()  # this process reads only its rows of each batch
        mesh_lib.check_batch_size(config.batch_size, self.mesh)
        self.tx = make_optimizer(config.optimizer, config.steps)
        self.state, self.model_def, self.shardings = create_train_state(
            self.task,
            self.tx,
            self.mesh,
            config.seed,
            config.batch_size,
            mesh_lib.config_rules(config.mesh),
        )
        self.checkpointer = Checkpointer(self.workdir / "checkpoints", config.checkpoint)
        self.restored_step = None
        restored = self.checkpointer.restore_latest(self.state, self.shardings)
        if restored is not None:
            self.state, _ = restored
            self.restored_step = int(self.state.step)
        replicated = mesh_lib.replicated(self.mesh)
        self.train_step = jax.jit(
            make_train_step(self.task, self.model_def, self.tx, config.seed),
            in_shardings=(self.shardings, None),
            out_shardings=(self.shardings, replicated),
            donate_argnames="state",
        )
        self.train_steps = jax.jit(
            scan_steps(make_train_step(self.task, self.model_def, self.tx, config.seed)),
            in_shardings=(self.shardings, None),
            out_shardings=(self.shardings, replicated),
            donate_argnames="state",
        )
        self.eval_step = jax.jit(
            make_eval_step(self.task, self.model_def),
            out_shardings=(replicated, self.shardings.carry),
        )

    @classmethod
    def restore(
        cls,
        workdir: str | Path,
        overrides: Sequence[str] = ("progress_bar=false",),
        devices=None,
    ) -> Run:
        """The run trained in ``workdir``, at its latest checkpoint (for evaluation, generation,
        export and analysis).

        Args:
          workdir: a training workdir (``config.json`` and ``checkpoints/``).
          overrides: ``key.path=value`` overrides of the stored config (runtime keys only;
            anything that shapes the model would not match the checkpoint).
          devices: the devices of the mesh; by default the run's mesh with the data axis shrunk
            to the largest size that divides the run's batch (a run trained on fewer devices
            than this machine has stays readable).

        Returns:
          The :class:`Run`; its ``restored_step`` is the checkpoint's step. Close its
          ``checkpointer`` when done.

        Raises:
          FileNotFoundError: no config or no checkpoint in ``workdir``.
        """
        config = workdir_lib.read_config(workdir, overrides)
        run = cls(config, workdir, _restore_devices(config) if devices is None else devices)
        if run.restored_step is None:
            run.checkpointer.close()
            raise FileNotFoundError(f"no checkpoint found in {workdir}/checkpoints")
        return run

    def batch(self, index: int) -> dict:
        return mesh_lib.shard_batch(self.mesh, self.task.train_batch(index, self.rows))

    def batches(self, index: int, count: int) -> dict:
        """Batches ``index … index + count − 1`` stacked on a leading axis (``train_steps``)."""
        sharded = [self.batch(index + i) for i in range(count)]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *sharded)

    def evaluate(self, index: int = 0) -> dict:
        """Metrics over the task's evaluation batches of evaluation number ``index`` (memory
        carried through them for LMs trained with ``carry_state``)."""
        dp = mesh_lib.data_parallel_size(self.mesh)
        carry = jax.tree.map(jnp.zeros_like, self.state.carry)
        totals = None
        for host_batch in self.task.eval_data(dp, index, self.rows):
            batch = mesh_lib.shard_batch(self.mesh, host_batch)
            sums, carry = self.eval_step(
                self.state.params, self.state.rest, batch, carry, jnp.int32(index)
            )
            sums = jax.device_get(sums)
            totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
        return self.task.summarize(totals)

    def model(self, *, train: bool = False):
        """The current model as an ``nnx.Module`` (for generation and inspection)."""
        return self.model_def.merge(self.state.params, self.state.rest, train=train)


def _restore_devices(config: TrainConfig) -> list:
    """The run's mesh devices with the data axis shrunk to the largest size that divides the
    run's batch (e.g. batch 4 trained on a laptop, read on 8 devices: 4 of them)."""
    devices = jax.devices()
    model = config.mesh.model
    data = config.mesh.data if config.mesh.data != -1 else max(len(devices) // model, 1)
    data = max(d for d in range(1, data + 1) if config.batch_size % d == 0)
    return devices[: data * model]


def _record(run: Run) -> dict:
    return {"step": int(run.state.step), "data_position": int(run.state.step)}


def _check_finite(run: Run, history: list[dict]) -> None:
    """Raises :class:`NonFiniteLossError` per the policy, naming the step."""
    cfg = run.config
    bad = [m for m in history if not m["finite"]]
    if not bad:
        return
    first = bad[0]
    if cfg.nonfinite is NonFinitePolicy.STOP:
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {first['step']} (loss={first['step_loss']}, "
            f"grad_norm={first['grad_norm']}); the "
            f"update was not applied and the run stopped (nonfinite='stop'). The last good "
            f"checkpoint is step {run.checkpointer.latest_step()} in {run.checkpointer.directory}"
        )
    count = int(run.state.nonfinite_count)
    log.warning("skipped non-finite update(s) at step(s) %s", [m["step"] for m in bad])
    if count >= cfg.max_consecutive_nonfinite:
        raise NonFiniteLossError(
            f"{count} consecutive non-finite steps (the last at step {bad[-1]['step']}) reached "
            f"max_consecutive_nonfinite={cfg.max_consecutive_nonfinite}; stopping"
        )


class Interrupted(RuntimeError):
    """SIGINT or SIGTERM stopped the run after a step; a checkpoint of that step was saved.

    Attributes:
      signum: the signal received.
      step: the step the run stopped at (and saved).
    """

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step
        super().__init__(
            f"interrupted at step {step}; checkpoint saved; re-run the same command to resume"
        )

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        return 128 + self.signum


class _StopSignals:
    """While active, the first SIGINT/SIGTERM only records itself (the loop then saves and stops
    after the current step); a second one exits the process at once (no save)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received is not None:
            say(
                f"fwjax train: second signal ({signal.Signals(signum).name}); aborting without "
                "a checkpoint"
            )
            os._exit(128 + signum)
        self.received = signum
        say(
            f"fwjax train: {signal.Signals(signum).name} received; saving a checkpoint after "
            "this step (send it again to abort at once)"
        )

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def _save_tokenizer(run: Run) -> None:
    """Writes ``workdir/tokenizer.json`` (a language model's vocabulary) if it is missing."""
    path = run.workdir / "tokenizer.json"
    if run.config.task is TaskKind.LM and not path.is_file() and jax.process_index() == 0:
        run.task.tokenizer.save(path)


def _last_train_record(workdir: Path) -> dict:
    records = [r for r in read_metrics(workdir) if r.get("split") == "train"]
    if not records:
        return {}
    return {k: v for k, v in records[-1].items() if k not in ("step", "split", "time")}


def train(
    config: TrainConfig, workdir: str | Path, *, devices=None, overwrite: bool = False
) -> dict:
    """Trains (or resumes) the run of ``config`` in ``workdir``; returns the final summary
    (:func:`train_run` without the :class:`Run`)."""
    return train_run(config, workdir, devices=devices, overwrite=overwrite)[0]


def train_run(
    config: TrainConfig, workdir: str | Path, *, devices=None, overwrite: bool = False
) -> tuple[dict, Run | None]:
    """Trains (or resumes) the run of ``config`` in ``workdir``.

    A workdir holds one run (:mod:`fwjax.train.workdir`): a config that differs from the
    stored one in the model, data or optimizer is refused before any file is touched, unless
    ``overwrite`` deletes the old run first; a larger ``steps`` extends the run. A run that has
    already reached ``steps`` (or stopped early, ``config.early_stopping``) with a summary prints
    that summary again and changes no file. SIGINT / SIGTERM stop the run after the current step
    with a checkpoint (:class:`Interrupted`).

    Args:
      config: the run.
      workdir: its directory (created if missing).
      devices: the devices of the mesh (default: all).
      overwrite: delete the workdir's previous run (its checkpoints, metrics, summary, config)
        before starting.

    Returns:
      ``(summary, run)``: the summary (``steps``, ``resumed_from``, ``seconds``, ``train`` and
      ``eval`` metrics, and with early stopping the ``stop_reason``: ``target``, ``patience`` or
      ``max_steps``) and the trained :class:`Run` (None when the run had finished before).

    Raises:
      WorkdirError: the workdir holds a different run, or one beyond ``config.steps``.
      NonFiniteLossError: per ``config.nonfinite``.
      Interrupted: after SIGINT / SIGTERM, once the checkpoint is saved.
      ValueError / FileNotFoundError: bad config values, a global batch not divisible by the
        data-parallel size, a missing data path.
    """
    workdir = Path(workdir)
    cfg = config
    main_process = jax.process_index() == 0
    if overwrite and main_process and workdir.is_dir():
        removed = workdir_lib.remove_run(workdir)
        if removed:
            log.warning("--overwrite: deleted the previous run's %s in %s", removed, workdir)
    previous = workdir_lib.stored_config(workdir)
    changed = {} if previous is None else workdir_lib.check_config(workdir, previous, config)
    run = Run(config, workdir, devices)
    start_step = int(run.state.step)
    if start_step > cfg.steps:
        run.checkpointer.close()
        raise workdir_lib.WorkdirError(
            f"workdir {str(workdir)!r} holds a run at step {start_step}, beyond "
            f"steps={cfg.steps}; train with steps >= {start_step} to extend it, or use another "
            "--workdir"
        )
    stored = workdir_lib.read_summary(workdir)
    finished = start_step == cfg.steps or (stored or {}).get("stop_reason") in _EARLY_STOPS
    if finished and not changed and stored and stored.get("steps") == start_step:
        run.checkpointer.close()
        if main_process:
            print(workdir_lib.summary_line(stored, cfg.steps))
        return stored, None
    if main_process:
        workdir.mkdir(parents=True, exist_ok=True)
        workdir_lib.write_config(workdir, config)
    _save_tokenizer(run)
    writer = MetricsWriter(workdir, tensorboard=cfg.tensorboard, wandb=_wandb_options(cfg, workdir))
    dropped = writer.truncate_after(run.restored_step)
    if dropped:
        log.info("dropped %d metrics records written after the restored step", dropped)
    if changed:
        shown = {k: list(v) for k, v in changed.items()}
        log.info("config changed since the last run in %s: %s", workdir, shown)
        writer.write(start_step, "config", {"changed": json.dumps(shown)})
    if run.restored_step is not None:
        log.info("resumed from the checkpoint at step %d", run.restored_step)
    progress = Progress(cfg.steps, start_step, cfg.progress_bar)
    tokens_per_step = run.task.tokens_per_batch(cfg.batch_size)
    history, t0, t_log, step_log = [], time.time(), time.time(), start_step
    last_train, last_eval = {}, {}
    stopper = _EarlyStopping(cfg, [r for r in read_metrics(workdir) if r.get("split") == "eval"])
    try:
        with _StopSignals() as stop:
            step = start_step
            while step < cfg.steps and stopper.reason is None:
                if cfg.steps_per_call == 1:
                    run.state, metrics = run.train_step(run.state, run.batch(step))
                    history.append(dict(metrics, step=step))
                    count = 1
                else:
                    count = _call_length(cfg, step)
                    batches = run.batches(step, count)
                    run.state, metrics = run.train_steps(run.state, batches)
                    history.append(dict(metrics, step=step, _stacked=count))
                step = done = step + count
                at_log = done % cfg.log_every == 0 or done == cfg.steps
                at_ckpt = done % cfg.checkpoint.every_steps == 0 or done == cfg.steps
                at_eval = done % cfg.eval_every == 0 or done == cfg.steps
                if at_log or at_ckpt or at_eval or stop.received:
                    history = _unstack(jax.device_get(history))
                    _check_finite(run, history)
                if at_log or at_ckpt or at_eval:
                    now = time.time()
                    diagnostics = history[-1].pop("diagnostics", None)
                    for m in history:
                        m.pop("diagnostics", None)
                    # float64 sums over the steps (per-hop counts are arrays)
                    sums = {k: sum(np.float64(m[k]) for m in history) for k in history[0]}
                    last_train = run.task.summarize(sums)
                    last_train["grad_norm"] = sums["grad_norm"] / len(history)
                    last_train["tokens_per_s"] = tokens_per_step * (done - step_log) / (now - t_log)
                    writer.write(done, "train", last_train)
                    if diagnostics:  # the last step's memory diagnostics, per layer and head
                        writer.write(done, "memory", flatten_diagnostics(diagnostics))
                    progress.update(
                        done,
                        done - step_log,
                        {"loss": last_train["loss"], "tokens/s": last_train["tokens_per_s"]},
                    )
                    history, t_log, step_log = [], now, done
                if at_eval:
                    last_eval = run.evaluate(_eval_index(cfg, done))
                    writer.write(done, "eval", last_eval)
                    stopper.update(done, last_eval)
                if at_ckpt or stop.received or stopper.reason is not None:
                    run.checkpointer.save(run.state, _record(run))
                if stop.received:
                    run.checkpointer.wait()
                    raise Interrupted(stop.received, done)
    finally:
        progress.close()
        run.checkpointer.close()
        writer.close()
    if step == start_step:  # finished before, without a summary: evaluate it now
        last_train = _last_train_record(workdir)
        last_eval = run.evaluate(_eval_index(cfg, start_step))
    seconds = time.time() - t0
    summary = dict(
        steps=int(run.state.step),
        resumed_from=run.restored_step,
        seconds=round(seconds, 2),
        train=last_train,
        eval=last_eval,
    )
    if cfg.early_stopping.enabled:
        summary["stop_reason"] = stopper.reason or "max_steps"
    writer.write(int(run.state.step), "summary", {"seconds": seconds})
    if main_process:
        workdir_lib.write_text_atomic(workdir / "summary.json", json.dumps(summary, indent=2))
        print(workdir_lib.summary_line(summary, cfg.steps))
    return summary, run


@contextlib.contextmanager
def finished_run(config: TrainConfig, workdir: str | Path | None = None):
    """Trains (or resumes) ``config`` to its end on :func:`mesh_devices`, then yields
    ``(summary, run, records)``: the summary, the :class:`Run` at its final state (restored
    from the final checkpoint when the run had finished before) and the ``metrics.jsonl``
    records. ``workdir`` None: a temporary directory, deleted on exit."""
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="fwjax-run-"))
        summary, run = train_run(config, workdir, devices=mesh_devices(config))
        if run is None:  # finished before: its final checkpoint
            run = Run(config, workdir, mesh_devices(config))
            run.checkpointer.close()
        yield summary, run, read_metrics(Path(workdir))


def mesh_devices(config: TrainConfig) -> list | None:
    """The first ``data · model`` devices for a mesh with an explicit ``data`` size (e.g. a
    one-device protocol on a machine with more); None (all devices) for ``data=-1``."""
    if config.mesh.data == -1:
        return None
    return jax.devices()[: config.mesh.data * config.mesh.model]


def _call_length(cfg: TrainConfig, step: int) -> int:
    """Steps of the jitted call starting at ``step``: ``steps_per_call``, cut at the next log,
    evaluation or checkpoint step (or the end)."""
    every = (cfg.log_every, cfg.eval_every, cfg.checkpoint.every_steps)
    boundary = min([cfg.steps] + [(step // e + 1) * e for e in every])
    return min(cfg.steps_per_call, boundary - step)


def _eval_index(cfg: TrainConfig, done: int) -> int:
    """The number of the evaluation after step ``done`` (0 for the first)."""
    return max(done - 1, 0) // cfg.eval_every


def _unstack(history: list[dict]) -> list[dict]:
    """Host metrics with the stacked records of ``train_steps`` calls split into one per step."""
    out = []
    for record in history:
        count = record.pop("_stacked", None)
        if count is None:
            out.append(record)
            continue
        step = record.pop("step")
        out += [
            dict(jax.tree.map(lambda x, i=i: x[i], record), step=step + i) for i in range(count)
        ]
    return out


_EARLY_STOPS = ("target", "patience")


class _EarlyStopping:
    """The stopping rule of ``config.early_stopping`` over the evaluations; ``reason`` is
    ``"target"`` or ``"patience"`` once it fires (None before). Replays the evaluations stored
    before a resume, so a resumed run stops where the uninterrupted one would."""

    def __init__(self, config: TrainConfig, evaluations: list[dict]):
        self.config = config.early_stopping
        self.best, self.strikes, self.reason = float("inf"), 0, None
        for record in evaluations:
            self.update(record["step"], record)

    def update(self, step: int, metrics: dict) -> None:
        cfg = self.config
        if not cfg.enabled:
            return
        if cfg.metric not in metrics:
            raise ValueError(f"early_stopping.metric={cfg.metric!r} not in {sorted(metrics)}")
        value = float(metrics[cfg.metric])
        if not math.isfinite(value):
            raise NonFiniteLossError(f"evaluation {cfg.metric}={value} at step {step}")
        if value < self.best:
            self.best, self.strikes = value, 0
        else:
            self.strikes += 1
        if cfg.target is not None and value <= cfg.target:
            self.reason = "target"
        elif cfg.patience is not None and self.strikes >= cfg.patience:
            self.reason = "patience"


def _wandb_options(config: TrainConfig, workdir: Path) -> WandbOptions | None:
    """The W&B run of ``config`` (None unless ``config.wandb``), named after the workdir unless
    ``wandb_name`` is set."""
    if not config.wandb:
        return None
    return WandbOptions(
        project=config.wandb_project,
        name=config.wandb_name or workdir.resolve().name,
        mode=None if config.wandb_mode is None else config.wandb_mode.value,
        config=unstructure(config),
    )


def flatten_diagnostics(tree: dict, prefix: str = "") -> dict[str, list[float]]:
    """``{"blocks": {0: {"attention": {"memory": (stats,)}}}}`` -> ``{"blocks.0.attention.
    state_norm_final": [per head], ...}``."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if key == "memory" and isinstance(value, tuple | list):
            value = value[-1]  # the last call's record
            for stat, per_head in value.items():
                flat[f"{prefix}.{stat}" if prefix else stat] = np.asarray(per_head).tolist()
        elif isinstance(value, dict):
            flat.update(flatten_diagnostics(value, name))
    return flat
