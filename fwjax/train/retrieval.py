"""The training protocol of the paper's synthetic associative retrieval experiments.

Schlag, Irie & Schmidhuber (ICML 2021, Sec. 6.1): a single-layer :class:`~fwjax.nn.RetrievalModel`
is trained with Adam (lr 1e-3, batch 32) on one query per sequence with the loss
``½‖onehot(target) − ŷ‖²``; every 100 steps it is evaluated on 20
sequences, queried at every unique key (at most 200). Training stops when the evaluation loss
is ``<= 0.001``, after 10 evaluations in a row without a new best, or at a step cap; the
result is the LAST evaluation loss and the step count. The protocol is the config file
``fwjax/configs/retrieval_paper.toml``; it runs in the one training loop
(:func:`fwjax.train.loop.train_run`, with checkpoints, resume and the non-finite guard) as the
retrieval task (:class:`fwjax.train.tasks.RetrievalTrainTask`), and
:func:`retrieval_train_config` gives its config for a task and model.

The model reads its memory only after all writes, at a few queries, so the predictions have a
closed form that never builds the ``[K, V]`` fast weight matrix (:func:`direct_predictions`,
:mod:`fwjax.ops.readout`); it equals ``RetrievalModel.__call__`` up to float rounding
(tested) and is the default (:class:`Readout`).

Usage::

    task = RetrievalTask(RetrievalSetting.UPDATE, num_keys=40)
    cfg = RetrievalConfig(40, 40, fast_weight=FastWeightConfig(FeatureMap("dpfp", nu=1)))
    result = run_retrieval(retrieval_train_config(task, cfg, {"seed": 0, "steps": 20_000}))
    result.final_eval_loss, result.steps
"""

from __future__ import annotations

import dataclasses
import enum
import math
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from fwjax.data.retrieval import RetrievalTask
from fwjax.nn.config import AttentionKind, FavorRedraw
from fwjax.nn.retrieval import RetrievalConfig, RetrievalModel
from fwjax.ops import UpdateRule
from fwjax.ops.readout import readout_features, retrieval_readout
from fwjax.train.config import EvalSet, Init, Readout, TaskKind, TrainConfig
from fwjax.train.config_io import load_train_config, with_overrides


class FavorPolicy(enum.Enum):
    """When FAVOR+'s random projection ``R`` is drawn.

    Attributes:
      REDRAW: a fresh ``R`` at every forward call (every training step and every evaluation),
        as the paper's official synthetic code does.
      FIXED: the ``R`` drawn when the model was built, throughout.
    """

    REDRAW = "redraw"
    FIXED = "fixed"


class StopReason(enum.Enum):
    """Why training stopped."""

    TARGET = "target"  # eval loss <= target_loss
    PATIENCE = "patience"  # patience evaluations in a row without a new best
    MAX_STEPS = "max_steps"  # the step cap


def retrieval_train_config(
    task: RetrievalTask,
    model_config: RetrievalConfig,
    fields: Mapping[str, Any] | None = None,
    *,
    base: str | Path = "retrieval_paper",
) -> TrainConfig:
    """The training config of ``model_config`` on ``task`` under a protocol config file.

    The protocol is ``base`` (a shipped config name or a TOML path; the default is the paper's,
    ``fwjax/configs/retrieval_paper.toml``): its ``[retrieval]`` task and model are replaced by
    ``task`` and ``model_config`` (the protocol's evaluation set, init and readout stay), then
    ``fields`` are set as :func:`~fwjax.train.config_io.with_overrides` sets them, e.g.
    ``{"steps": 500, "seed": 3, "early_stopping.patience": 5}``. FAVOR+'s projection follows
    ``model_config.fast_weight.favor_redraw`` (the official code redraws it at every step).

    Args:
      task: the :class:`~fwjax.data.retrieval.RetrievalTask`.
      model_config: the :class:`~fwjax.nn.RetrievalConfig`; its key and value counts must be
        the task's.
      fields: ``{"key.path": value}`` overrides of the protocol.
      base: the protocol config.

    Returns:
      A validated retrieval :class:`~fwjax.train.config.TrainConfig`.
    """
    if (model_config.num_keys, model_config.num_values) != (task.num_keys, task.num_values):
        raise ValueError(
            f"model num_keys={model_config.num_keys}, num_values={model_config.num_values} "
            f"do not match the task's num_keys={task.num_keys}, num_values={task.num_values}"
        )
    config = load_train_config(base)
    if config.task is not TaskKind.RETRIEVAL:
        raise ValueError(f"base={str(base)!r} is a {config.task.value!r} config, not retrieval")
    model = {
        f.name: getattr(model_config, f.name)
        for f in dataclasses.fields(model_config)
        if f.name not in ("num_keys", "num_values")
    }
    task_fields = {f.name: getattr(task, f.name) for f in dataclasses.fields(task)}
    retrieval = dataclasses.replace(config.retrieval, **task_fields, **model)
    return with_overrides(config, {"retrieval": retrieval, **(fields or {})})


