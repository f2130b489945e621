"""Closed-form read-out of a memory written once and read only after all writes.

The synthetic retrieval task (Schlag et al., 2021, Sec. 6.1) writes ``L`` (key, value) pairs and
reads at a few queries after the last write. With one-hot values ``e_{v_t}`` the read-out
``ŷ = Sᵀq̂`` of the fast weight memory ``S`` has a closed form that never builds the
``[K, V]`` matrix: ``ŷ = Σ_t r_t e_{v_t}`` with read weights ``r [B, Q, L]``:

* sum rule: ``r_t = s_t = q̂·k̂_t``;
* delta rule (zero initial memory): ``r = (s (I + A)⁻¹) ⊙ β``, ``A = tril(diag(β) K̂K̂ᵀ, −1)``
  (one chunk of the chunkwise form), by back substitution (:func:`delta_read_weights`,
  ``O(Q·L·K)``, no ``L × L`` matrix);
* attention normalisation: the delta rule is fed ``k' = k̂/d``, ``β' = β·d`` with
  ``d_t = z_{t−1}·k̂_t`` (1 where 0) and ``ŷ`` is divided by ``z_L·q̂ + eps``, as in
  :func:`~fwjax.ops.fast_weight_attention`;
* softmax attention (``feature_map=None``): ``r = softmax_t(q·k_t/√D)`` of the raw vectors.

Equal to :func:`~fwjax.ops.fast_weight_attention`'s last-step read with one-hot values up to
float rounding (``tests/ops/test_readout.py``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fwjax.ops.fast_weight_attention import Normalization, UpdateRule, memory_keys
from fwjax.ops.feature_maps import FeatureMap, FeatureMapKind
from fwjax.validation import check_positive_ints


def readout_features(
    q: jax.Array,
    k: jax.Array,
    feature_map: FeatureMap,
    normalization: Normalization | str,
    projection: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``(φ̂(q), φ̂(k))`` in float32: the features :func:`~fwjax.ops.fast_weight_attention`
    reads and writes with (keys: :func:`~fwjax.ops.memory_keys`; queries: φ, FAVOR+ stabilised
    whenever a normalisation is on, then the same normalisation).

    Args:
      q: raw queries ``[..., D]``; k: raw keys ``[..., D]``.
      feature_map, normalization, projection: as in :func:`~fwjax.ops.fast_weight_attention`.

    Returns:
      ``(fq [..., K], fk [..., K])`` with ``K = feature_map.output_dim(D)``.
    """
    norm = Normalization(normalization)
    fk = memory_keys(k, feature_map, norm, projection)
    fq = norm.normalize_features(
        feature_map(q, projection, stabilize=norm is not Normalization.NONE)
    )
    return fq.astype(jnp.float32), fk.astype(jnp.float32)


def contractive_writes(feature_map: FeatureMap, normalization: Normalization | str) -> bool:
    """Whether every delta-rule write ``u ← (I − β k̂k̂ᵀ) u`` is a contraction (``β‖k̂‖² <= 1``
    for ``β = σ(·) < 1``): unit-norm keys (L2, CENTERED_L2), or sum-normalised non-negative ones
    (``‖k̂‖₂ <= ‖k̂‖₁ = 1``; every map but IDENTITY). Attention normalisation's
    ``β' = β·(z_{t−1}·k̂_t)`` is unbounded."""
    norm = Normalization(normalization)
    if norm in (Normalization.L2, Normalization.CENTERED_L2):
        return True
    return norm is Normalization.SUM and feature_map.kind is not FeatureMapKind.IDENTITY


