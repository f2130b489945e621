"""The training protocol of the paper's synthetic associative retrieval experiments.

Schlag, Irie & Schmidhuber (ICML 2021, Sec. 6.1): a single-layer :class:`~fwjax.nn.RetrievalModel`
is trained with Adam (lr 1e-3, batch 32) on one query per sequence with the loss
``½‖onehot(target) − ŷ‖²``; every ``eval_every`` steps it is evaluated on ``eval_sequences``
sequences, queried at every unique key (at most 200). Training stops when the evaluation loss
is ``<= target_loss``, after ``patience`` evaluations in a row without a new best, or at
``max_steps``; the result is the LAST evaluation loss and the step count.

The model reads its memory only after all writes, at a few queries, so the predictions have a
closed form that never builds the ``[K, V]`` fast weight matrix (:func:`direct_predictions`,
equations there); it equals ``RetrievalModel.__call__`` up to float rounding (tested) and is the
default (:class:`Readout`).

Usage::

    task = RetrievalTask(RetrievalSetting.UPDATE, num_keys=40)
    cfg = RetrievalConfig(40, 40, fast_weight=FastWeightConfig(FeatureMap("dpfp", nu=1)))
    result = train_retrieval(task, cfg, RetrievalProtocol(seed=0))
    result.final_eval_loss, result.steps
"""

from __future__ import annotations

import dataclasses
import enum
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fwjax.data.retrieval import RetrievalTask, retrieval_loss
from fwjax.nn.config import AttentionKind
from fwjax.nn.retrieval import RetrievalConfig, RetrievalModel
from fwjax.ops import FeatureMapKind, Normalization, UpdateRule, feature_maps
from fwjax.validation import check_positive_ints


class Readout(enum.Enum):
    """How a :class:`RetrievalModel`'s predictions are computed (same values, different cost).

    Attributes:
      GENERIC: ``RetrievalModel.__call__``: writes the whole ``[K, V]`` memory with the
        configured op (``FastWeightConfig.impl``), then reads it.
      DIRECT: :func:`direct_predictions`: the closed form at the queries (no ``[K, V]`` matrix).
    """

    GENERIC = "generic"
    DIRECT = "direct"


class FavorPolicy(enum.Enum):
    """When FAVOR+'s random projection ``R`` is drawn.

    Attributes:
      REDRAW: a fresh ``R`` at every forward call (every training step and every evaluation),
        as the paper's official synthetic code does.
      FIXED: the ``R`` drawn when the model was built, throughout.
    """

    REDRAW = "redraw"
    FIXED = "fixed"


class EvalSet(enum.Enum):
    """Which sequences each evaluation uses.

    Attributes:
      FIXED: the same ``eval_sequences`` sequences at every evaluation (index 0 of the task's
        evaluation stream): the stopping rule then compares like with like.
      FRESH: new sequences at every evaluation (index = evaluation number), as in the official
        code.
    """

    FIXED = "fixed"
    FRESH = "fresh"


class Init(enum.Enum):
    """Parameter initialisation.

    Attributes:
      MODEL: ``RetrievalModel``'s own (Flax) initialisers.
      OFFICIAL: the distributions of the official synthetic code (see :func:`official_init`).
    """

    MODEL = "model"
    OFFICIAL = "official"


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
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r} must be a non-negative int")
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


