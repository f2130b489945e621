"""Orbax checkpoints of a :class:`~fwjax.train.step.TrainState`, with fallback to the last good one.

A checkpoint holds the whole training state (parameters, optimizer state, carried fast weights,
step = data position) and a small JSON record. Saves are asynchronous when configured (training
continues while the previous save is written); Orbax commits a step only once it is complete,
so a run killed mid-save leaves the previous checkpoints intact. On restore, a latest checkpoint
that cannot be read (corrupt or truncated files) is skipped with a warning in favour of the
previous one.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from fwjax.train.config import CheckpointConfig
from fwjax.train.step import TrainState


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


class Checkpointer:
    """Periodic (optionally asynchronous) saves into ``directory``, keeping the latest ``keep``."""

    def __init__(self, directory: str | Path, config: CheckpointConfig):
        self.directory = Path(directory).absolute()
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

    def restore_latest(self, template: TrainState, shardings: TrainState):
        """The newest readable checkpoint as ``(state, record)``, or None if there is none.

        Args:
          template: a state of the right structure (e.g. freshly initialised).
          shardings: where each restored array goes.
        """
        target = _to_tree(abstract_state(template, shardings))
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(target), record=ocp.args.JsonRestore()
                    ),
                )
            except Exception as e:  # a corrupt or partial checkpoint: fall back to an older one
                warnings.warn(
                    f"checkpoint step {step} in {self.directory} could not be restored "
                    f"({type(e).__name__}: {e}); falling back to the previous checkpoint",
                    stacklevel=2,
                )
                continue
            return _from_tree(dict(restored.state), template), dict(restored.record)
        return None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
