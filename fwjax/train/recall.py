"""Training and evaluation of a causal LM on the recall tasks of :mod:`fwjax.data.recall`.

A :class:`~fwjax.nn.TransformerLM` reads a whole sequence and is scored only at the answer
positions (``batch["mask"]``): the loss is the mean cross entropy of the answer tokens there and
the accuracy the fraction of answers whose argmax over the vocabulary is right (also per hop
count, for the multi-hop task). The optimizer is :func:`fwjax.train.optim.make_optimizer`
(AdamW, linear warmup, cosine decay, global-norm clipping). Batches are the tasks' pure
functions of ``(seed, step)``; the evaluation set is fixed (``eval=True`` stream, same seed).
Training runs in the one training loop (:func:`fwjax.train.loop.train_run`: checkpoints,
resume, the non-finite guard) as :class:`fwjax.train.tasks.RecallTrainTask`;
:meth:`RecallProtocol.train_config` gives the config.

Usage::

    task = MQARTask(num_pairs=16, num_distractors=16)
    cfg = ModelConfig(vocab_size=task.vocab_size, d_model=64, num_layers=2, num_heads=2,
                      d_ff=128, layer_kinds=(AttentionKind.SOFTMAX,) * 2, positional=True)
    result = run_recall(RecallProtocol(steps=500).train_config(task, cfg))
    result.accuracy, result.hop_accuracy
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fwjax.data.recall import MQARTask, RecallTask
from fwjax.nn.config import ModelConfig
from fwjax.train.config import (
    CheckpointConfig,
    MeshConfig,
    OptimizerConfig,
    OptimizerKind,
    RecallTaskConfig,
    TaskKind,
    TrainConfig,
)
from fwjax.validation import check_positive_ints


@dataclasses.dataclass(frozen=True)
class RecallProtocol:
    """How a recall model is trained and evaluated.

    Attributes:
      steps: optimizer steps.
      batch_size: training sequences per step.
      learning_rate: peak AdamW learning rate (after ``warmup_steps``, cosine decay to
        ``final_lr_fraction`` of it at ``steps``).
      warmup_steps: linear warmup steps.
      final_lr_fraction: the learning rate at the last step, relative to the peak.
      weight_decay: AdamW's decoupled weight decay.
      clip_norm: global gradient-norm clip.
      eval_every: evaluate every this many steps (and always after the last step).
      eval_sequences: evaluation sequences (a fixed set).
      eval_batch_size: sequences per evaluation batch.
      seed: parameter initialisation and data streams.
      embedding_std: if set, the input embedding is initialised with this standard deviation
        instead of the model's N(0, 1) (the LM multiplies it by ``√d_model``; with N(0, 1) the
        token embedding drowns the sinusoidal positions, which softmax attention needs here).
    """

    steps: int = 1000
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    eval_every: int = 250
    eval_sequences: int = 256
    eval_batch_size: int = 64
    seed: int = 0
    embedding_std: float | None = None

    def __post_init__(self):
        check_positive_ints(
            steps=self.steps,
            batch_size=self.batch_size,
            eval_every=self.eval_every,
            eval_sequences=self.eval_sequences,
            eval_batch_size=self.eval_batch_size,
        )
        if self.eval_sequences % self.eval_batch_size:
            raise ValueError(
                f"{self.eval_batch_size=} must divide {self.eval_sequences=} (whole batches)"
            )
        if self.embedding_std is not None and not self.embedding_std > 0:
            raise ValueError(f"{self.embedding_std=} must be > 0 or None")
        # The remaining fields are validated by the OptimizerConfig they build.
        self.optimizer()

    def train_config(self, task: RecallTask, model_config: ModelConfig) -> TrainConfig:
        """The :class:`~fwjax.train.config.TrainConfig` of this protocol for ``task`` and
        ``model_config`` (train loss logged at every evaluation; a checkpoint at every
        evaluation)."""
        kind = "mqar" if isinstance(task, MQARTask) else "multihop"
        recall = RecallTaskConfig(
            model=model_config,
            eval_sequences=self.eval_sequences,
            eval_batch_size=self.eval_batch_size,
            embedding_std=self.embedding_std,
            **{kind: task},
        )
        return TrainConfig(
            task=TaskKind.RECALL,
            recall=recall,
            steps=self.steps,
            batch_size=self.batch_size,
            seed=self.seed,
            eval_every=self.eval_every,
            log_every=self.eval_every,
            progress_bar=False,
            optimizer=self.optimizer(),
            checkpoint=CheckpointConfig(every_steps=self.eval_every, keep=1),
            mesh=MeshConfig(data=1),  # one device, as the stored results ran
        )

    def optimizer(self) -> OptimizerConfig:
        """The :class:`~fwjax.train.config.OptimizerConfig` of this protocol."""
        return OptimizerConfig(
            kind=OptimizerKind.ADAMW,
            learning_rate=self.learning_rate,
            warmup_steps=self.warmup_steps,
            final_lr_fraction=self.final_lr_fraction,
            weight_decay=self.weight_decay,
            decay_matrices_only=False,  # the stored recall results decayed every parameter
            clip_norm=self.clip_norm,
        )


@dataclasses.dataclass(frozen=True)
class RecallResult:
    """The outcome of :func:`train_recall`.

    Attributes:
      accuracy: final evaluation accuracy over all answer positions.
      loss: final evaluation cross entropy (nats per answer).
      hop_accuracy: final evaluation accuracy per hop count ``{h: acc}``.
      best_accuracy: the best evaluation accuracy seen (at any evaluation).
      history: ``(step, train loss, eval loss, eval accuracy)`` per evaluation.
      steps: optimizer steps taken.
      seconds: wall time of training and evaluation (compilation included).
      num_params: trainable parameters.
    """

    accuracy: float
    loss: float
    hop_accuracy: dict[int, float]
    best_accuracy: float
    history: tuple[tuple[int, float, float, float], ...]
    steps: int
    seconds: float
    num_params: int


def answer_metrics(logits, targets, mask, hops, max_hops: int) -> dict:
    """Summed cross entropy and correct counts over the answer positions.

    Args:
      logits: ``[B, T, vocab]``.
      targets: int ``[B, T]`` (any id where ``mask`` is False).
      mask: bool ``[B, T]``, the answer positions.
      hops: int ``[B, T]``, the hop count of each answer (1..max_hops; 0 elsewhere).
      max_hops: ``H``.

    Returns:
      ``dict(loss_sum, correct, count, hop_correct [H], hop_count [H])`` (float32 sums; divide
      for means).
    """
    weights = mask.astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [B, T]
    right = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32) * weights
    # One-hot of the hop count at answers: [B, T, H] (hop 0 = no answer falls outside).
    by_hop = jax.nn.one_hot(hops - 1, max_hops, dtype=jnp.float32) * weights[..., None]
    return dict(
        loss_sum=jnp.sum(nll * weights),
        correct=jnp.sum(right),
        count=jnp.sum(weights),
        hop_correct=jnp.einsum("bt,bth->h", right, by_hop),
        hop_count=jnp.sum(by_hop, axis=(0, 1)),
    )


def masked_cross_entropy(logits, targets, mask):
    """Mean cross entropy over the answer positions (``mask``); 0 when there are none."""
    weights = mask.astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def run_recall(config: TrainConfig, workdir: str | Path | None = None) -> RecallResult:
    """Trains the recall run ``config`` with :func:`fwjax.train.loop.train_run` and collects
    its :class:`RecallResult` (the history from ``metrics.jsonl``).

    Args:
      config: a recall :class:`~fwjax.train.config.TrainConfig` (e.g.
        :meth:`RecallProtocol.train_config`); ``log_every`` = ``eval_every`` makes each
        history entry's train loss the mean since the previous evaluation.
      workdir: the run's work directory (checkpoints, resume); None: a temporary one, deleted
        afterwards.

    Returns:
      A :class:`RecallResult`.
    """
    # Imported here: the loop imports this module (the recall task's metrics).
    from fwjax.train.loop import Run, mesh_devices, train_run
    from fwjax.train.metrics import read_metrics

    if config.task is not TaskKind.RECALL:
        raise ValueError(f"run_recall needs a recall config; got task={config.task.value!r}")
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="fwjax-recall-"))
        summary, run = train_run(config, workdir, devices=mesh_devices(config))
        if run is None:  # finished before: its final checkpoint
            run = Run(config, workdir, mesh_devices(config))
            run.checkpointer.close()
        records = read_metrics(Path(workdir))
    train_loss = {r["step"]: r["loss"] for r in records if r["split"] == "train"}
    evals = [r for r in records if r["split"] == "eval"]
    final = summary["eval"]
    return RecallResult(
        accuracy=final["accuracy"],
        loss=final["loss"],
        hop_accuracy={
            int(k.removeprefix("hop").removesuffix("_accuracy")): v
            for k, v in final.items()
            if k.startswith("hop") and k.endswith("_accuracy")
        },
        best_accuracy=max(r["accuracy"] for r in evals),
        history=tuple(
            (r["step"], train_loss.get(r["step"], math.nan), r["loss"], r["accuracy"])
            for r in evals
        ),
        steps=summary["steps"],
        seconds=time.perf_counter() - start,
        num_params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(run.state.params)),
    )


def train_recall(
    task: RecallTask,
    model_config: ModelConfig,
    protocol: RecallProtocol,
    *,
    log: Callable[[str], None] | None = None,
) -> RecallResult:
    """Deprecated: ``run_recall(protocol.train_config(task, model_config))``.

    Trains a :class:`~fwjax.nn.TransformerLM` on ``task`` in a temporary work directory of the
    training loop; ``log`` gets one line per evaluation after training.
    """
    warnings.warn(
        "train_recall is deprecated; use run_recall(protocol.train_config(task, model_config))",
        DeprecationWarning,
        stacklevel=2,
    )
    result = run_recall(protocol.train_config(task, model_config))
    for step, train_loss, loss, accuracy in result.history if log is not None else ():
        log(
            f"step {step}: train loss {train_loss:.4f}, eval loss {loss:.4f}, "
            f"accuracy {accuracy:.4f}"
        )
    return result
