"""The training protocol of the paper's synthetic associative retrieval experiments.

Schlag, Irie & Schmidhuber (ICML 2021, Sec. 6.1): a single-layer :class:`~fwjax.nn.RetrievalModel`
is trained with Adam (lr 1e-3, batch 32) on one query per sequence with the loss
``½‖onehot(target) − ŷ‖²``; every ``eval_every`` steps it is evaluated on ``eval_sequences``
sequences, queried at every unique key (at most 200). Training stops when the evaluation loss
is ``<= target_loss``, after ``patience`` evaluations in a row without a new best, or at
``max_steps``; the result is the LAST evaluation loss and the step count. The protocol runs
in the one training loop (:func:`fwjax.train.loop.train_run`, with checkpoints, resume and the
non-finite guard) as the retrieval task (:class:`fwjax.train.tasks.RetrievalTrainTask`):
:meth:`RetrievalProtocol.train_config` gives its config.

The model reads its memory only after all writes, at a few queries, so the predictions have a
closed form that never builds the ``[K, V]`` fast weight matrix (:func:`direct_predictions`,
:mod:`fwjax.ops.readout`); it equals ``RetrievalModel.__call__`` up to float rounding
(tested) and is the default (:class:`Readout`).

Usage::

    task = RetrievalTask(RetrievalSetting.UPDATE, num_keys=40)
    cfg = RetrievalConfig(40, 40, fast_weight=FastWeightConfig(FeatureMap("dpfp", nu=1)))
    result = run_retrieval(RetrievalProtocol(seed=0).train_config(task, cfg))
    result.final_eval_loss, result.steps
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import math
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp

from fwjax.data.retrieval import RetrievalTask
from fwjax.nn.config import AttentionKind, FavorRedraw
from fwjax.nn.retrieval import RetrievalConfig, RetrievalModel
from fwjax.ops import UpdateRule
from fwjax.ops.readout import readout_features, retrieval_readout
from fwjax.train.config import (
    CheckpointConfig,
    EarlyStoppingConfig,
    EvalSet,
    Init,
    MeshConfig,
    OptimizerConfig,
    OptimizerKind,
    Readout,
    RetrievalTaskConfig,
    ScheduleKind,
    TaskKind,
    TrainConfig,
)
from fwjax.validation import check_ints, check_positive_ints


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


@dataclasses.dataclass(frozen=True)
class RetrievalProtocol:
    """The training and stopping protocol (defaults: the paper's, plus a step cap).

    Attributes:
      batch_size: training sequences per step (32).
      learning_rate: Adam's learning rate (1e-3; β = (0.9, 0.999), eps 1e-8 as PyTorch).
      eval_every: steps between evaluations (100).
      eval_sequences: sequences per evaluation (20), each queried at every unique key (at most
        ``RetrievalTask.eval_max_queries``).
      target_loss: stop once an evaluation loss is ``<=`` this (0.001).
      patience: stop after this many evaluations in a row without a new best (10).
      max_steps: hard cap on training steps; must be a multiple of ``eval_every``.
      seed: seeds the parameters, the data streams and FAVOR+'s draws.
      eval_set: FIXED or FRESH evaluation sequences (:class:`EvalSet`).
      favor: FAVOR+'s projection policy (:class:`FavorPolicy`).
      init: parameter initialisation (:class:`Init`).
      readout: how predictions are computed (:class:`Readout`).
      embed_std: standard deviation of the OFFICIAL init's key embedding (1, as the official
        code); the pre-φ keys' scale is proportional to it.
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
        check_positive_ints(
            batch_size=self.batch_size,
            eval_every=self.eval_every,
            eval_sequences=self.eval_sequences,
            patience=self.patience,
            max_steps=self.max_steps,
        )
        check_ints(minimum=0, seed=self.seed)
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be > 0")
        if not self.embed_std > 0:
            raise ValueError(f"embed_std={self.embed_std} must be > 0")
        if self.embed_std != 1.0 and Init(self.init) is not Init.OFFICIAL:
            raise ValueError(f"embed_std={self.embed_std} needs init=Init.OFFICIAL")
        if not self.target_loss >= 0:
            raise ValueError(f"target_loss={self.target_loss} must be >= 0")
        if self.max_steps % self.eval_every:
            raise ValueError(
                f"max_steps={self.max_steps} must be a multiple of eval_every={self.eval_every}"
            )
        for name, kind in (
            ("eval_set", EvalSet),
            ("favor", FavorPolicy),
            ("init", Init),
            ("readout", Readout),
        ):
            object.__setattr__(self, name, kind(getattr(self, name)))

    def train_config(self, task: RetrievalTask, model_config: RetrievalConfig) -> TrainConfig:
        """The :class:`~fwjax.train.config.TrainConfig` of this protocol for ``task`` and
        ``model_config``: Adam at a constant rate without clipping, ``eval_every`` steps per
        jitted call, the stopping rule as ``early_stopping`` on the evaluation loss, a
        checkpoint every ten evaluations (``fwjax/configs/retrieval_paper.toml`` is the same
        protocol as a config file)."""
        if (model_config.num_keys, model_config.num_values) != (task.num_keys, task.num_values):
            raise ValueError(
                f"model num_keys={model_config.num_keys}, num_values={model_config.num_values} "
                f"do not match the task's num_keys={task.num_keys}, num_values={task.num_values}"
            )
        redraw = FavorRedraw.PER_STEP if self.favor is FavorPolicy.REDRAW else FavorRedraw.NEVER
        retrieval = RetrievalTaskConfig(
            **{f.name: getattr(task, f.name) for f in dataclasses.fields(task)},
            **{
                f.name: getattr(model_config, f.name)
                for f in dataclasses.fields(model_config)
                if f.name not in ("num_keys", "num_values", "fast_weight")
            },
            fast_weight=dataclasses.replace(model_config.fast_weight, favor_redraw=redraw),
            eval_sequences=self.eval_sequences,
            init=self.init,
            embed_std=self.embed_std,
            readout=self.readout,
            eval_set=self.eval_set,
        )
        return TrainConfig(
            task=TaskKind.RETRIEVAL,
            retrieval=retrieval,
            steps=self.max_steps,
            batch_size=self.batch_size,
            seed=self.seed,
            eval_every=self.eval_every,
            log_every=self.eval_every,
            steps_per_call=self.eval_every,
            early_stopping=EarlyStoppingConfig("loss", self.target_loss, self.patience),
            progress_bar=False,
            optimizer=OptimizerConfig(
                kind=OptimizerKind.ADAM,
                learning_rate=self.learning_rate,
                schedule=ScheduleKind.CONSTANT,
                clip_norm=None,
            ),
            checkpoint=CheckpointConfig(every_steps=10 * self.eval_every, keep=1),
            mesh=MeshConfig(data=1),  # one device, as the stored results ran
        )


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
        :meth:`RetrievalProtocol.train_config`).
      workdir: the run's work directory (checkpoints, resume); None: a temporary one, deleted
        afterwards.

    Returns:
      A :class:`RetrievalResult`; ``model`` holds the final parameters (and, with FAVOR+
      redrawn, the last training step's projection).
    """
    # Imported here: the loop imports this module (the retrieval task's predictions).
    from fwjax.train.loop import Run, mesh_devices, train_run
    from fwjax.train.metrics import read_metrics

    if config.task is not TaskKind.RETRIEVAL:
        raise ValueError(f"run_retrieval needs a retrieval config; got task={config.task.value!r}")
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="fwjax-retrieval-"))
        summary, run = train_run(config, workdir, devices=mesh_devices(config))
        if run is None:  # finished before: its final checkpoint
            run = Run(config, workdir, mesh_devices(config))
            run.checkpointer.close()
        history = tuple(
            (r["step"], r["loss"]) for r in read_metrics(Path(workdir)) if r["split"] == "eval"
        )
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
    p = RetrievalProtocol() if protocol is None else protocol
    result = run_retrieval(p.train_config(task, model_config))
    for step, loss in result.history if log is not None else ():
        log(step, loss)
    return result
