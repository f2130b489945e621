"""Fast weight attention: feature map, key/query normalisation and update rule composed.

This is the paper's attention layer minus the projections: ``q, k`` arrive as raw head vectors
(``[B, T, H, D]``), get mapped by φ, normalised, and are written to / read from a fast weight
memory with the sum or delta rule. Choices are enums and a frozen :class:`FeatureMap`, so they can
be static jit arguments and layer configuration.
"""

from __future__ import annotations

import enum
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fwjax.ops.delta_product import delta_product
from fwjax.ops.delta_rule import delta_rule
from fwjax.ops.feature_maps import FeatureMap, centered_l2_norm, l2_norm, sum_norm
from fwjax.ops.gated_delta_rule import gated_delta_rule
from fwjax.ops.impl import Impl, resolve_scale, state_dtype
from fwjax.ops.pallas import PallasOptions
from fwjax.ops.segments import document_starts, segmented_cumsum, start_index
from fwjax.ops.sum_rule import sum_rule
from fwjax.shapes import (
    Alpha,
    Beta,
    Keys,
    Outputs,
    Projection,
    RawHeads,
    Scale,
    SegmentIds,
    Values,
)


class UpdateRule(enum.Enum):
    """How the fast weights are written.

    Attributes:
      SUM: ``S_t = S_{t-1} + φ(k_t) v_tᵀ`` (linear attention).
      DELTA: ``S_t = S_{t-1} + β_t φ(k_t) (v_t − v̄_t)ᵀ`` with ``v̄_t = S_{t-1}ᵀ φ(k_t)``.
      GATED_DELTA: ``S_t = α_t (I − β_t φ(k_t) φ(k_t)ᵀ) S_{t-1} + β_t φ(k_t) v_tᵀ`` (Yang et al.,
        2024): the delta rule with a decay gate ``α_t ∈ (0, 1]`` per head and step.
    """

    SUM = "sum"
    DELTA = "delta"
    GATED_DELTA = "gated_delta"


class Normalization(enum.Enum):
    """How keys, queries and outputs are normalised.

    Attributes:
      NONE: none; ``y_t = S_tᵀ φ(q_t)``.
      ATTENTION: the linear transformer's attention normalisation. ``z_t = z_{t-1} + φ(k_t)``,
        ``y_t = S_tᵀ φ(q_t) / (z_tᵀ φ(q_t) + eps)``; with the delta rule the retrieval is
        normalised too, ``v̄_t = S_{t-1}ᵀ φ(k_t) / (z_{t-1}ᵀ φ(k_t))``.
      SUM: the paper's sum normalisation ``φ(x) / Σ_j φ(x)_j`` on keys and queries; no ``z``.
      L2: ``φ(x) / ‖φ(x)‖`` on keys and queries (DeltaNet, 2024); no ``z``.
      CENTERED_L2: fwjax's own: ``c / ‖c‖`` with ``c = φ(x) − mean_j φ(x)_j`` on keys and
        queries; no ``z`` (:func:`~fwjax.ops.feature_maps.centered_l2_norm`: exact overwrites
        like L2, less interference between the positive keys of φ).
      SUM_ATTENTION: sum normalisation followed by attention normalisation (the official code's
        ``CudaNorm*`` layers).
    """

    NONE = "none"
    ATTENTION = "attention"
    SUM = "sum"
    L2 = "l2"
    CENTERED_L2 = "centered_l2"
    SUM_ATTENTION = "sum_attention"

    @property
    def uses_normalizer(self) -> bool:
        """Whether the state carries the ``z`` accumulator."""
        return self in (Normalization.ATTENTION, Normalization.SUM_ATTENTION)

    @property
    def cancels_key_scale(self) -> bool:
        """Whether a positive per-key factor on φ(k) cancels (so FAVOR+ may stabilise keys)."""
        return self in (
            Normalization.SUM,
            Normalization.L2,
            Normalization.CENTERED_L2,
            Normalization.SUM_ATTENTION,
        )

    def normalize_features(self, x: jax.Array) -> jax.Array:
        if self in (Normalization.SUM, Normalization.SUM_ATTENTION):
            return sum_norm(x)
        if self is Normalization.L2:
            return l2_norm(x)
        if self is Normalization.CENTERED_L2:
            return centered_l2_norm(x)
        return x


