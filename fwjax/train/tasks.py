"""Tasks: what a training run builds, feeds and optimises.

A task owns its model constructor, its data (batches as pure functions of an index, so the data
position of a run is its step), its loss, and an optional *carry* threaded from one training
step to the next (the fast weights of language-model streams). Two tasks: the synthetic
associative retrieval task of the paper, and language modelling (bytes, chars or words).
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fwjax.data import text as text_data
from fwjax.data.retrieval import retrieval_loss
from fwjax.data.tokenizers import TokenizerKind
from fwjax.nn import (
    AttentionKind,
    FavorRedraw,
    Positional,
    RetrievalModel,
    TransformerLM,
    redraw_favor_projections,
)
from fwjax.train.config import (
    EvalSet,
    Init,
    LMEvalMode,
    LMTaskConfig,
    RecallTaskConfig,
    RetrievalTaskConfig,
    TaskKind,
    TrainConfig,
)
from fwjax.train.mesh import ALL_ROWS, ProcessRows
from fwjax.train.recall import answer_metrics, masked_cross_entropy
from fwjax.train.retrieval import official_init, predictions


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

    Its random streams are those of the synthetic protocol: ``key(seed)`` split in four, for
    the model's Flax initialisers, :func:`~fwjax.train.retrieval.official_init`, FAVOR+'s draw
    at training step ``s`` (``fold_in(·, s)``) and at evaluation ``n`` (``fold_in(·, n)``).
    Training batch ``s`` is ``data.batch(seed, s, batch_size)``; evaluation ``n`` reads
    ``data.batch(seed, j, eval_sequences, eval=True)`` with ``j = b`` (FIXED) or
    ``n·eval_batches + b`` (FRESH) for its batches ``b``.

    Metrics: ``loss`` (½‖onehot(target) − ŷ‖² per query; 0.5 for predicting zeros) and
    ``accuracy`` (argmax of ŷ equals the target).
    """

    kind = TaskKind.RETRIEVAL

    def __init__(self, config: TrainConfig):
        cfg: RetrievalTaskConfig = config.retrieval
        self.config = cfg
        self.data = cfg.data()
        self.model_config = cfg.model_config()
        self.seed = config.seed
        self.batch_size = config.batch_size
        self.eval_batches = config.eval_batches
        self.redraw = (
            cfg.attention is AttentionKind.FAST_WEIGHT
            and cfg.fast_weight.feature_map.needs_projection
            and cfg.fast_weight.favor_redraw is FavorRedraw.PER_STEP
        )
        keys = jax.random.split(jax.random.key(config.seed), 4)
        self._init_key, self._official_key, self._train_favor, self._eval_favor = keys

    def tokens_per_batch(self, batch_size: int) -> int:
        return batch_size * self.data.length

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        """The model, from the task's own initialisation keys (``rngs`` is not used)."""
        model = RetrievalModel(self.model_config, rngs=nnx.Rngs(params=self._init_key))
        if self.config.init is Init.OFFICIAL:
            official_init(model, self._official_key, embed_std=self.config.embed_std)
        return model

    def redraw_projections(self, model, key, step) -> None:
        if self.redraw:
            model.redraw_projection(jax.random.fold_in(self._train_favor, step))

    def prepare_eval(self, model, index) -> None:
        """Draws evaluation ``index``'s FAVOR+ projection (when redrawn)."""
        if self.redraw:
            model.redraw_projection(jax.random.fold_in(self._eval_favor, index))

    def init_carry(self, model, batch_size: int):
        return None

    def train_batch(self, index: int, rows: ProcessRows = ALL_ROWS) -> dict:
        """Training batch ``index`` (this process's ``rows`` of it; generated whole)."""
        return rows.take(self.data.batch(self.seed, index, self.batch_size))

    def eval_data(
        self, data_parallel: int, index: int = 0, rows: ProcessRows = ALL_ROWS
    ) -> list[dict]:
        first = index * self.eval_batches if self.config.eval_set is EvalSet.FRESH else 0
        n = self.config.eval_sequences
        return [
            rows.take(_pad_rows(self.data.batch(self.seed, first + i, n, eval=True), data_parallel))
            for i in range(self.eval_batches)
        ]

    def loss(self, model, batch, carry):
        """Returns ``(loss, (metric sums, carry))``; sums are over the real queries."""
        y = predictions(model, batch, self.config.readout)
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
    """Language modelling with a :class:`~fwjax.nn.TransformerLM`, trained on contiguous streams
    or random windows (``config.lm.sampling``) and evaluated on the split in order.

    The corpus and tokeniser come from ``config.lm`` (:func:`fwjax.data.text.load_lm_data`); the
    model's ``vocab_size`` is the tokeniser's for char and word tokens. With ``carry_state`` the
    fast weights flow from one segment of a stream to the next (in training and evaluation) and
    are reset at the start of an epoch. Metrics: ``loss`` (nats per token), ``bpc`` (bits per
    token: per byte / char for byte / char tokens) and ``perplexity``.
    """

    kind = TaskKind.LM

    def __init__(self, config: TrainConfig):
        cfg: LMTaskConfig = config.lm
        self.config = cfg
        if cfg.carry_state and any(k is AttentionKind.SOFTMAX for k in cfg.model.layer_kinds):
            raise ValueError(
                f"carry_state=True needs fast weight layers only; got {cfg.model.layer_kinds=}"
            )
        data = text_data.load_lm_data(
            cfg.dataset,
            cfg.tokenizer,
            text_path=cfg.text_path,
            validation_fraction=cfg.validation_fraction,
            data_dir=cfg.data_dir,
            manual_dir=cfg.manual_dir,
            eval_split=cfg.eval_split,
        )
        self.tokenizer = data.tokenizer
        self.valid_tokens = data.valid
        self.separator = None
        if cfg.document_separator is not None:
            self.separator = data.tokenizer.token_id(cfg.document_separator)
        sep = dict(separator=self.separator)
        if cfg.sampling is text_data.Sampling.RANDOM_WINDOWS:
            self.train_streams = text_data.RandomWindows(
                data.train, config.batch_size, cfg.segment_len, config.seed, **sep
            )
        else:
            self.train_streams = text_data.ContiguousStreams(
                data.train, config.batch_size, cfg.segment_len, **sep
            )
        self.valid_streams = text_data.ContiguousStreams(
            data.valid, config.batch_size, cfg.segment_len, **sep
        )
        self.model_config = cfg.model
        if cfg.tokenizer is not TokenizerKind.BYTE:
            self.model_config = dataclasses.replace(cfg.model, vocab_size=data.tokenizer.vocab_size)
        self.batch_size = config.batch_size
        self.eval_batches = min(config.eval_batches, len(self.valid_streams))
        fw = cfg.model.fast_weight
        self.redraw = fw.feature_map.needs_projection and fw.favor_redraw is FavorRedraw.PER_STEP

    def tokens_per_batch(self, batch_size: int) -> int:
        return batch_size * self.config.segment_len

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        return TransformerLM(self.model_config, rngs=rngs)

    def redraw_projections(self, model, key, step) -> None:
        if self.redraw:
            redraw_favor_projections(model, key)

    def prepare_eval(self, model, index) -> None:
        """Evaluation uses the last training draw of FAVOR+'s projections."""

    def init_carry(self, model, batch_size: int):
        return model.init_state(batch_size) if self.config.carry_state else None

    def train_batch(self, index: int, rows: ProcessRows = ALL_ROWS) -> dict:
        """Training batch ``index``: only this process's ``rows`` are read from the text."""
        return self.train_streams.batch(index, rows.of(self.batch_size))

    def eval_data(
        self, data_parallel: int, index: int = 0, rows: ProcessRows = ALL_ROWS
    ) -> list[dict]:
        # Consecutive validation segments: with carry_state the memory flows through them.
        streams = rows.of(self.batch_size)
        return [self.valid_streams.batch(i, streams) for i in range(self.eval_batches)]

    def loss(self, model, batch, carry):
        state = None
        if carry is not None:
            state = _reset_rows(carry, model.init_state(batch["inputs"].shape[0]), batch["reset"])
        logits, state = model(batch["inputs"], state, segment_ids=batch.get("segment_ids"))
        per_token = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        loss = jnp.mean(per_token)
        new_carry = None if carry is None else jax.lax.stop_gradient(state)
        sums = dict(loss=jnp.sum(per_token), count=jnp.asarray(per_token.size, jnp.float32))
        return loss, (sums, new_carry)

    @staticmethod
    def summarize(sums: dict) -> dict:
        loss = float(sums["loss"]) / max(float(sums["count"]), 1.0)
        return dict(loss=loss, bpc=loss / math.log(2), perplexity=math.exp(min(loss, 50.0)))