@dataclasses.dataclass(frozen=True)
class RetrievalResult:
    """The outcome of :func:`train_retrieval`.

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


def _scatter_values(s, values, num_values):
    """``y[b, q, v] = Σ_{t: values[b, t] = v} s[b, q, t]``: ``s [B, Q, L]`` scattered into value
    slots, ``[B, Q, V]`` (the product with the one-hot values, without building them)."""

    def one(s_b, v_b):
        return jnp.zeros((s_b.shape[0], num_values), s_b.dtype).at[:, v_b].add(s_b)

    return jax.vmap(one)(s, values)


def _fast_weight_features(model: RetrievalModel, x, *, key: bool) -> jax.Array:
    """φ̂(x): φ, then the key/query normalisation, exactly as ``fast_weight_attention`` (FAVOR+
    keys stabilised where the factor cancels, queries whenever any normalisation is on)."""
    fw = model.config.fast_weight
    fm, norm = fw.feature_map, fw.normalization
    projection = None if model.projection is None else model.projection[...]
    stabilize = norm.cancels_key_scale if key else norm is not Normalization.NONE
    return norm.normalize_features(fm(x, projection, stabilize=stabilize)).astype(jnp.float32)


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
    fk = _fast_weight_features(model, k, key=True)
    fq = _fast_weight_features(model, model.query_proj(model.embed_queries(queries)), key=False)
    delta = model.config.fast_weight.update_rule is UpdateRule.DELTA
    return fk, (jax.nn.sigmoid(beta_logit) if delta else None), fq


def _back_substitution(fq: jax.Array, fk: jax.Array, beta: jax.Array):
    """The query carried backwards through the writes (see :func:`_delta_read_weights`).

    Returns:
      ``(u_1 [B, Q, K], r' [L, B, Q])``: the query carried back to write 1 and the unscaled
      read weights ``r'_t = k̂_t·u_{t+1}``, time-major.
    """

    def step(u, xs):
        k, b = xs  # [B, K], [B]
        r = jnp.einsum("bqk,bk->bq", u, k)  # r'_t = k̂_t·u_{t+1}
        u = u - (b[:, None] * r)[..., None] * k[:, None, :]  # u_t = u_{t+1} − β_t r'_t k̂_t
        return u, r

    xs = (jnp.swapaxes(fk, 0, 1), jnp.swapaxes(beta, 0, 1))  # scanned over L
    return jax.lax.scan(step, fq, xs, reverse=True)


def _delta_read_weights_autodiff(fq: jax.Array, fk: jax.Array, beta: jax.Array) -> jax.Array:
    """:func:`_delta_read_weights` differentiated by autodiff (per-step residuals stored):
    accurate for any keys, forward mode included."""
    _, r_prime = _back_substitution(fq, fk, beta)
    return jnp.transpose(r_prime, (1, 2, 0)) * beta[:, None, :]


def _contractive_writes(fw) -> bool:
    """Whether every write ``u ← (I − β k̂k̂ᵀ) u`` is a contraction (``β‖k̂‖² <= 1``): unit-norm
    keys (L2, CENTERED_L2), or sum-normalised non-negative ones (``‖k̂‖₂ <= ‖k̂‖₁ = 1``; every
    map but IDENTITY), with ``β = σ(·) < 1``. Attention normalisation's ``β' = β·(z_{t−1}·k̂_t)``
    is unbounded."""
    if fw.normalization in (Normalization.L2, Normalization.CENTERED_L2):
        return True
    return (
        fw.normalization is Normalization.SUM and fw.feature_map.kind is not FeatureMapKind.IDENTITY
    )


@jax.custom_vjp
def _delta_read_weights(fq: jax.Array, fk: jax.Array, beta: jax.Array) -> jax.Array:
    """What each write of a delta-rule memory (zero initial state) contributes to each query's
    read-out: ``ŷ_q = S_Lᵀ q̂ = Σ_t r_{q,t} v_t``.

    ``r = (s (I + A)⁻¹) ⊙ β`` with ``s_t = q̂·k̂_t`` and ``A = tril(diag(β) K̂K̂ᵀ, −1)``: the
    system ``r' (I + A) = s`` is upper-triangular in ``r'``, solved by back substitution from the
    last write, with one ``K``-vector per query instead of the ``L × L`` matrix ``A``::

        u_{L+1} = q̂;  for t = L … 1:  r'_t = k̂_t·u_{t+1},  u_t = u_{t+1} − β_t r'_t k̂_t

    i.e. the query carried backwards through the writes (``u_t = (I − β_t k̂_t k̂_tᵀ) u_{t+1}``,
    the adjoint of the delta recurrence ``S_t = (I − β_t k̂_t k̂_tᵀ) S_{t−1} + β_t k̂_t v_tᵀ``).
    ``O(Q·L·K)`` instead of the ``O(L²·K)`` of forming ``A``: on XLA:CPU a whole training step
    (one query) of the synthetic grid's delta rule points is 1.9–2.2× faster than with ``A`` and
    the blocked solve :func:`~fwjax.ops.linalg.solve_unit_lower` (``benchmarks/retrieval_step.py``).

    The gradient is hand-written (``_delta_read_weights_bwd``): a forward scan that rebuilds
    ``u_{t+1} = u_t + β_t r'_t k̂_t`` from the stored ``u_1`` and ``r'`` instead of autodiff's
    stored per-step residuals (1.3–2.5× faster training steps, ``benchmarks/retrieval_step.py``).
    That rebuild is accurate only while no write grows ``u`` (``β‖k̂‖² <= 2``; the rounding of
    a large early ``u`` swamps the later, smaller ones otherwise): callers use it for
    contractive writes (:func:`_contractive_writes`) and :func:`_delta_read_weights_autodiff`
    otherwise. Being a ``custom_vjp``, it has no forward-mode derivatives (``jax.jvp``).

    Args:
      fq: query features ``[B, Q, K]``.
      fk: key features ``[B, L, K]``.
      beta: write strengths ``[B, L]``.

    Returns:
      ``r`` ``[B, Q, L]``.
    """
    return _delta_read_weights_fwd(fq, fk, beta)[0]


def _delta_read_weights_fwd(fq, fk, beta):
    u_first, r_prime = _back_substitution(fq, fk, beta)
    r = jnp.transpose(r_prime, (1, 2, 0)) * beta[:, None, :]  # r_t = β_t r'_t, [B, Q, L]
    return r, (u_first, r_prime, fk, beta)


def _delta_read_weights_bwd(res, r_bar):
    """Reverse of the back substitution, run forwards from ``t = 1`` with ``ū_1 = 0``. For
    ``r_t = β_t r'_t``, ``r'_t = k̂_t·u_{t+1}``, ``u_t = u_{t+1} − β_t r'_t k̂_t``::

        r̄'_t = β_t (r̄_t − ū_t·k̂_t)             β̄_t = Σ_q r'_t (r̄_t − ū_t·k̂_t)
        k̄_t = Σ_q (r̄'_t u_{t+1} − β_t r'_t ū_t)   ū_{t+1} = ū_t + r̄'_t k̂_t

    and ``q̄ = ū_{L+1}``."""
    u_first, r_prime, fk, beta = res

    def step(carry, xs):
        u, u_bar = carry  # u_t, ū_t: [B, Q, K]
        k, b, r, r_bar_t = xs  # [B, K], [B], [B, Q], [B, Q]
        g = r_bar_t - jnp.einsum("bqk,bk->bq", u_bar, k)  # r̄_t − ū_t·k̂_t
        r_prime_bar = b[:, None] * g
        u_next = u + (b[:, None] * r)[..., None] * k[:, None, :]  # u_{t+1}
        k_bar = jnp.einsum("bq,bqk->bk", r_prime_bar, u_next) - jnp.einsum(
            "bq,bqk->bk", b[:, None] * r, u_bar
        )
        u_bar = u_bar + r_prime_bar[..., None] * k[:, None, :]
        return (u_next, u_bar), (k_bar, jnp.sum(r * g, axis=1))

    time_major = (jnp.swapaxes(fk, 0, 1), jnp.swapaxes(beta, 0, 1))
    xs = (*time_major, r_prime, jnp.transpose(r_bar, (2, 0, 1)))
    (_, q_bar), (k_bar, beta_bar) = jax.lax.scan(step, (u_first, jnp.zeros_like(u_first)), xs)
    return q_bar, jnp.swapaxes(k_bar, 0, 1), jnp.swapaxes(beta_bar, 0, 1)


_delta_read_weights.defvjp(_delta_read_weights_fwd, _delta_read_weights_bwd)


def direct_predictions(model: RetrievalModel, keys, values, queries) -> jax.Array:
    """``RetrievalModel``'s predictions from a closed form at the queries (no ``[K, V]`` memory).

    With ``k̂_t = φ̂(W_k x_t)`` (φ, then the key normalisation), ``q̂ = φ̂(W_q embed(query))``,
    ``e_v = onehot(v)`` and the scores ``s_t = q̂·k̂_t``:

    * sum rule: ``S = Σ_t k̂_t e_{v_t}ᵀ``, so ``ŷ = Sᵀq̂ = Σ_t s_t e_{v_t}`` (a scatter-add of the
      scores into the value slots).
    * delta rule (zero initial memory): ``S = K̂ᵀŨ`` with ``(I + A) Ũ = diag(β) E``,
      ``A = tril(diag(β) K̂K̂ᵀ, −1)`` (one chunk of the chunkwise form), so
      ``ŷ = Ũᵀ K̂ q̂ = Σ_t r_t e_{v_t}`` with ``r = (s (I + A)⁻¹) ⊙ β``, computed by the
      backward substitution :func:`_delta_read_weights` (``O(Q·L·K)``, no ``L × L`` matrix).
    * attention normalisation: ``z_t = Σ_{j≤t} k̂_j``; the delta rule is fed
      ``k' = k̂/d``, ``β' = β·d`` with ``d_t = z_{t−1}·k̂_t`` (1 where 0), as in
      :func:`~fwjax.ops.fast_weight_attention`, and ``ŷ`` is divided by ``z_L·q̂ + eps``
      (eps = 1e-5, the op's default).

    * softmax attention: ``ŷ = Σ_t softmax_t(q·k_t/√d) e_{v_t}`` (raw q, k).

    In every case ``W_k x_t`` is computed as ``W_k[:, v_t] + (E W_k^e)[k_t]`` (gathers instead
    of a product with ``x_t``; :func:`_token_projections`).

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
        logits = jnp.einsum("bqd,bld->bql", q, k) / math.sqrt(cfg.d_key)
        return _scatter_values(jax.nn.softmax(logits, axis=-1), values, cfg.num_values)
    fw = cfg.fast_weight
    norm = fw.normalization
    fk = _fast_weight_features(model, k, key=True)
    fq = _fast_weight_features(model, q, key=False)
    z_last = None
    if norm.uses_normalizer:
        z_last = jnp.sum(fk, axis=1)
        if fw.update_rule is UpdateRule.DELTA:
            # The exclusive prefix sums z_{t−1} (XLA:CPU's cumsum is a quadratic reduce-window:
            # only the delta rule pays for it; the sum rule needs z_L alone).
            z_incl = jnp.cumsum(fk, axis=1)
            z_prev = jnp.concatenate([jnp.zeros_like(fk[:, :1]), z_incl[:, :-1]], axis=1)
            d = jnp.einsum("blk,blk->bl", z_prev, fk)
            d = jnp.where(d == 0, jnp.ones_like(d), d)
    if fw.update_rule is UpdateRule.DELTA:
        beta = jax.nn.sigmoid(beta_logit)
        if norm.uses_normalizer:
            fk, beta = fk / d[..., None], beta * d
        read = _delta_read_weights if _contractive_writes(fw) else _delta_read_weights_autodiff
        s = read(fq, fk, beta)  # r = s (I + A)⁻¹ diag(β)
    else:
        s = jnp.einsum("bqk,blk->bql", fq, fk)  # scores q̂·k̂_t, [B, Q, L]
    y = _scatter_values(s, values, cfg.num_values)  # Σ_t s_t e_{v_t}
    if z_last is not None:
        y = y / (jnp.einsum("bqk,bk->bq", fq, z_last) + 1e-5)[..., None]
    return y


def predictions(model: RetrievalModel, batch: dict, readout: Readout) -> jax.Array:
    """``[B, Q, num_values]`` predictions for a task batch, by ``readout``."""
    args = batch["keys"], batch["values"], batch["queries"]
    if Readout(readout) is Readout.DIRECT:
        return direct_predictions(model, *args)
    return model(*args)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def _draw_projection(model_config: RetrievalConfig, key):
    m = model_config.fast_weight.feature_map.num_features
    return feature_maps.draw_favor_projection(key, model_config.d_key, m)


def _make_functions(graphdef, tx, model_config: RetrievalConfig, protocol: RetrievalProtocol):
    """The jitted ``train_steps`` (``eval_every`` Adam steps in one ``lax.scan``) and
    ``eval_loss``. ``projection`` args are None unless FAVOR+ is redrawn per call."""

    def loss_fn(params, rest, batch, projection):
        if projection is not None:
            # The only non-Param state is FAVOR+'s projection: swap in this call's draw.
            rest = jax.tree.map(lambda _: projection, rest)
        model = nnx.merge(graphdef, params, rest)
        pred = predictions(model, batch, protocol.readout)
        return retrieval_loss(pred, batch["targets"], batch["mask"])

    redraw = model_config_uses_favor(model_config) and protocol.favor is FavorPolicy.REDRAW

    @jax.jit
    def train_steps(params, opt_state, rest, batches, keys):
        def step(carry, xs):
            params, opt_state = carry
            batch, key = xs
            projection = _draw_projection(model_config, key) if redraw else None
            loss, grads = jax.value_and_grad(loss_fn)(params, rest, batch, projection)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (batches, keys))
        return params, opt_state, losses

    @jax.jit
    def eval_loss(params, rest, batch, key):
        projection = _draw_projection(model_config, key) if redraw else None
        return loss_fn(params, rest, batch, projection)

    return train_steps, eval_loss


def model_config_uses_favor(model_config: RetrievalConfig) -> bool:
    """Whether the model has a FAVOR+ projection."""
    return (
        model_config.attention is AttentionKind.FAST_WEIGHT
        and model_config.fast_weight.feature_map.needs_projection
    )


def train_retrieval(
    task: RetrievalTask,
    model_config: RetrievalConfig,
    protocol: RetrievalProtocol | None = None,
    *,
    log: Callable[[int, float], None] | None = None,
) -> RetrievalResult:
    """Trains a fresh :class:`RetrievalModel` on ``task`` until the protocol's stopping rule.

    Training batch ``i`` (1-based step ``i + 1``) is ``task.batch(seed, i, batch_size)``; the
    evaluation sequences are ``task.batch(seed, j, eval_sequences, eval=True)`` with ``j = 0``
    (FIXED) or the evaluation number (FRESH). The loss is :func:`retrieval_loss`, averaged over
    every real query of the evaluation sequences.

    Args:
      task: the :class:`RetrievalTask` (setting and N).
      model_config: the model; ``num_keys`` / ``num_values`` must match the task's.
      protocol: a :class:`RetrievalProtocol` (None: the defaults).
      log: called as ``log(step, eval_loss)`` after every evaluation.

    Returns:
      A :class:`RetrievalResult`.
    """
    if (model_config.num_keys, model_config.num_values) != (task.num_keys, task.num_values):
        raise ValueError(
            f"model num_keys={model_config.num_keys}, num_values={model_config.num_values} do "
            f"not match the task's num_keys={task.num_keys}, num_values={task.num_values}"
        )
    start = time.perf_counter()
    p = RetrievalProtocol() if protocol is None else protocol
    root = jax.random.key(p.seed)
    init_key, official_key, train_favor_key, eval_favor_key = jax.random.split(root, 4)
    model = RetrievalModel(model_config, rngs=nnx.Rngs(params=init_key))
    if p.init is Init.OFFICIAL:
        official_init(model, official_key, embed_std=p.embed_std)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(p.learning_rate)
    opt_state = tx.init(params)
    train_steps, eval_loss = _make_functions(graphdef, tx, model_config, p)

    def eval_batch(j):
        index = 0 if p.eval_set is EvalSet.FIXED else j
        return task.batch(p.seed, index, p.eval_sequences, eval=True)

    fixed_eval = eval_batch(0) if p.eval_set is EvalSet.FIXED else None
    history, best, strikes, step = [], math.inf, 0, 0
    reason = StopReason.MAX_STEPS
    while step < p.max_steps:
        # One jitted call runs the eval_every steps up to the next evaluation.
        chunk = [task.batch(p.seed, step + i, p.batch_size) for i in range(p.eval_every)]
        batches = {name: np.stack([b[name] for b in chunk]) for name in chunk[0]}
        step_keys = jax.vmap(lambda i: jax.random.fold_in(train_favor_key, i))(
            jnp.arange(step, step + p.eval_every)
        )
        params, opt_state, _ = train_steps(params, opt_state, rest, batches, step_keys)
        step += p.eval_every
        n_eval = len(history)
        batch = fixed_eval if fixed_eval is not None else eval_batch(n_eval)
        eval_key = jax.random.fold_in(eval_favor_key, n_eval)
        loss = float(eval_loss(params, rest, batch, eval_key))
        history.append((step, loss))
        if log is not None:
            log(step, loss)
        if not math.isfinite(loss):
            raise FloatingPointError(f"evaluation loss {loss} at step {step}")
        if loss < best:
            best, strikes = loss, 0
        else:
            strikes += 1
        if loss <= p.target_loss:
            reason = StopReason.TARGET
            break
        if strikes >= p.patience:
            reason = StopReason.PATIENCE
            break
    return RetrievalResult(
        final_eval_loss=history[-1][1],
        best_eval_loss=best,
        steps=step,
        stop_reason=reason,
        seconds=time.perf_counter() - start,
        history=tuple(history),
        model=nnx.merge(graphdef, params, rest),
    )
