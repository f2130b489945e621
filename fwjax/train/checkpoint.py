"""Orbax checkpoints of a :class:`~fwjax.train.step.TrainState`, with fallback to the last good one.

A checkpoint holds the whole training state (parameters, optimizer state, carried fast weights,
step = data position) and a small JSON record. Saves are asynchronous when configured (training
continues while the previous save is written); Orbax commits a step only once it is complete,
so a run killed mid-save leaves the previous checkpoints intact. On restore, a checkpoint that
cannot be read (corrupt or truncated files) is moved aside into ``workdir/corrupt/`` (never
deleted) with one warning line, and the previous one is restored; the step it occupied is free
again, so a resumed run saves its retrained state there.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from fwjax.train.config import CheckpointConfig
from fwjax.train.step import TrainState

log = logging.getLogger(__name__)


def _to_tree(state: TrainState) -> dict:
    # A dict, without empty subtrees (an empty carry or model state) that Orbax cannot store.
    return {k: v for k, v in state._asdict().items() if jax.tree.leaves(v)}


def _from_tree(tree: dict, template: TrainState) -> TrainState:
    return TrainState(**{k: tree.get(k, getattr(template, k)) for k in TrainState._fields})


def abstract_state(state: TrainState, shardings: TrainState) -> TrainState:
    """Shapes, dtypes and shardings of ``state`` (the restore target)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )


@contextlib.contextmanager
def _captured_stderr():
    """Redirects file descriptor 2 into a temporary file while the block runs.

    Yields a list that the block may set to ``[True]`` to discard what was captured (after
    waiting until background threads stop writing); otherwise the captured bytes are written
    back to stderr. A failed TensorStore read prints one traceback per pending callback from
    its own threads ("Event loop is closed") after Orbax has closed its event loop.
    """
    discard: list[bool] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield discard
        finally:
            if discard:  # wait until the callbacks of the failed read stop printing
                size, quiet_since = -1, time.monotonic()
                while time.monotonic() - quiet_since < 0.3:
                    time.sleep(0.05)
                    new = os.fstat(sink.fileno()).st_size
                    if new != size:
                        size, quiet_since = new, time.monotonic()
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if not discard:
                sink.seek(0)
                text = sink.read()
                if text:
                    sys.stderr.buffer.write(text)
                    sys.stderr.flush()


class _FailedReadNoise(logging.Filter):
    """Silences the after-effects of failed reads of checkpoints that were set aside.

    When one array of a checkpoint cannot be read, Orbax re-raises the first failure; what is
    left behind reports itself later, at times that depend on thread scheduling and garbage
    collection, possibly after the restore has returned:

    - asyncio logs each other read task's exception ("Task exception was never retrieved", with a
      traceback) when the task is collected; as a filter on the ``asyncio`` logger, this demotes
      such records to DEBUG on this module's logger when they name a set-aside checkpoint;
    - TensorStore's callbacks on Orbax's closed event loop raise "Event loop is closed" into
      :func:`sys.unraisablehook`; as that hook (installed on the first failed read), this
      drops them once a read has failed and passes everything else to the previous hook.
    """

    def __init__(self):
        super().__init__()
        self.paths: set[str] = set()
        self.previous_hook = None

    def watch(self, checkpoint: Path) -> None:
        """Silences the noise of failed reads of ``checkpoint`` (a step folder)."""
        self.paths.update({str(checkpoint), str(checkpoint.resolve())})
        logging.getLogger("asyncio").addFilter(self)  # no-op if already there
        if sys.unraisablehook != self.unraisablehook:  # not yet, or replaced since
            self.previous_hook, sys.unraisablehook = sys.unraisablehook, self.unraisablehook

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("Task exception was never retrieved"):
            return True
        error = record.exc_info[1] if record.exc_info else None
        if not any(f"{path}/" in str(error) for path in self.paths):
            return True
        log.debug("discarded the exception of a failed checkpoint read task: %s", error)
        return False

    def unraisablehook(self, unraisable) -> None:
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            log.debug("discarded a TensorStore callback on the closed event loop of a failed read")
            return
        self.previous_hook(unraisable)


_failed_read_noise = _FailedReadNoise()


def _first_line(error: BaseException, limit: int = 200) -> str:
    text = str(error).strip().splitlines()
    text = text[0] if text else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Checkpointer:
    """Periodic (optionally asynchronous) saves into ``directory``, keeping the latest ``keep``.

    Args:
      directory: where the step folders go (``workdir/checkpoints``).
      config: the run's :class:`~fwjax.train.config.CheckpointConfig`.
      corrupt_dir: where unreadable checkpoints are moved (default: ``directory/../corrupt``).
    """

    def __init__(
        self, directory: str | Path, config: CheckpointConfig, corrupt_dir: str | Path | None = None
    ):
        self.directory = Path(directory).absolute()
        self.corrupt_dir = (
            self.directory.parent / "corrupt" if corrupt_dir is None else Path(corrupt_dir)
        )
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep,
            enable_async_checkpointing=config.async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, state: TrainState, record: dict) -> None:
        """Saves ``state`` at its step (a no-op if that step is already saved)."""
        step = int(state.step)
        if step in self.manager.all_steps():
            return
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_to_tree(state)),
                record=ocp.args.JsonSave(record),
            ),
            force=True,
        )

    def _set_aside(self, step: int, error: BaseException) -> None:
        """Moves the unreadable checkpoint ``step`` into :attr:`corrupt_dir`, warning once."""
        source = self.directory / str(step)
        _failed_read_noise.watch(source)
        target = self.corrupt_dir / str(step)
        suffix = 1
        while target.exists():
            target = self.corrupt_dir / f"{step}.{suffix}"
            suffix += 1
        if jax.process_index() == 0 and source.exists():
            self.corrupt_dir.mkdir(parents=True, exist_ok=True)
            shutil.move(str(source), str(target))
        log.warning(
            "checkpoint step %d could not be restored (%s: %s); moved it to %s and restored "
            "the previous checkpoint",
            step,
            type(error).__name__,
            _first_line(error),
            target,
        )

    def restore_latest(self, template: TrainState, shardings: TrainState):
        """The newest readable checkpoint as ``(state, record)``, or None if there is none.

        Unreadable checkpoints on the way are moved to :attr:`corrupt_dir`.

        Args:
          template: a state of the right structure (e.g. freshly initialised).
          shardings: where each restored array goes.

        Returns:
          ``(state, record)`` of the newest readable step, or None.
        """
        target = _to_tree(abstract_state(template, shardings))
        set_aside = False
        try:
            for step in sorted(self.manager.all_steps(), reverse=True):
                try:
                    with _captured_stderr() as discard:
                        try:
                            restored = self.manager.restore(
                                step,
                                args=ocp.args.Composite(
                                    state=ocp.args.StandardRestore(target),
                                    record=ocp.args.JsonRestore(),
                                ),
                            )
                        except Exception:
                            discard.append(True)
                            raise
                except Exception as e:  # a corrupt or partial checkpoint: set it aside
                    self._set_aside(step, e)
                    set_aside = True
                    continue
                return _from_tree(dict(restored.state), template), dict(restored.record)
            return None
        finally:
            if set_aside:
                self.manager.reload()
                gc.collect()  # the failed reads' tasks, while their noise is known to be noise

    def latest_step(self) -> int | None:
        """The newest saved step, or None."""
        return self.manager.latest_step()

    def wait(self) -> None:
        """Blocks until asynchronous saves are committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