@dataclasses.dataclass(frozen=True)
class RetrievalProtocol:
    """Deprecated: :func:`retrieval_train_config` (the protocol is the config file
    ``retrieval_paper``; these fields become its overrides).

    Attributes (the defaults are the paper's, plus a step cap): ``batch_size`` 32,
    ``learning_rate`` 1e-3 (Adam, no clipping), ``eval_every`` 100 (also the steps per jitted
    call; a checkpoint every ten evaluations), ``eval_sequences`` 20, ``target_loss`` 0.001 and
    ``patience`` 10 (the stopping rule), ``max_steps``, ``seed``, ``eval_set``, ``favor`` (a
    :class:`FavorPolicy`), ``init``, ``readout``, ``embed_std``: the retrieval task config's.
    """

    batch_size: int = 32
    learning_rate: float = 1e-3
    eval_every: int = 100
    eval_sequences: int = 20
    target_loss: float = 1e-3
    patience: int = 10
    max_steps: int = 20_000
    seed: int = 0
    eval_set: EvalSet = EvalSet.FIXED
    favor: FavorPolicy = FavorPolicy.REDRAW
    init: Init = Init.OFFICIAL
    readout: Readout = Readout.DIRECT
    embed_std: float = 1.0

    def __post_init__(self):
        warnings.warn(
            "RetrievalProtocol is deprecated; use retrieval_train_config(task, model_config, "
            "fields) (the protocol is the config file 'retrieval_paper')",
            DeprecationWarning,
            stacklevel=3,
        )

    def train_config(self, task: RetrievalTask, model_config: RetrievalConfig) -> TrainConfig:
        """The :class:`~fwjax.train.config.TrainConfig` of this protocol."""
        redraw = (
            FavorRedraw.PER_STEP
            if FavorPolicy(self.favor) is FavorPolicy.REDRAW
            else FavorRedraw.NEVER
        )
        fw = dataclasses.replace(model_config.fast_weight, favor_redraw=redraw)
        every = self.eval_every
        fields = {
            "steps": self.max_steps, "batch_size": self.batch_size, "seed": self.seed,
            "eval_every": every, "log_every": every, "steps_per_call": every,
            "checkpoint.every_steps": 10 * every, "optimizer.clip_norm": None,
            "optimizer.learning_rate": self.learning_rate,
            "early_stopping.target": self.target_loss, "early_stopping.patience": self.patience,
        }  # fmt: skip
        for name in ("eval_sequences", "init", "embed_std", "readout", "eval_set"):
            fields[f"retrieval.{name}"] = getattr(self, name)
        model_config = dataclasses.replace(model_config, fast_weight=fw)
        return retrieval_train_config(task, model_config, fields)


@dataclasses.dataclass(frozen=True)
class RetrievalResult:
    """The outcome of :func:`run_retrieval`.

    Attributes:
      final_eval_loss: the last evaluation loss (the paper reports this one).
      best_eval_loss: the lowest evaluation loss seen.
      steps: training steps taken.
      stop_reason: a :class:`StopReason`.
      seconds: wall-clock time of the whole run (compilation included).
      history: ``((step, eval_loss), ...)`` of every evaluation.
      model: the trained :class:`RetrievalModel` (final parameters), for further analysis.
    """

    final_eval_loss: float
    best_eval_loss: float
    steps: int
    stop_reason: StopReason
    seconds: float
    history: tuple[tuple[int, float], ...]
    model: RetrievalModel | None = dataclasses.field(default=None, repr=False, compare=False)


# ----------------------------------------------------------------------------------------------
# Initialisation
# ----------------------------------------------------------------------------------------------