def _windows(n: int, mode: LMEvalMode, segment_len: int, stride: int, streams: int):
    """Index plans of an evaluation over ``n`` (input, target) pairs.

    Returns:
      ``(index [S, R, T] int, mask [S, R, T] bool)``: S sequential calls of R rows of T
      positions; ``index`` points into the pairs (clipped in range where masked). For CARRIED
      the state flows from call ``s`` to ``s + 1`` row by row; otherwise every row starts empty.
    """
    t = segment_len
    if mode is LMEvalMode.CARRIED:
        length = -(-n // streams)
        calls = -(-length // t)
        pos = np.arange(streams)[None, :, None] * length + (
            np.arange(calls)[:, None, None] * t + np.arange(t)[None, None, :]
        )
        inside = (pos - np.arange(streams)[None, :, None] * length) < length
        mask = inside & (pos < n)
        return np.minimum(pos, n - 1), mask
    if mode is LMEvalMode.SEGMENTS:
        starts = np.arange(0, n, t)
        scored_from = np.zeros_like(starts)
    else:
        count = 1 + max(0, -(-(n - t) // stride))
        starts = np.arange(count) * stride
        scored_from = np.where(starts == 0, 0, t - stride)
    pos = starts[:, None] + np.arange(t)[None, :]
    mask = (pos < n) & (np.arange(t)[None, :] >= scored_from[:, None])
    return np.minimum(pos, n - 1)[:, None, :], mask[:, None, :]


_SCORE_FNS: dict[int, Any] = {}  # id(ModelDef) -> jitted score (dropped with the ModelDef)


def _score_fn(model_def):
    """The jitted ``(params, rest, inputs, targets, weights, state, segment_ids) -> (Σ weighted
    NLL, state)`` of a model (one per ``ModelDef``, so repeated evaluations reuse its
    compilations); ``segment_ids`` may be None."""
    key = id(model_def)
    if key not in _SCORE_FNS:

        @jax.jit
        def score(params, rest, inputs, targets, weights, state, segment_ids):
            model = model_def.merge(params, rest, train=False)
            logits, new_state = model(inputs, state, segment_ids=segment_ids)
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
            return jnp.sum(nll * weights), new_state

        _SCORE_FNS[key] = score
        weakref.finalize(model_def, _SCORE_FNS.pop, key, None)
    return _SCORE_FNS[key]


def evaluate_lm(
    run,
    mode: LMEvalMode | str = LMEvalMode.SEGMENTS,
    *,
    segment_len: int | None = None,
    stride: int | None = None,
    streams: int = 1,
    batch_rows: int | None = None,
) -> dict:
    """Loss over the whole evaluation split of an LM run, in one of three modes.

    Args:
      run: a built :class:`~fwjax.train.loop.Run` of an LM task (its current parameters).
      mode: :class:`~fwjax.train.config.LMEvalMode`: SEGMENTS (independent segments),
        SLIDING (windows every ``stride`` tokens, each recomputed from scratch) or CARRIED
        (fast weights carried across all segments of ``streams`` contiguous streams).
      segment_len: T of a segment / window (default: the training ``segment_len``).
      stride: SLIDING's stride (default ``lm.eval_stride``, else T // 2), 1 ≤ stride ≤ T.
      streams: CARRIED's number of parallel streams (1: the whole split in order).
      batch_rows: rows per call for SEGMENTS / SLIDING (default: the training batch size).

    Returns:
      ``dict(mode, loss (nats/token), bits_per_token, perplexity, tokens, unit)`` plus ``bpc``
      for char and byte tokens (bits per character / byte).

    Raises:
      ValueError: CARRIED with softmax layers or LEARNED positions, a segment longer than
        LEARNED positions hold, or a bad ``stride`` / ``streams``.
    """
    task: LMTrainTask = run.task
    cfg = task.config
    mode = LMEvalMode(mode)
    t = segment_len or cfg.segment_len
    stride = stride or min(cfg.eval_stride or t // 2, t) or 1
    if not 1 <= stride <= t:
        raise ValueError(f"{stride=} must be in [1, segment_len={t}]")
    if streams < 1:
        raise ValueError(f"{streams=} must be >= 1")
    if mode is LMEvalMode.CARRIED and any(
        k is AttentionKind.SOFTMAX for k in task.model_config.layer_kinds
    ):
        raise ValueError(
            f"mode='carried' needs fast weight layers only; got {task.model_config.layer_kinds}"
        )
    if mode is LMEvalMode.CARRIED and task.model_config.positional is Positional.LEARNED:
        raise ValueError(
            "mode='carried' with positional='learned': positions of one stream grow past the "
            f"table of {task.model_config.max_len=}; carried evaluation needs a model trained "
            "without learned positions"
        )
    if task.model_config.positional is Positional.LEARNED and t > task.model_config.max_len:
        raise ValueError(
            f"segment_len={t} exceeds the learned position table ({task.model_config.max_len=})"
        )
    tokens = np.asarray(task.valid_tokens)
    n = len(tokens) - 1
    if n < 1:
        raise ValueError(f"the evaluation split has {len(tokens)} tokens; need at least 2")
    index, mask = _windows(n, mode, t, stride, streams)
    if mode is not LMEvalMode.CARRIED:  # regroup the independent windows into batches
        rows = batch_rows or task.batch_size
        calls = -(-index.shape[0] // rows)
        pad = calls * rows - index.shape[0]
        index = np.concatenate([index[:, 0], np.zeros((pad, t), index.dtype)]).reshape(
            calls, rows, t
        )
        mask = np.concatenate([mask[:, 0], np.zeros((pad, t), bool)]).reshape(calls, rows, t)
    score = _score_fn(run.model_def)
    carried = mode is LMEvalMode.CARRIED
    fresh = run.model().init_state(index.shape[1]) if carried else None
    state = fresh
    total, count = 0.0, int(mask.sum())
    for s in range(index.shape[0]):
        inputs = jnp.asarray(tokens[index[s]], jnp.int32)
        targets = jnp.asarray(tokens[index[s] + 1], jnp.int32)
        weights = jnp.asarray(mask[s], jnp.float32)
        segment_ids = None
        if task.separator is not None:  # packed documents, as in training
            previous = text_data.previous_tokens(tokens, index[s][:, 0], task.separator)
            docs = text_data.document_fields(tokens[index[s]], previous, task.separator)
            segment_ids = jnp.asarray(docs["segment_ids"])
            if carried:
                state = _reset_rows(state, fresh, jnp.asarray(docs["document_start"]))
        args = (inputs, targets, weights, state, segment_ids)
        part, new_state = score(run.state.params, run.state.rest, *args)
        total += float(part)
        if carried:
            state = new_state
    loss = total / count
    out = dict(
        mode=mode.value,
        loss=loss,
        bits_per_token=loss / math.log(2),
        perplexity=math.exp(min(loss, 50.0)),
        tokens=count,
        unit=task.tokenizer.unit,
    )
    if task.tokenizer.kind is not TokenizerKind.WORD:
        out["bpc"] = out["bits_per_token"]
    return out


class RecallTrainTask:
    """A recall task (MQAR or multi-hop, :mod:`fwjax.data.recall`) with a
    :class:`~fwjax.nn.TransformerLM` scored at the answer positions only.

    The model is built from ``nnx.Rngs(seed)`` (the streams of the stored recall results);
    training batch ``s`` is ``data.batch(seed, s, batch_size)``; the evaluation set is fixed
    (``eval=True`` stream of the same seed). Metrics: ``loss`` (cross entropy per answer),
    ``accuracy`` (argmax right) and ``hop{h}_accuracy`` per hop count ``h``.
    """

    kind = TaskKind.RECALL

    def __init__(self, config: TrainConfig):
        cfg: RecallTaskConfig = config.recall
        self.config = cfg
        self.data = cfg.data()
        self.model_config = cfg.model
        self.seed = config.seed
        self.batch_size = config.batch_size
        fw = cfg.model.fast_weight
        self.redraw = fw.feature_map.needs_projection and fw.favor_redraw is FavorRedraw.PER_STEP
        self._eval = None

    def tokens_per_batch(self, batch_size: int) -> int:
        return batch_size * self.data.length

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        """The model, from ``nnx.Rngs(seed)`` (``rngs`` is not used)."""
        model = TransformerLM(self.model_config, rngs=nnx.Rngs(self.seed))
        if self.config.embedding_std is not None:
            # Rescale the N(0, embed_init_std²) table to N(0, embedding_std²).
            scale = self.config.embedding_std / self.model_config.embed_init_std
            model.embed.embedding[...] = model.embed.embedding[...] * scale
        return model

    def redraw_projections(self, model, key, step) -> None:
        if self.redraw:
            redraw_favor_projections(model, key)

    def prepare_eval(self, model, index) -> None:
        """Evaluation uses the last training draw of FAVOR+'s projections."""

    def init_carry(self, model, batch_size: int):
        return None

    def train_batch(self, index: int, rows: ProcessRows = ALL_ROWS) -> dict:
        """Training batch ``index`` (this process's ``rows`` of it; generated whole)."""
        return rows.take(self.data.batch(self.seed, index, self.batch_size))

    def eval_data(
        self, data_parallel: int, index: int = 0, rows: ProcessRows = ALL_ROWS
    ) -> list[dict]:
        if self._eval is None:  # the fixed evaluation set, built once
            n = self.config.eval_batch_size
            count = self.config.eval_sequences // n
            self._eval = [self.data.batch(self.seed, i, n, eval=True) for i in range(count)]
        return [rows.take(_pad_rows(b, data_parallel)) for b in self._eval]

    def loss(self, model, batch, carry):
        """Returns ``(mean cross entropy of the answers, (metric sums, carry))``."""
        logits, _ = model(batch["tokens"])
        loss = masked_cross_entropy(logits, batch["targets"], batch["mask"])
        sums = answer_metrics(
            logits, batch["targets"], batch["mask"], batch["hops"], self.data.max_hops
        )
        return loss, (sums, carry)

    @staticmethod
    def summarize(sums: dict) -> dict:
        count = max(float(sums["count"]), 1.0)
        out = dict(loss=float(sums["loss_sum"]) / count, accuracy=float(sums["correct"]) / count)
        hops = np.atleast_1d(sums["hop_correct"]), np.atleast_1d(sums["hop_count"])
        for h, (right, total) in enumerate(zip(*hops, strict=True), start=1):
            if total > 0:
                out[f"hop{h}_accuracy"] = float(right) / float(total)
        return out


Task = RetrievalTrainTask | LMTrainTask | RecallTrainTask


def make_task(config: TrainConfig) -> Task:
    """The task of ``config.task``."""
    tasks = {
        TaskKind.RETRIEVAL: RetrievalTrainTask,
        TaskKind.LM: LMTrainTask,
        TaskKind.RECALL: RecallTrainTask,
    }
    return tasks[config.task](config)
