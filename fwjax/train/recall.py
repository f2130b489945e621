"""Training and evaluation of a causal LM on the recall tasks of :mod:`fwjax.data.recall`.

A :class:`~fwjax.nn.TransformerLM` reads a whole sequence and is scored only at the answer
positions (``batch["mask"]``): the loss is the mean cross entropy of the answer tokens there and
the accuracy the fraction of answers whose argmax over the vocabulary is right (also per hop
count, for the multi-hop task). The optimizer is :func:`fwjax.train.optim.make_optimizer`
(AdamW, linear warmup, cosine decay, global-norm clipping); a step is one jitted pure function
of ``(params, optimizer state, batch)``. Batches are the tasks' pure functions of
``(seed, step)``; the evaluation set is fixed (``eval=True`` stream, same seed).

Usage::

    task = MQARTask(num_pairs=16, num_distractors=16)
    cfg = ModelConfig(vocab_size=task.vocab_size, d_model=64, num_layers=2, num_heads=2,
                      d_ff=128, layer_kinds=(AttentionKind.SOFTMAX,) * 2, positional=True)
    result = train_recall(task, cfg, RecallProtocol(steps=500))
    result.accuracy, result.hop_accuracy
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fwjax.data.recall import RecallTask
from fwjax.nn.config import ModelConfig
from fwjax.nn.transformer import TransformerLM
from fwjax.train.config import OptimizerConfig, OptimizerKind
from fwjax.train.optim import make_optimizer
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


def train_recall(
    task: RecallTask,
    model_config: ModelConfig,
    protocol: RecallProtocol,
    *,
    log: Callable[[str], None] | None = None,
) -> RecallResult:
    """Trains a :class:`~fwjax.nn.TransformerLM` on ``task`` and evaluates it.

    Args:
      task: an :class:`~fwjax.data.recall.MQARTask` or
        :class:`~fwjax.data.recall.MultiHopTask`.
      model_config: the model; ``vocab_size`` must cover ``task.vocab_size``.
      protocol: steps, optimizer, evaluation.
      log: called with one progress line per evaluation (None: silent).

    Returns:
      A :class:`RecallResult` (final and best evaluation metrics, history, wall time).
    """
    if model_config.vocab_size < task.vocab_size:
        raise ValueError(f"{model_config.vocab_size=} must be >= {task.vocab_size=}")
    if model_config.dropout:
        raise ValueError(f"{model_config.dropout=} must be 0 (the recall loop draws no RNG)")
    start_time = time.perf_counter()
    model = TransformerLM(model_config, rngs=nnx.Rngs(protocol.seed))
    if protocol.embedding_std is not None:
        # Rescale the N(0, embed_init_std²) table to N(0, embedding_std²).
        scale = protocol.embedding_std / model_config.embed_init_std
        model.embed.embedding[...] = model.embed.embedding[...] * scale
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    tx = make_optimizer(protocol.optimizer(), protocol.steps)
    opt_state = tx.init(params)
    max_hops = task.max_hops

    def forward(params, tokens):
        logits, _ = nnx.merge(graphdef, params, rest)(tokens)
        return logits

    @jax.jit
    def train_step(params, opt_state, batch):
        def loss_fn(params):
            logits = forward(params, batch["tokens"])
            return masked_cross_entropy(logits, batch["targets"], batch["mask"])

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def eval_step(params, batch):
        logits = forward(params, batch["tokens"])
        return answer_metrics(
            logits, batch["targets"], batch["mask"], batch["hops"], max_hops=max_hops
        )

    # The fixed evaluation set, built once.
    eval_batches = [
        task.batch(protocol.seed, i, protocol.eval_batch_size, eval=True)
        for i in range(protocol.eval_sequences // protocol.eval_batch_size)
    ]

    def evaluate(params) -> dict:
        sums = None
        for batch in eval_batches:
            s = jax.device_get(eval_step(params, batch))
            sums = s if sums is None else jax.tree.map(np.add, sums, s)
        hop_acc = {
            h + 1: float(c / n)
            for h, (c, n) in enumerate(zip(sums["hop_correct"], sums["hop_count"], strict=True))
            if n > 0
        }
        return dict(
            loss=float(sums["loss_sum"] / sums["count"]),
            accuracy=float(sums["correct"] / sums["count"]),
            hop_accuracy=hop_acc,
        )

    history, losses, metrics = [], [], None
    for step in range(protocol.steps):
        batch = task.batch(protocol.seed, step, protocol.batch_size)
        params, opt_state, loss = train_step(params, opt_state, batch)
        losses.append(loss)
        done = step + 1
        if done % protocol.eval_every == 0 or done == protocol.steps:
            train_loss = float(np.mean(jax.device_get(losses)))
            losses = []
            if not math.isfinite(train_loss):
                raise FloatingPointError(f"non-finite training loss {train_loss} at step {done}")
            metrics = evaluate(params)
            history.append((done, train_loss, metrics["loss"], metrics["accuracy"]))
            if log is not None:
                log(
                    f"step {done}: train loss {train_loss:.4f}, eval loss {metrics['loss']:.4f}, "
                    f"accuracy {metrics['accuracy']:.4f}"
                )
    return RecallResult(
        accuracy=metrics["accuracy"],
        loss=metrics["loss"],
        hop_accuracy=metrics["hop_accuracy"],
        best_accuracy=max(h[3] for h in history),
        history=tuple(history),
        steps=protocol.steps,
        seconds=time.perf_counter() - start_time,
        num_params=num_params,
    )