class FastWeightState(NamedTuple):
    """The carried memory of :func:`fast_weight_attention`.

    Attributes:
      fast_weights: ``S``, ``[B, H, K, V]``.
      normalizer: ``z = Σ φ(k)``, ``[B, H, K]``, or None when the normalisation keeps none.
    """

    fast_weights: jax.Array
    normalizer: jax.Array | None = None


def init_fast_weight_state(
    batch_size: int,
    num_heads: int,
    key_dim: int,
    value_dim: int,
    normalization: Normalization,
    dtype=jnp.float32,
) -> FastWeightState:
    """An empty memory: zeros, with a ``z`` accumulator when ``normalization`` keeps one."""
    s = jnp.zeros((batch_size, num_heads, key_dim, value_dim), dtype)
    z = None
    if normalization.uses_normalizer:
        z = jnp.zeros((batch_size, num_heads, key_dim), dtype)
    return FastWeightState(s, z)


_ELU_P1 = FeatureMap()


_STATIC = (
    "feature_map",
    "normalization",
    "update_rule",
    "impl",
    "chunk_size",
    "pallas",
    "state_segments",
)


@functools.partial(jax.jit, static_argnames=_STATIC)
def fast_weight_attention(
    q: RawHeads,
    k: RawHeads,
    v: Values,
    beta: Beta | None = None,
    *,
    feature_map: FeatureMap = _ELU_P1,
    normalization: Normalization | str = Normalization.SUM,
    update_rule: UpdateRule | str = UpdateRule.DELTA,
    projection: Projection | None = None,
    scale: Scale = 1.0,
    state: FastWeightState | None = None,
    impl: Impl | str = Impl.AUTO,
    chunk_size: int | None = None,
    eps: float = 1e-5,
    alpha: Alpha | None = None,
    pallas: PallasOptions | None = None,
    segment_ids: SegmentIds | None = None,
    state_segments: int | None = None,
) -> tuple[Outputs, FastWeightState]:
    """Applies φ, the normalisation and the update rule; returns outputs and the carried memory.

    With ``φ̂`` the feature map followed by the key/query normalisation (SUM / L2)::

        SUM rule:    S_t = S_{t-1} + φ̂(k_t) v_tᵀ
        DELTA rule:  S_t = S_{t-1} + β_t φ̂(k_t) (v_t − v̄_t)ᵀ,   v̄_t = S_{t-1}ᵀ φ̂(k_t) / d_t
        output:      y_t = scale · S_tᵀ φ̂(q_t) / n_t

    where without attention normalisation ``d_t = n_t = 1``, and with it
    ``z_t = z_{t-1} + φ̂(k_t)``, ``d_t = z_{t-1}ᵀ φ̂(k_t)`` (1 where it is 0: nothing stored yet,
    as in the official code's first step) and ``n_t = z_tᵀ φ̂(q_t) + eps``. The normalised delta
    rule is computed exactly as the plain delta rule fed ``k' = φ̂(k)/d`` and ``β' = β·d``.

    FAVOR+ stabilisation (subtracting the max exponent) is applied to queries whenever a
    normalisation is on, and to keys under SUM, L2 and SUM_ATTENTION, where the per-vector factor
    cancels (up to L2's eps guard); otherwise the exact map is used.

    Args:
      q, k: raw queries and keys ``[B, T, H, D]`` (before φ). Keys ``[B, T, N, H, D]`` with
        values ``[B, T, N, H, V]`` and ``beta [B, T, N, H]`` write ``N`` times per token
        (DeltaProduct, :func:`fwjax.ops.delta_product`; DELTA rule, no attention
        normalisation).
      v: values ``[B, T, H, V]``.
      beta: write strengths ``[B, T, H]`` for the (gated) delta rule; None for the sum rule.
      feature_map: the map φ.
      normalization: a :class:`Normalization`.
      update_rule: an :class:`UpdateRule`.
      projection: FAVOR+'s ``[D, M]`` random projection; None for other maps.
      scale: output scale (the paper: ``1/√d_head``); None: ``K ** -0.5`` with ``K`` the
        feature dimension (flash-linear-attention's convention).
      state: a carried :class:`FastWeightState`, or None for an empty memory.
      impl, chunk_size, pallas: passed to :func:`delta_rule` / :func:`sum_rule` /
        :func:`gated_delta_rule` (``pallas``: the :class:`~fwjax.ops.pallas.PallasOptions` of
        ``Impl.PALLAS``).
      eps: added to the attention normalisation's output denominator.
      alpha: decay gates ``[B, T, H]`` in ``(0, 1]`` for GATED_DELTA (with NONE, SUM or L2
        normalisation); None otherwise.
      segment_ids: packed rows, integer ``[B, T]`` document ids (:mod:`fwjax.ops.segments`):
        the memory and ``z`` are emptied at each document start (the first document continues
        ``state``); None: one sequence per row.
      state_segments: the CHUNKED form of the DELTA and GATED_DELTA rules (and their PALLAS
        form under ``PallasSchedule.PHASED``) runs its chunk scans as this many parallel
        segments (see :func:`delta_rule`); other rules and forms ignore it.

    Returns:
      ``(y, state)``: ``y [B, T, H, V]`` in the inputs' promoted dtype and the new
      :class:`FastWeightState` (``K = feature_map.output_dim(D)``).
    """
    normalization, update_rule = Normalization(normalization), UpdateRule(update_rule)
    if update_rule is not UpdateRule.SUM and beta is None:
        raise ValueError(f"{update_rule=} needs beta of shape [B, T, H]")
    if update_rule is UpdateRule.SUM and beta is not None:
        raise ValueError("update_rule=SUM takes no beta; pass beta=None")
    if (update_rule is UpdateRule.GATED_DELTA) != (alpha is not None):
        raise ValueError(f"alpha [B, T, H] is needed by GATED_DELTA only; got {update_rule=}")
    if update_rule is UpdateRule.GATED_DELTA and normalization.uses_normalizer:
        raise ValueError(
            f"GATED_DELTA has no attention normalisation (its z would need the gates); got "
            f"{normalization=}"
        )
    out_dtype = jnp.result_type(q, k, v)
    fq = _query_features(q, feature_map, normalization, projection)
    fk = memory_keys(k, feature_map, normalization, projection)

    s0 = None if state is None else state.fast_weights
    forms = {"impl": impl, "chunk_size": chunk_size, "pallas": pallas, "segment_ids": segment_ids}
    if fk.ndim == 5:  # DeltaProduct: N keys per token
        if update_rule is not UpdateRule.DELTA or normalization.uses_normalizer:
            raise ValueError(
                f"keys [B, T, N, H, D] (DeltaProduct) need update_rule=DELTA without attention "
                f"normalisation; got {update_rule=}, {normalization=}"
            )
        y, s = delta_product(fq, fk, v, beta, s0, scale, **forms)
        return y.astype(out_dtype), FastWeightState(s, None)
    if not normalization.uses_normalizer:
        if update_rule is UpdateRule.GATED_DELTA:
            y, s = gated_delta_rule(
                fq, fk, v, beta, alpha, s0, scale, **forms, state_segments=state_segments
            )
        elif update_rule is UpdateRule.DELTA:
            y, s = delta_rule(fq, fk, v, beta, s0, scale, **forms, state_segments=state_segments)
        else:
            y, s = sum_rule(fq, fk, v, s0, scale, **forms)
        return y.astype(out_dtype), FastWeightState(s, None)

    # Attention normalisation: z_{t-1} and z_t from a running sum of the keys.
    dtype = state_dtype(fq.dtype, fk.dtype, v.dtype, *([] if s0 is None else [s0.dtype]))
    fq, fk = fq.astype(dtype), fk.astype(dtype)
    b, _, h, key_dim = fk.shape
    if state is None or state.normalizer is None:
        z0 = jnp.zeros((b, h, key_dim), dtype)
    else:
        z0 = state.normalizer.astype(dtype)
    if segment_ids is None:
        z_incl = z0[:, None] + jnp.cumsum(fk, axis=1)  # z_t, [B, T, H, K]
        z_prev = jnp.concatenate([z0[:, None], z_incl], axis=1)[:, :-1]  # z_{t-1} (any T, 0 too)
    else:
        # z restarts at each document start; only the first document continues z0.
        starts = document_starts(segment_ids, fk.shape[:2])
        first_doc = (start_index(starts) == 0)[:, :, None, None]
        z_incl = segmented_cumsum(fk, starts) + jnp.where(first_doc, z0[:, None], 0)
        z_prev = jnp.concatenate([z0[:, None], z_incl], axis=1)[:, :-1]
        z_prev = jnp.where(starts[:, :, None, None], 0, z_prev)
    if update_rule is UpdateRule.DELTA:
        d = jnp.einsum("bthk,bthk->bth", z_prev, fk)
        d = jnp.where(d == 0, jnp.ones_like(d), d)
        k_d, beta_d = fk / d[..., None], beta * d
        y, s = delta_rule(fq, k_d, v, beta_d, s0, scale, **forms, state_segments=state_segments)
    else:
        y, s = sum_rule(fq, fk, v, s0, scale, **forms)
    n = jnp.einsum("bthk,bthk->bth", z_incl, fq) + eps
    y = y.astype(dtype) / n[..., None]
    z_final = z_incl[:, -1] if fk.shape[1] else z0  # z_T
    return y.astype(out_dtype), FastWeightState(s, z_final)


