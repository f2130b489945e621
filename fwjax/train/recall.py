"""Training and evaluation of a causal LM on the recall tasks of :mod:`fwjax.data.recall`.

A :class:`~fwjax.nn.TransformerLM` reads a whole sequence and is scored only at the answer
positions (``batch["mask"]``): the loss is the mean cross entropy of the answer tokens there and
the accuracy the fraction of answers whose argmax over the vocabulary is right (also per hop
count, for the multi-hop task). The optimizer is :func:`fwjax.train.optim.make_optimizer`
(AdamW, linear warmup, cosine decay, global-norm clipping). Batches are the tasks' pure
functions of ``(seed, step)``; the evaluation set is fixed (``eval=True`` stream, same seed).
Training runs in the one training loop (:func:`fwjax.train.loop.train_run`: checkpoints,
resume, the non-finite guard) as :class:`fwjax.train.tasks.RecallTrainTask`;
:func:`recall_train_config` gives the config from a protocol config file.

Usage::

    task = ZoologyMQARTask(vocab_size=1024, length=64, num_pairs=16)
    cfg = ModelConfig(vocab_size=task.vocab_size, d_model=64, num_heads=2, d_ff=0,
                      layer_kinds=(AttentionKind.BASE_CONV, AttentionKind.SOFTMAX),
                      positional=Positional.NONE, max_len=task.length)
    result = run_recall(recall_train_config(task, cfg, {"steps": 500}))
    result.accuracy, result.hop_accuracy
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fwjax.data.recall import MQARTask, MultiHopTask, RecallTask, ZoologyMQARTask
from fwjax.data.state_tracking import ModularSumTask
from fwjax.nn.config import ModelConfig
from fwjax.train.config import TaskKind, TrainConfig
from fwjax.train.config_io import load_train_config, with_overrides


def recall_train_config(
    task: RecallTask,
    model_config: ModelConfig,
    fields: Mapping[str, Any] | None = None,
    *,
    base: str | Path = "recall_mqar_delta",
) -> TrainConfig:
    """The training config of ``model_config`` on ``task`` under a protocol config file.

    The protocol is ``base`` (a shipped config name or a TOML path; the default,
    ``fwjax/configs/recall_mqar_delta.toml``, is the recall experiments' recipe: AdamW 3e-3 with
    100 warmup steps, cosine decay to 0.1×, weight decay 0.1, clipping at 1, 2000 steps of 64
    sequences, 512 evaluation sequences): its
    ``[recall]`` task and model are replaced by ``task`` and ``model_config``, then ``fields``
    are set as :func:`~fwjax.train.config_io.with_overrides` sets them, e.g.
    ``{"steps": 2000, "seed": 1, "optimizer.learning_rate": 1e-3}``.

    Args:
      task: an :class:`~fwjax.data.recall.MQARTask`,
        :class:`~fwjax.data.recall.MultiHopTask`,
        :class:`~fwjax.data.recall.ZoologyMQARTask` or
        :class:`~fwjax.data.state_tracking.ModularSumTask`.
      model_config: the :class:`~fwjax.nn.ModelConfig`; its vocabulary must cover the task's.
      fields: ``{"key.path": value}`` overrides of the protocol.
      base: the protocol config.

    Returns:
      A validated recall :class:`~fwjax.train.config.TrainConfig`.
    """
    config = load_train_config(base)
    if config.task is not TaskKind.RECALL:
        raise ValueError(f"base={str(base)!r} is a {config.task.value!r} config, not recall")
    fields_of = {
        MQARTask: "mqar",
        MultiHopTask: "multihop",
        ModularSumTask: "modular_sum",
        ZoologyMQARTask: "zoology_mqar",
    }
    if type(task) not in fields_of:
        raise TypeError(f"task={task!r} is not one of {sorted(c.__name__ for c in fields_of)}")
    tasks = dict.fromkeys(fields_of.values()) | {fields_of[type(task)]: task}
    recall = dataclasses.replace(config.recall, model=model_config, **tasks)
    return with_overrides(config, {"recall": recall, **(fields or {})})


@dataclasses.dataclass(frozen=True)
class RecallProtocol:
    """Deprecated: :func:`recall_train_config` (the protocol is a config file; these fields
    become its overrides).

    Attributes: ``steps``, ``batch_size``; AdamW's ``learning_rate`` (peak, after
    ``warmup_steps``, cosine decay to ``final_lr_fraction`` of it), ``weight_decay`` (every
    parameter) and ``clip_norm``; ``eval_every`` (also the logging and checkpoint period),
    ``eval_sequences`` in batches of ``eval_batch_size``, ``seed``, ``embedding_std`` (the
    recall task config's).
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
        warnings.warn(
            "RecallProtocol is deprecated; use recall_train_config(task, model_config, fields)",
            DeprecationWarning,
            stacklevel=3,
        )

    def train_config(self, task: RecallTask, model_config: ModelConfig) -> TrainConfig:
        """The :class:`~fwjax.train.config.TrainConfig` of this protocol."""
        names = ("learning_rate", "warmup_steps", "final_lr_fraction", "weight_decay", "clip_norm")
        fields = {f"optimizer.{name}": getattr(self, name) for name in names}
        for name in ("eval_sequences", "eval_batch_size", "embedding_std"):
            fields[f"recall.{name}"] = getattr(self, name)
        fields.update(
            steps=self.steps, batch_size=self.batch_size, seed=self.seed,
            eval_every=self.eval_every, log_every=self.eval_every,
        )  # fmt: skip
        fields["checkpoint.every_steps"] = self.eval_every
        return recall_train_config(task, model_config, fields)


@dataclasses.dataclass(frozen=True)
class RecallResult:
    """The outcome of :func:`run_recall`.

    Attributes:
      accuracy: final evaluation accuracy over all answer positions.
      loss: final evaluation cross entropy (nats per answer).
      hop_accuracy: final evaluation accuracy per hop count ``{h: acc}``.
      best_accuracy: the best evaluation accuracy seen (at any evaluation).
      history: ``(step, train loss, eval loss, eval accuracy)`` per evaluation.
      steps: optimizer steps taken.
      seconds: wall time of training and evaluation (compilation included).
      num_params: trainable parameters.
      transfer: the final model's evaluation metrics (``loss``, ``accuracy``,
        ``hop{h}_accuracy``) on each task given to :func:`run_recall` as ``transfer`` (e.g. the
        same task at other lengths), in that order.
    """

    accuracy: float
    loss: float
    hop_accuracy: dict[int, float]
    best_accuracy: float
    history: tuple[tuple[int, float, float, float], ...]
    steps: int
    seconds: float
    num_params: int
    transfer: tuple[dict, ...] = ()


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


def run_recall(
    config: TrainConfig,
    workdir: str | Path | None = None,
    *,
    transfer: Sequence[RecallTask] = (),
) -> RecallResult:
    """Trains the recall run ``config`` with :func:`fwjax.train.loop.train_run` and collects
    its :class:`RecallResult` (the history from ``metrics.jsonl``).

    Args:
      config: a recall :class:`~fwjax.train.config.TrainConfig` (e.g.
        :func:`recall_train_config`); ``log_every`` = ``eval_every`` makes each
        history entry's train loss the mean since the previous evaluation.
      workdir: the run's work directory (checkpoints, resume); None: a temporary one, deleted
        afterwards.
      transfer: tasks the final model is also evaluated on, without training (length
        generalisation: the trained task at other lengths); each gets the evaluation set of
        the run (``eval=True`` stream of its seed, ``recall.eval_sequences`` sequences).

    Returns:
      A :class:`RecallResult`.
    """
    # Imported here: the loop imports this module (the recall task's metrics).
    from fwjax.train.loop import finished_run

    if config.task is not TaskKind.RECALL:
        raise ValueError(f"run_recall needs a recall config; got task={config.task.value!r}")
    start = time.perf_counter()
    with finished_run(config, workdir) as (summary, run, records):
        params = run.state.params
        transferred = tuple(_evaluate(run, task) for task in transfer)
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
        num_params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)),
        transfer=transferred,
    )


def _evaluate(run, task: RecallTask) -> dict:
    """The metrics of ``run``'s final model on ``task``'s evaluation set (the run's seed and
    evaluation sizes), summarised as the recall task's evaluations are."""
    cfg = run.config.recall

    @jax.jit
    def sums(params, rest, batch):
        model = run.model_def.merge(params, rest, train=False)
        logits, _ = model(batch["tokens"])
        return answer_metrics(logits, batch["targets"], batch["mask"], batch["hops"], task.max_hops)

    total = None
    for i in range(cfg.eval_sequences // cfg.eval_batch_size):
        batch = task.batch(run.config.seed, i, cfg.eval_batch_size, eval=True)
        part = sums(run.state.params, run.state.rest, batch)
        total = part if total is None else jax.tree.map(jnp.add, total, part)
    return run.task.summarize(jax.device_get(total))


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