def official_init(model: RetrievalModel, key: jax.Array, *, embed_std: float = 1.0) -> None:
    """Re-initialises ``model`` in place with the official synthetic code's distributions.

    ``embeddingK ~ N(0, embed_std²)`` (official: ``embed_std = 1``); for fast weight models
    ``W_k, W_q ~ U(±1/√d_key)``, for softmax ``W_k, W_q`` Xavier-uniform
    (``U(±√(6/(fan_in+fan_out)))``); ``W_β`` PyTorch's default Linear init ``U(±1/√fan_in)``;
    biases (``use_bias``) PyTorch's default ``U(±1/√fan_in)``. (The official key embedding is
    ``int(2.2·N)`` wide: ``RetrievalConfig.d_embed``.) Options the official model lacks: an
    untied query table (``tie_queries=False``) is drawn like the key table; with
    ``embed_factor = f`` the tables ``E`` are drawn as above and the shared factor
    ``P ~ N(0, 1/f)``, so that ``E·P`` has the unfactored table's variance.

    Args:
      model: the model to re-initialise.
      key: a PRNG key.
      embed_std: the key embedding's standard deviation.
    """
    d = model.config.d_key
    # The first four keys equal those of split(key, 4) (JAX's partitionable threefry, the default),
    # so points run before the biases existed keep their draws.
    k_embed, k_key, k_query, k_beta, k_bias = jax.random.split(key, 5)

    def uniform(k, shape, bound):
        return jax.random.uniform(k, shape, jnp.float32, -bound, bound)

    # The optional tables draw from keys folded out of k_embed: the others' draws are unchanged.
    tables = ((k_embed, model.embed), (jax.random.fold_in(k_embed, 1), model.query_embed))
    for k, table in tables:
        if table is not None:
            table.embedding[...] = embed_std * jax.random.normal(k, table.embedding.shape)
    if model.embed_factor is not None:
        factor = model.embed_factor.kernel
        draw = jax.random.normal(jax.random.fold_in(k_embed, 2), factor.shape)
        factor[...] = draw / math.sqrt(model.config.embed_factor)
    for k, layer in ((k_key, model.key_proj), (k_query, model.query_proj)):
        fan_in, fan_out = layer.kernel.shape
        if model.config.attention is AttentionKind.SOFTMAX:
            bound = math.sqrt(6.0 / (fan_in + fan_out))
        else:
            bound = 1.0 / math.sqrt(d)
        layer.kernel[...] = uniform(k, layer.kernel.shape, bound)
    fan_in = model.beta_proj.kernel.shape[0]
    model.beta_proj.kernel[...] = uniform(k_beta, model.beta_proj.kernel.shape, fan_in**-0.5)
    if model.config.use_bias:
        layers = (model.key_proj, model.query_proj, model.beta_proj)
        for k, layer in zip(jax.random.split(k_bias, len(layers)), layers, strict=True):
            bound = layer.kernel.shape[0] ** -0.5
            layer.bias[...] = uniform(k, layer.bias.shape, bound)


# ----------------------------------------------------------------------------------------------
# Direct (closed-form) predictions
# ----------------------------------------------------------------------------------------------


def _token_projections(model: RetrievalModel, keys, values):
    """``W_k x_t`` and ``w_β·x_t`` for ``x_t = [onehot(v_t); embed(k_t)]``, as two row gathers:
    ``W x_t = W_v[v_t] + (E W_e)[k_t]``, with ``E W_e`` the embedding table projected once
    (``[num_keys, d]``) instead of every position's embedding (``[B, L, d]``).

    Same numbers as the product with ``x_t``, but the gradient becomes scatter-adds into two small
    tables: XLA:CPU fuses the feature map's backward into the transposed ``[d, B·L]`` copy that
    the per-position product's weight gradient needs, which alone took 34 of a training step's
    128 ms (``jax.profiler``, setting 1, DPFP-1, N = 400)."""
    num_values = model.config.num_values
    table = model.key_table()  # [num_keys, d_embed]
    wk = model.key_proj.kernel[...]  # [V + d_embed, d]
    wb = model.beta_proj.kernel[...]  # [V + d_embed, 1]
    k = wk[:num_values][values] + (table @ wk[num_values:])[keys]  # [B, L, d]
    beta_logit = (wb[:num_values][values] + (table @ wb[num_values:])[keys])[..., 0]  # [B, L]
    if model.config.use_bias:
        k = k + model.key_proj.bias[...]
        beta_logit = beta_logit + model.beta_proj.bias[...][0]
    return k, beta_logit


def _features(model: RetrievalModel, q, k):
    """``(q̂, k̂)`` of a fast weight model (:func:`~fwjax.ops.readout.readout_features`
    with the model's map, normalisation and FAVOR+ projection)."""
    fw = model.config.fast_weight
    projection = None if model.projection is None else model.projection[...]
    return readout_features(q, k, fw.feature_map, fw.normalization, projection)


def memory_writes(model: RetrievalModel, keys, values, queries):
    """What a fast weight :class:`RetrievalModel` writes and reads, for analysis.

    Args:
      model: a fast weight (not softmax) :class:`RetrievalModel`.
      keys, values: ``[B, L]`` int token ids of the writes.
      queries: ``[B, Q]`` int key ids.

    Returns:
      ``(k̂ [B, L, K], β [B, L] or None (sum rule), q̂ [B, Q, K])``, float32: the memory keys
      and query features after φ and the normalisation, and the write strengths.
    """
    if model.config.attention is AttentionKind.SOFTMAX:
        raise ValueError("memory_writes needs a fast weight model, not softmax attention")
    k, beta_logit = _token_projections(model, keys, values)
    fq, fk = _features(model, model.query_proj(model.embed_queries(queries)), k)
    delta = model.config.fast_weight.update_rule is UpdateRule.DELTA
    return fk, (jax.nn.sigmoid(beta_logit) if delta else None), fq