def memory_keys(
    k: RawHeads,
    feature_map: FeatureMap,
    normalization: Normalization | str,
    projection: Projection | None = None,
) -> Keys:
    """φ̂(k): the keys :func:`fast_weight_attention` writes with (the feature map, FAVOR+
    stabilised where the normalisation cancels the factor, then the key normalisation).

    Args:
      k: raw keys ``[B, T, H, D]``.

    Returns:
      ``[B, T, H, K]`` with ``K = feature_map.output_dim(D)``.
    """
    normalization = Normalization(normalization)
    fk = feature_map(k, projection, stabilize=normalization.cancels_key_scale)
    return normalization.normalize_features(fk)


def _query_features(q, feature_map: FeatureMap, normalization: Normalization, projection):
    """φ̂(q): the feature map (FAVOR+ stabilised whenever a normalisation cancels the factor),
    then the key/query normalisation."""
    stabilize = normalization is not Normalization.NONE
    return normalization.normalize_features(feature_map(q, projection, stabilize=stabilize))


@functools.partial(jax.jit, static_argnames=("feature_map", "normalization"))
def fast_weight_read(
    q: RawHeads,
    state: FastWeightState,
    *,
    feature_map: FeatureMap = _ELU_P1,
    normalization: Normalization | str = Normalization.SUM,
    projection: Projection | None = None,
    scale: Scale = 1.0,
    eps: float = 1e-5,
) -> Outputs:
    """Reads a memory with queries, writing nothing: ``y = scale · Sᵀ φ̂(q) / n``.

    ``n = zᵀ φ̂(q) + eps`` under attention normalisation, else 1 (as in
    :func:`fast_weight_attention`, whose outputs are these reads of the state after each step).

    Args:
      q: raw queries ``[B, T, H, D]``.
      state: a :class:`FastWeightState` (``S: [B, H, K, V]``).
      feature_map, normalization, projection, scale, eps: as in :func:`fast_weight_attention`.

    Returns:
      ``[B, T, H, V]`` in the state dtype.
    """
    normalization = Normalization(normalization)
    s = state.fast_weights
    fq = _query_features(q, feature_map, normalization, projection).astype(s.dtype)
    y = resolve_scale(scale, fq.shape[-1]) * jnp.einsum("bthk,bhkv->bthv", fq, s)
    if normalization.uses_normalizer:
        if state.normalizer is None:
            raise ValueError(f"{normalization=} needs state.normalizer (the z accumulator)")
        y = y / (jnp.einsum("bthk,bhk->bth", fq, state.normalizer) + eps)[..., None]
    return y