def _back_substitution(fq: jax.Array, fk: jax.Array, beta: jax.Array):
    """The query carried backwards through the writes (see :func:`delta_read_weights`).

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


def delta_read_weights_autodiff(fq: jax.Array, fk: jax.Array, beta: jax.Array) -> jax.Array:
    """:func:`delta_read_weights` differentiated by autodiff (per-step residuals stored):
    accurate for any keys, forward mode included. Shapes as :func:`delta_read_weights`."""
    _, r_prime = _back_substitution(fq, fk, beta)
    return jnp.transpose(r_prime, (1, 2, 0)) * beta[:, None, :]


@jax.custom_vjp
def delta_read_weights(fq: jax.Array, fk: jax.Array, beta: jax.Array) -> jax.Array:
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
    a large early ``u`` swamps the later, smaller ones otherwise): :func:`retrieval_readout`
    uses it for contractive writes (:func:`contractive_writes`) and
    :func:`delta_read_weights_autodiff` otherwise. Being a ``custom_vjp``, it has no
    forward-mode derivatives (``jax.jvp``).

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


delta_read_weights.defvjp(_delta_read_weights_fwd, _delta_read_weights_bwd)


def scatter_values(r: jax.Array, values: jax.Array, num_values: int) -> jax.Array:
    """``y[b, q, v] = Σ_{t: values[b, t] = v} r[b, q, t]``: read weights ``r [B, Q, L]``
    scattered into value slots, ``[B, Q, num_values]`` (the product with the one-hot values,
    without building them)."""

    def one(r_b, v_b):
        return jnp.zeros((r_b.shape[0], num_values), r_b.dtype).at[:, v_b].add(r_b)

    return jax.vmap(one)(r, values)


def _check(q, k, values, beta, num_values, feature_map, update_rule) -> None:
    if q.ndim != 3 or k.ndim != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"q [B, Q, D] and k [B, L, D] must match in B and D; got {q.shape=}, {k.shape=}"
        )
    if values.shape != k.shape[:2] or not jnp.issubdtype(values.dtype, jnp.integer):
        raise ValueError(
            f"values must be int [B, L] = {k.shape[:2]}; got {values.shape=} {values.dtype=}"
        )
    check_positive_ints(num_values=num_values)
    if update_rule not in (UpdateRule.SUM, UpdateRule.DELTA):
        raise ValueError(f"{update_rule=} must be SUM or DELTA")
    wants_beta = feature_map is not None and update_rule is UpdateRule.DELTA
    if wants_beta and (beta is None or beta.shape != k.shape[:2]):
        shape = None if beta is None else beta.shape
        raise ValueError(f"{update_rule=} needs beta [B, L] = {k.shape[:2]}; got {shape}")
    if not wants_beta and beta is not None:
        raise ValueError(f"beta is used by the delta rule only; got {update_rule=}")


def retrieval_readout(
    q: jax.Array,
    k: jax.Array,
    values: jax.Array,
    beta: jax.Array | None = None,
    *,
    num_values: int,
    feature_map: FeatureMap | None,
    normalization: Normalization | str = Normalization.SUM,
    update_rule: UpdateRule | str = UpdateRule.DELTA,
    projection: jax.Array | None = None,
    eps: float = 1e-5,
) -> jax.Array:
    """Reads a memory written with ``(k_t, onehot(values_t))`` for ``t = 1 … L`` (from zero) at
    the queries ``q``, in closed form (module docstring; no ``[K, V]`` matrix).

    Args:
      q: raw queries ``[B, Q, D]``.
      k: raw keys ``[B, L, D]``.
      values: int value ids ``[B, L]`` in ``[0, num_values)``.
      beta: write strengths ``[B, L]`` (after the sigmoid) for the delta rule; None otherwise.
      num_values: V, the one-hot width.
      feature_map: φ; None for softmax attention (raw ``q``, ``k``, scale ``1/√D``).
      normalization, update_rule, projection, eps: as in
        :func:`~fwjax.ops.fast_weight_attention` (SUM or DELTA rules).

    Returns:
      ``ŷ`` ``[B, Q, num_values]`` float32.
    """
    update_rule = UpdateRule(update_rule)
    _check(q, k, values, beta, num_values, feature_map, update_rule)
    if feature_map is None:
        logits = jnp.einsum("bqd,bld->bql", q, k) / math.sqrt(q.shape[-1])
        return scatter_values(jax.nn.softmax(logits, axis=-1), values, num_values)
    norm = Normalization(normalization)
    fq, fk = readout_features(q, k, feature_map, norm, projection)
    z_last = jnp.sum(fk, axis=1) if norm.uses_normalizer else None
    if update_rule is UpdateRule.DELTA:
        if norm.uses_normalizer:
            # The exclusive prefix sums z_{t−1} (XLA:CPU's cumsum is a quadratic reduce-window:
            # only the delta rule pays for it; the sum rule needs z_L alone).
            z_incl = jnp.cumsum(fk, axis=1)
            z_prev = jnp.concatenate([jnp.zeros_like(fk[:, :1]), z_incl[:, :-1]], axis=1)
            d = jnp.einsum("blk,blk->bl", z_prev, fk)
            d = jnp.where(d == 0, jnp.ones_like(d), d)
            fk, beta = fk / d[..., None], beta * d
        read = (
            delta_read_weights
            if contractive_writes(feature_map, norm)
            else delta_read_weights_autodiff
        )
        r = read(fq, fk, beta)  # r = s (I + A)⁻¹ diag(β)
    else:
        r = jnp.einsum("bqk,blk->bql", fq, fk)  # scores q̂·k̂_t, [B, Q, L]
    y = scatter_values(r, values, num_values)  # Σ_t r_t e_{v_t}
    if z_last is not None:
        y = y / (jnp.einsum("bqk,bk->bq", fq, z_last) + eps)[..., None]
    return y