def direct_predictions(model: RetrievalModel, keys, values, queries) -> jax.Array:
    """``RetrievalModel``'s predictions from a closed form at the queries (no ``[K, V]`` memory):
    :func:`~fwjax.ops.readout.retrieval_readout` of the model's raw keys
    ``W_k x_t`` and queries ``W_q embed(query)`` (sum or delta rule, attention normalisation,
    softmax attention; equations there).

    ``W_k x_t`` is computed as ``W_k[:, v_t] + (E W_k^e)[k_t]`` (gathers instead of a product
    with ``x_t``; :func:`_token_projections`).

    Args:
      model: a :class:`RetrievalModel`.
      keys, values: ``[B, L]`` int token ids of the writes.
      queries: ``[B, Q]`` int key ids.

    Returns:
      ``ŷ`` ``[B, Q, num_values]`` float32.
    """
    cfg = model.config
    k, beta_logit = _token_projections(model, keys, values)  # [B, L, d], [B, L]
    q = model.query_proj(model.embed_queries(queries))  # [B, Q, d]
    if cfg.attention is AttentionKind.SOFTMAX:
        return retrieval_readout(q, k, values, num_values=cfg.num_values, feature_map=None)
    fw = cfg.fast_weight
    delta = fw.update_rule is UpdateRule.DELTA
    return retrieval_readout(
        q,
        k,
        values,
        jax.nn.sigmoid(beta_logit) if delta else None,
        num_values=cfg.num_values,
        feature_map=fw.feature_map,
        normalization=fw.normalization,
        update_rule=fw.update_rule,
        projection=None if model.projection is None else model.projection[...],
    )


def predictions(model: RetrievalModel, batch: dict, readout: Readout) -> jax.Array:
    """``[B, Q, num_values]`` predictions for a task batch, by ``readout``."""
    args = batch["keys"], batch["values"], batch["queries"]
    if Readout(readout) is Readout.DIRECT:
        return direct_predictions(model, *args)
    return model(*args)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def model_config_uses_favor(model_config: RetrievalConfig) -> bool:
    """Whether the model has a FAVOR+ projection."""
    return (
        model_config.attention is AttentionKind.FAST_WEIGHT
        and model_config.fast_weight.feature_map.needs_projection
    )


def run_retrieval(config: TrainConfig, workdir: str | Path | None = None) -> RetrievalResult:
    """Trains the retrieval run ``config`` with :func:`fwjax.train.loop.train_run` and
    collects its :class:`RetrievalResult` (the evaluation history from ``metrics.jsonl``).

    Args:
      config: a retrieval :class:`~fwjax.train.config.TrainConfig` (e.g.
        :func:`retrieval_train_config`).
      workdir: the run's work directory (checkpoints, resume); None: a temporary one, deleted
        afterwards.

    Returns:
      A :class:`RetrievalResult`; ``model`` holds the final parameters (and, with FAVOR+
      redrawn, the last training step's projection).
    """
    # Imported here: the loop imports this module (the retrieval task's predictions).
    from fwjax.train.loop import finished_run

    if config.task is not TaskKind.RETRIEVAL:
        raise ValueError(f"run_retrieval needs a retrieval config; got task={config.task.value!r}")
    start = time.perf_counter()
    with finished_run(config, workdir) as (summary, run, records):
        history = tuple((r["step"], r["loss"]) for r in records if r["split"] == "eval")
        model = run.model()
    return RetrievalResult(
        final_eval_loss=history[-1][1],
        best_eval_loss=min(loss for _, loss in history),
        steps=summary["steps"],
        stop_reason=StopReason(summary.get("stop_reason", "max_steps")),
        seconds=time.perf_counter() - start,
        history=history,
        model=model,
    )


def train_retrieval(
    task: RetrievalTask,
    model_config: RetrievalConfig,
    protocol: RetrievalProtocol | None = None,
    *,
    log: Callable[[int, float], None] | None = None,
) -> RetrievalResult:
    """Deprecated: ``run_retrieval(protocol.train_config(task, model_config))``.

    Trains a fresh :class:`RetrievalModel` on ``task`` until the protocol's stopping rule, in
    a temporary work directory of the training loop; ``log(step, eval_loss)`` is called for
    every evaluation after training.
    """
    warnings.warn(
        "train_retrieval is deprecated; use "
        "run_retrieval(protocol.train_config(task, model_config))",
        DeprecationWarning,
        stacklevel=2,
    )
    with warnings.catch_warnings():  # one warning: this function's
        warnings.simplefilter("ignore", DeprecationWarning)
        p = RetrievalProtocol() if protocol is None else protocol
    result = run_retrieval(p.train_config(task, model_config))
    for step, loss in result.history if log is not None else ():
        log(step, loss)
    return result
