"""Tasks: what a training run builds, feeds and optimises.

A task owns its model constructor, its data (batches as pure functions of an index, so the data
position of a run is its step), its loss, and an optional *carry* threaded from one training
step to the next (the fast weights of language-model streams). Two tasks: the synthetic
associative retrieval task of the paper, and byte-level language modelling.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fwjax.data import text as text_data
from fwjax.data.retrieval import RetrievalTask, retrieval_loss
from fwjax.nn import (
    AttentionKind,
    FavorRedraw,
    RetrievalConfig,
    RetrievalModel,
    TransformerLM,
    redraw_favor_projections,
)
from fwjax.train.config import LMTaskConfig, RetrievalTaskConfig, TaskKind, TrainConfig

# Evaluation batches come from a stream of their own, disjoint from the training stream.
_EVAL_SEED_OFFSET = 1_000_003


def _pad_rows(batch: dict, multiple: int) -> dict:
    """Pads every array's leading axis to a multiple of ``multiple`` (copies of row 0, with
    ``mask`` False so they count for nothing)."""
    n = next(iter(batch.values())).shape[0]
    extra = -n % multiple
    if not extra:
        return batch
    out = {k: np.concatenate([v, np.repeat(v[:1], extra, axis=0)]) for k, v in batch.items()}
    out["mask"][n:] = False
    return out


class RetrievalTrainTask:
    """The paper's synthetic retrieval task with a :class:`~fwjax.nn.RetrievalModel`.

    Metrics: ``loss`` (½‖onehot(target) − ŷ‖² per query; 0.5 for predicting zeros) and
    ``accuracy`` (argmax of ŷ equals the target).
    """

    kind = TaskKind.RETRIEVAL

    def __init__(self, config: TrainConfig):
        cfg: RetrievalTaskConfig = config.retrieval
        self.config = cfg
        self.data = RetrievalTask(cfg.setting, cfg.num_keys)
        self.model_config = RetrievalConfig(
            num_keys=cfg.num_keys,
            num_values=cfg.num_keys,
            d_key=cfg.d_key,
            attention=cfg.attention,
            fast_weight=cfg.fast_weight,
        )
        self.seed = config.seed
        self.batch_size = config.batch_size
        self.eval_batches = config.eval_batches
        self.redraw = (
            cfg.attention is AttentionKind.FAST_WEIGHT
            and cfg.fast_weight.feature_map.needs_projection
            and cfg.fast_weight.favor_redraw is FavorRedraw.PER_STEP
        )

    def tokens_per_batch(self, batch_size: int) -> int:
        return batch_size * self.data.length

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        return RetrievalModel(self.model_config, rngs=rngs)

    def redraw_projections(self, model, key) -> None:
        if self.redraw:
            model.redraw_projection(key)

    def init_carry(self, model, batch_size: int):
        return None

    def train_batch(self, index: int) -> dict:
        return self.data.batch(self.seed, index, self.batch_size)

    def eval_data(self, data_parallel: int) -> list[dict]:
        seed = self.seed + _EVAL_SEED_OFFSET
        n = self.config.eval_sequences
        return [
            _pad_rows(self.data.batch(seed, i, n, eval=True), data_parallel)
            for i in range(self.eval_batches)
        ]

    def loss(self, model, batch, carry):
        """Returns ``(loss, (metric sums, carry))``; sums are over the real queries."""
        y = model(batch["keys"], batch["values"], batch["queries"])
        mask = batch["mask"].astype(jnp.float32)
        loss = retrieval_loss(y, batch["targets"], batch["mask"])
        correct = (jnp.argmax(y, axis=-1) == batch["targets"]).astype(jnp.float32)
        count = mask.sum()
        sums = dict(loss=loss * count, accuracy=jnp.sum(correct * mask), count=count)
        return loss, (sums, carry)

    @staticmethod
    def summarize(sums: dict) -> dict:
        count = max(float(sums["count"]), 1.0)
        return dict(loss=float(sums["loss"]) / count, accuracy=float(sums["accuracy"]) / count)


def _reset_rows(state, fresh, reset):
    """Replaces the batch rows of ``state`` where ``reset [B]`` is True by those of ``fresh``."""

    def pick(s, f):
        if s.ndim == 0 or s.shape[0] != reset.shape[0]:
            return s
        return jnp.where(reset.reshape((-1,) + (1,) * (s.ndim - 1)), f, s)

    return jax.tree.map(pick, state, fresh)


class LMTrainTask:
    """Byte-level language modelling over contiguous streams with a
    :class:`~fwjax.nn.TransformerLM`.

    With ``carry_state`` the fast weights flow from one segment of a stream to the next (in
    training and evaluation) and are reset at the start of an epoch. Metrics: ``loss`` (nats per
    token), ``bpc`` (bits per byte) and ``perplexity``.
    """

    kind = TaskKind.LM

    def __init__(self, config: TrainConfig):
        cfg: LMTaskConfig = config.lm
        self.config = cfg
        if cfg.carry_state and any(k is AttentionKind.SOFTMAX for k in cfg.model.layer_kinds):
            raise ValueError(
                f"carry_state=True needs fast weight layers only; got {cfg.model.layer_kinds=}"
            )
        tokens = text_data.load_tokens(cfg.text_path)
        train, valid = text_data.train_validation_split(tokens, cfg.validation_fraction)
        self.train_streams = text_data.ContiguousStreams(train, config.batch_size, cfg.segment_len)
        self.valid_streams = text_data.ContiguousStreams(valid, config.batch_size, cfg.segment_len)
        self.model_config = cfg.model
        self.batch_size = config.batch_size
        self.eval_batches = min(config.eval_batches, len(self.valid_streams))
        fw = cfg.model.fast_weight
        self.redraw = fw.feature_map.needs_projection and fw.favor_redraw is FavorRedraw.PER_STEP

    def tokens_per_batch(self, batch_size: int) -> int:
        return batch_size * self.config.segment_len

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        return TransformerLM(self.model_config, rngs=rngs)

    def redraw_projections(self, model, key) -> None:
        if self.redraw:
            redraw_favor_projections(model, key)

    def init_carry(self, model, batch_size: int):
        return model.init_state(batch_size) if self.config.carry_state else None

    def train_batch(self, index: int) -> dict:
        return self.train_streams.batch(index)

    def eval_data(self, data_parallel: int) -> list[dict]:
        # Consecutive validation segments: with carry_state the memory flows through them.
        return [self.valid_streams.batch(i) for i in range(self.eval_batches)]

    def loss(self, model, batch, carry):
        state = None
        if carry is not None:
            state = _reset_rows(carry, model.init_state(batch["inputs"].shape[0]), batch["reset"])
        logits, state = model(batch["inputs"], state)
        per_token = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        loss = jnp.mean(per_token)
        new_carry = None if carry is None else jax.lax.stop_gradient(state)
        sums = dict(loss=jnp.sum(per_token), count=jnp.asarray(per_token.size, jnp.float32))
        return loss, (sums, new_carry)

    @staticmethod
    def summarize(sums: dict) -> dict:
        loss = float(sums["loss"]) / max(float(sums["count"]), 1.0)
        return dict(loss=loss, bpc=loss / math.log(2), perplexity=math.exp(min(loss, 50.0)))


Task = RetrievalTrainTask | LMTrainTask


def make_task(config: TrainConfig) -> Task:
    """The task of ``config.task``."""
    return {TaskKind.RETRIEVAL: RetrievalTrainTask, TaskKind.LM: LMTrainTask}[config.task](config)


def describe(task: Task) -> dict[str, Any]:
    """A short description for logs."""
    return dict(task=task.kind.value, model=dataclasses.asdict(task.model_config))
