"""Small, exact helpers that make fast weight memories visible (used by ``notebooks/``).

Single-head views of the ops (inputs ``[T, K]``, already through the feature map):

* :func:`linear_attention_matrix` / :func:`delta_rule_attention_matrix`: the ``[T, T]`` matrix
  ``A`` with ``outputs = A V`` — linear attention computed as attention, for comparison with the
  fast weight form (:func:`fwjax.ops.sum_rule` / :func:`fwjax.ops.delta_rule`).
* :func:`fast_weight_snapshots`: the fast weight matrix ``S_t`` after every write.
* :func:`associative_sequence` and :func:`recall_error`: write key/value pairs into a memory
  and read them back, to compare the sum and delta rules when keys repeat or exceed capacity.
* :func:`feature_kernel`: ``φ̂(x)·φ̂(y)`` of a feature map, the similarity a memory retrieves by.
* :func:`capacity_sweep`: a small version of the paper's capacity experiment
  (:func:`fwjax.train.retrieval.run_retrieval` over feature maps and N).
* :func:`per_position_loss`: a language model's loss at every position of long sequences, with
  fast weights carried across segments or reset at every segment.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fwjax.data.retrieval import RetrievalSetting, RetrievalTask
from fwjax.diagnostics import replay_writes
from fwjax.nn.config import FastWeightConfig
from fwjax.nn.retrieval import RetrievalConfig
from fwjax.ops import FeatureMap, Normalization, UpdateRule, delta_rule, sum_rule
from fwjax.validation import check_positive_ints

_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------
# Attention matrix vs fast weight matrix
# ----------------------------------------------------------------------------------------------


def linear_attention_matrix(q: jax.Array, k: jax.Array) -> jax.Array:
    """The causal (unnormalised) linear attention matrix ``A = tril(Q Kᵀ)``.

    ``A V`` equals the sum rule's outputs ``o_t = S_tᵀ q_t`` with ``S_t = Σ_{j≤t} k_j v_jᵀ``
    (scale 1, empty initial memory): attention over the past, or a read of a fast weight matrix.

    Args:
      q: queries ``[T, K]`` (after the feature map).
      k: keys ``[T, K]`` (after the feature map).

    Returns:
      ``[T, T]``, lower triangular including the diagonal.
    """
    return jnp.tril(jnp.matmul(q, k.T, precision=_HIGHEST))


def delta_rule_attention_matrix(q: jax.Array, k: jax.Array, beta: jax.Array) -> jax.Array:
    """The delta rule's outputs as an attention matrix: ``outputs = A V`` with

    ``A = tril(Q Kᵀ) (I + tril(diag(β) K Kᵀ, −1))⁻¹ diag(β)``.

    The delta rule writes ``u_t = β_t (v_t − Σ_{j<t} (k_t·k_j) u_j)`` (the new value minus what
    the memory already returned for ``k_t``), i.e. ``(I + tril(diag(β) K Kᵀ, −1)) U = diag(β) V``,
    and reads ``o_t = Σ_{j≤t} (q_t·k_j) u_j``. Unlike linear attention, ``A`` can be negative:
    later writes subtract what earlier ones stored under similar keys. ``O(T³)``: for small T.

    Args:
      q: queries ``[T, K]`` (after the feature map and normalisation).
      k: keys ``[T, K]``.
      beta: write strengths ``[T]``.

    Returns:
      ``[T, T]``, lower triangular.
    """
    t = k.shape[0]
    gram = jnp.matmul(k, k.T, precision=_HIGHEST)
    lower = jnp.eye(t, dtype=gram.dtype) + jnp.tril(beta[:, None] * gram, -1)
    mixing = jax.scipy.linalg.solve_triangular(
        lower, jnp.diag(beta).astype(gram.dtype), lower=True, unit_diagonal=True
    )
    return jnp.matmul(linear_attention_matrix(q, k), mixing, precision=_HIGHEST)


def fast_weight_snapshots(
    k: jax.Array, v: jax.Array, beta: jax.Array | None = None, initial_state=None
) -> jax.Array:
    """The fast weight matrix after every write: ``[S_1, …, S_T]``.

    Sum rule (``beta`` None): ``S_t = S_{t-1} + k_t v_tᵀ``. Delta rule:
    ``S_t = S_{t-1} + β_t k_t (v_t − S_{t-1}ᵀ k_t)ᵀ``. ``S_T`` equals the final state of
    :func:`fwjax.ops.sum_rule` / :func:`fwjax.ops.delta_rule` for one head.

    Args:
      k: keys ``[T, K]`` (after the feature map).
      v: values ``[T, V]``.
      beta: write strengths ``[T]`` for the delta rule; None for the sum rule.
      initial_state: ``S_0`` ``[K, V]``; zeros when None.

    Returns:
      ``[T, K, V]`` (float32 or wider), from :func:`fwjax.diagnostics.replay_writes`.
    """
    head = lambda x: None if x is None else jnp.asarray(x)[None, :, None]  # [1, T, 1, .]
    s0 = None if initial_state is None else jnp.asarray(initial_state)[None, None]
    replay = replay_writes(head(k), head(v), head(beta), initial_state=s0, keep_states=True)
    return replay.states[0, :, 0]


# ----------------------------------------------------------------------------------------------
# Writing and reading associations without training
# ----------------------------------------------------------------------------------------------


def associative_sequence(
    seed: int,
    *,
    num_writes: int,
    num_keys: int,
    key_dim: int,
    value_dim: int,
    orthogonal: bool = True,
) -> dict:
    """A sequence of (key, value) writes from a pool of ``num_keys`` distinct unit keys.

    With ``num_writes == num_keys`` every key is written once (a random order); otherwise keys
    are drawn uniformly with replacement, so they repeat and the target of a key is the value
    of its LAST write (the paper's update setting, with fixed key vectors instead of learned
    ones). Values are random unit vectors.

    Args:
      seed: a pure function of it (NumPy generator).
      num_writes: sequence length ``L``.
      num_keys: size of the key pool.
      key_dim: ``d``; keys are orthonormal when ``orthogonal`` and ``num_keys <= d``, else
        independent random unit vectors.
      value_dim: dimension of the values.
      orthogonal: use orthonormal keys where possible.

    Returns:
      ``dict(keys [L, d], values [L, V], queries [M, d], targets [M, V])`` float32, queried at
      the ``M`` distinct keys written.
    """
    check_positive_ints(
        num_writes=num_writes, num_keys=num_keys, key_dim=key_dim, value_dim=value_dim
    )
    rng = np.random.default_rng(seed)
    if orthogonal and num_keys <= key_dim:
        pool = np.linalg.qr(rng.standard_normal((key_dim, key_dim)))[0].T[:num_keys]
    else:
        pool = rng.standard_normal((num_keys, key_dim))
        pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    if num_writes == num_keys:
        ids = rng.permutation(num_keys)
    else:
        ids = rng.integers(0, num_keys, num_writes)
    values = rng.standard_normal((num_writes, value_dim))
    values /= np.linalg.norm(values, axis=1, keepdims=True)
    last = {int(i): t for t, i in enumerate(ids)}  # later writes overwrite earlier ones
    present = sorted(last)
    return dict(
        keys=pool[ids].astype(np.float32),
        values=values.astype(np.float32),
        queries=pool[present].astype(np.float32),
        targets=values[[last[i] for i in present]].astype(np.float32),
    )


def recall_error(sequence: dict, update_rule: UpdateRule, beta: float = 1.0) -> float:
    """Writes ``sequence`` (from :func:`associative_sequence`) into an empty memory with
    ``update_rule``, reads ``ŷ = S_Tᵀ q`` at every query, and returns the mean over queries of
    ``‖ŷ − target‖² / ‖target‖²`` (0: perfect recall; 1: as bad as returning zeros).

    Args:
      sequence: ``dict(keys [L, d], values [L, V], queries [M, d], targets [M, V])``.
      update_rule: SUM or DELTA.
      beta: the delta rule's write strength, the same at every step.

    Returns:
      The mean relative squared error (a Python float).
    """
    k = jnp.asarray(sequence["keys"])[None, :, None]  # [1, L, 1, d]
    v = jnp.asarray(sequence["values"])[None, :, None]
    if UpdateRule(update_rule) is UpdateRule.DELTA:
        b = jnp.full(k.shape[:3], beta, k.dtype)
        _, s = delta_rule(k, k, v, b)
    else:
        _, s = sum_rule(k, k, v)
    y = jnp.matmul(jnp.asarray(sequence["queries"]), s[0, 0], precision=_HIGHEST)  # [M, V]
    t = jnp.asarray(sequence["targets"])
    return float(jnp.mean(jnp.sum((y - t) ** 2, -1) / jnp.sum(t * t, -1)))


# ----------------------------------------------------------------------------------------------
# Feature maps and capacity
# ----------------------------------------------------------------------------------------------


def feature_kernel(
    feature_map: FeatureMap,
    x: jax.Array,
    y: jax.Array,
    *,
    projection: jax.Array | None = None,
    normalization: Normalization = Normalization.NONE,
) -> jax.Array:
    """The kernel ``κ(x, y) = φ̂(x)·φ̂(y)`` of a feature map (with an optional key/query
    normalisation): what a fast weight memory retrieves by (``S_tᵀ φ̂(q) = Σ_j κ(q, k_j) v_j``
    for the sum rule).

    Args:
      feature_map: φ.
      x: ``[N, d]``.
      y: ``[M, d]``.
      projection: FAVOR+'s ``[d, m]`` projection (only for FAVOR+).
      normalization: NONE, SUM or L2 (applied to both sides after φ).

    Returns:
      ``[N, M]``.
    """
    norm = Normalization(normalization)
    if norm.uses_normalizer:
        raise ValueError(f"normalization={norm} divides outputs, not features; use NONE/SUM/L2")
    fx = norm.normalize_features(feature_map(x, projection))
    fy = norm.normalize_features(feature_map(y, projection))
    return jnp.matmul(fx, fy.T, precision=_HIGHEST)


@dataclasses.dataclass(frozen=True)
class CapacityPoint:
    """One point of :func:`capacity_sweep`.

    Attributes:
      name: the feature map's name (a key of the sweep's ``feature_maps``).
      num_keys: N (setting 1: N associations per sequence).
      d_dot: the memory's key dimension ``dim φ``.
      final_eval_loss: the last evaluation loss (0.5 for predicting zeros).
      steps: training steps taken.
      seconds: wall-clock time (compilation included).
    """

    name: str
    num_keys: int
    d_dot: int
    final_eval_loss: float
    steps: int
    seconds: float


def capacity_sweep(
    feature_maps: dict[str, FeatureMap],
    num_keys: list[int],
    protocol: Mapping[str, Any] | None = None,
    *,
    d_key: int = 16,
    update_rule: UpdateRule = UpdateRule.SUM,
    log=None,
) -> list[CapacityPoint]:
    """A small version of the paper's capacity experiment (setting 1): for every feature map
    and N, trains a :class:`~fwjax.nn.RetrievalModel` with
    :func:`~fwjax.train.retrieval.run_retrieval` and records its final evaluation loss.

    Normalisation follows the official synthetic code (and ``experiments/synthetic.py``):
    attention normalisation for the sum rule, sum normalisation for the delta rule.

    Args:
      feature_maps: name -> φ.
      num_keys: the N values.
      protocol: ``{"key.path": value}`` overrides of the paper's protocol (the
        ``retrieval_paper`` config: step cap, evaluation period, seed, ...; see
        :func:`~fwjax.train.retrieval.retrieval_train_config`), or a deprecated
        :class:`~fwjax.train.retrieval.RetrievalProtocol`.
      d_key: the key/query projection dimension (the paper: 64; smaller makes capacity limits
        show at small N, which is cheap).
      update_rule: SUM (the paper's capacity experiment) or DELTA.
      log: called with every finished :class:`CapacityPoint`.

    Returns:
      A list of :class:`CapacityPoint`, feature map by feature map, N increasing.
    """
    # The training stack, only when sweeping.
    from fwjax.train.retrieval import RetrievalProtocol, retrieval_train_config, run_retrieval

    rule = UpdateRule(update_rule)
    norm = Normalization.ATTENTION if rule is UpdateRule.SUM else Normalization.SUM
    points = []
    for name, fm in feature_maps.items():
        for n in sorted(num_keys):
            fw = FastWeightConfig(feature_map=fm, normalization=norm, update_rule=rule)
            config = RetrievalConfig(n, n, d_key=d_key, fast_weight=fw)
            task = RetrievalTask(RetrievalSetting.CAPACITY, n)
            if isinstance(protocol, RetrievalProtocol):
                run_config = protocol.train_config(task, config)
            else:
                run_config = retrieval_train_config(task, config, protocol)
            result = run_retrieval(run_config)
            point = CapacityPoint(
                name=name,
                num_keys=n,
                d_dot=fm.output_dim(d_key),
                final_eval_loss=result.final_eval_loss,
                steps=result.steps,
                seconds=result.seconds,
            )
            points.append(point)
            if log is not None:
                log(point)
    return points


# ----------------------------------------------------------------------------------------------
# Language models: reading beyond the training segment
# ----------------------------------------------------------------------------------------------


def per_position_loss(model, inputs, targets, *, segment_len: int, carry: bool) -> np.ndarray:
    """A :class:`~fwjax.nn.TransformerLM`'s next-token loss at every position of long
    sequences, fed in segments of ``segment_len`` tokens.

    With ``carry`` the state (fast weights) flows from each segment into the next, so position
    ``t`` can use everything before it; without, every segment starts from an empty memory, as if
    the model could only read ``segment_len`` tokens. For models of fast weight layers only,
    carrying equals one pass over the whole sequence.

    Args:
      model: a ``TransformerLM`` (put in eval mode here).
      inputs: token ids ``[B, L]``.
      targets: next-token ids ``[B, L]``.
      segment_len: tokens per call; must divide ``L``.
      carry: carry the state across segments (True) or reset it at every segment (False).

    Returns:
      ``[L]`` float64 NumPy: the cross-entropy (nats) at each position, averaged over ``B``.
    """
    inputs, targets = np.asarray(inputs), np.asarray(targets)
    b, length = inputs.shape
    if targets.shape != inputs.shape:
        raise ValueError(f"{inputs.shape=} and {targets.shape=} differ")
    if segment_len < 1 or length % segment_len:
        raise ValueError(f"{segment_len=} must be positive and divide the length {length}")
    model.eval()
    graphdef, params = nnx.split(model)

    @jax.jit
    def segment(params, x, y, state):
        m = nnx.merge(graphdef, params)
        logits, state = m(x, state)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y), state

    state = model.init_state(b)
    fresh = state
    losses = []
    for start in range(0, length, segment_len):
        sl = slice(start, start + segment_len)
        loss, state = segment(params, inputs[:, sl], targets[:, sl], state if carry else fresh)
        losses.append(np.asarray(loss, np.float64))
    return np.concatenate(losses, axis=1).mean(axis=0)
