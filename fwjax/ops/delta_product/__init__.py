"""DeltaProduct (Siems et al., 2025, "DeltaProduct: Improving State-Tracking in Linear RNNs via
Householder Products"): ``N`` delta-rule steps per token.

Each token writes ``N`` key/value pairs with their own write strengths; the state transition of
a token is the product of ``N`` generalised Householder transforms ``I − β_j k_j k_jᵀ`` (with
``β ∈ (0, 2)``: reflections, see ``FastWeightConfig.beta_range``), and the memory is read once,
after the token's last step::

    S ← S + β_{t,j} k_{t,j} (v_{t,j} − Sᵀ k_{t,j})ᵀ     for j = 1 … N
    o_t = scale · Sᵀ q_t

Forms: REFERENCE is these equations, a loop over tokens and their steps (the oracle). The
other Impls are the delta rule's forms (:func:`fwjax.ops.delta_rule`) over the interleaved
sequence of ``N·T`` steps ``(k_{1,1}, …, k_{1,N}, k_{2,1}, …)``, with the query at each
token's last step and zero queries elsewhere (a zero query reads nothing), read at every
``N``-th step: exact, and CHUNKED / PALLAS keep their parallelism (their chunk counts steps,
not tokens).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fwjax.ops import registry
from fwjax.ops.common import HIGHEST
from fwjax.ops.delta_rule.recurrent import delta_rule_step
from fwjax.ops.impl import Impl, prepare_inputs, resolve_impl, resolve_scale
from fwjax.ops.pallas import PallasOptions
from fwjax.ops.segments import document_starts
from fwjax.shapes import Outputs, Queries, Scale, SegmentIds, State

_STATIC = ("impl", "chunk_size", "pallas")


@functools.partial(jax.jit, static_argnames=_STATIC)
def delta_product(
    q: Queries,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    initial_state: State | None = None,
    scale: Scale = 1.0,
    impl: Impl | str = Impl.AUTO,
    chunk_size: int | None = None,
    pallas: PallasOptions | None = None,
    segment_ids: SegmentIds | None = None,
) -> tuple[Outputs, State]:
    """DeltaProduct: ``N`` delta-rule steps per token, one read (equations in the module).

    Args:
      q: queries ``[B, T, H, K]``.
      k: keys ``[B, T, N, H, K]``: the ``N`` keys of every token, in order.
      v: values ``[B, T, N, H, V]``.
      beta: write strengths ``[B, T, N, H]`` (``(0, 2)`` allows reflections).
      initial_state: ``[B, H, K, V]``; zeros when None.
      scale: output scale; None: ``K ** -0.5``.
      impl: REFERENCE (the per-token loop) or any Impl of the delta rule (run on the interleaved
        sequence); AUTO: the delta rule's default (CHUNKED with ``segment_ids``).
      chunk_size: chunk length of CHUNKED / PALLAS in interleaved steps (``N`` per token).
      pallas: the :class:`~fwjax.ops.pallas.PallasOptions` of PALLAS.
      segment_ids: packed rows, integer ``[B, T]`` (:mod:`fwjax.ops.segments`).

    Returns:
      ``(out [B, T, H, V], S_T [B, H, K, V])``, dtypes as :func:`fwjax.ops.delta_rule`.
    """
    q, k, v, beta = (jnp.asarray(x) for x in (q, k, v, beta))
    if k.ndim != 5 or v.ndim != 5 or beta.ndim != 4:
        raise ValueError(
            f"k, v must be [B, T, N, H, D] and beta [B, T, N, H]; got {k.shape=}, {v.shape=}, "
            f"{beta.shape=}"
        )
    b, t, n, h, key_dim = k.shape
    if q.shape != (b, t, h, key_dim) or v.shape[:4] != (b, t, n, h) or beta.shape != k.shape[:4]:
        raise ValueError(
            f"shapes disagree: {q.shape=} must be [B, T, H, K]={(b, t, h, key_dim)}, "
            f"{v.shape=} [B, T, N, H, V], {beta.shape=} [B, T, N, H]"
        )
    if segment_ids is not None:
        document_starts(segment_ids, (b, t))  # validates [B, T] and the dtype
    if resolve_impl(impl) is Impl.REFERENCE:
        return _reference(q, k, v, beta, initial_state, scale, segment_ids)
    # Interleave: step (t, j) is step t·N + j; the query sits at each token's last step.
    ks, vs = k.reshape(b, t * n, h, key_dim), v.reshape(b, t * n, h, v.shape[-1])
    betas = beta.reshape(b, t * n, h)
    qs = jnp.zeros((b, t, n, h, key_dim), q.dtype).at[:, :, -1].set(q).reshape(ks.shape)
    ids = None if segment_ids is None else jnp.repeat(jnp.asarray(segment_ids), n, axis=1)
    out, state = registry.run_rule(
        registry.DELTA,
        qs,
        ks,
        vs,
        (betas,),
        initial_state,
        scale,
        impl,
        chunk_size,
        pallas,
        segment_ids=ids,
    )
    return out[:, n - 1 :: n], state


def _reference(q, k, v, beta, initial_state, scale, segment_ids):
    """The per-token loop of the module docstring (highest precision, in the state dtype)."""
    b, t, n, h, key_dim = k.shape
    flat = [x.reshape(b, t * n, *x.shape[3:]) for x in (k, v)]
    p = prepare_inputs(
        jnp.repeat(q, n, axis=1), *flat, {"beta": beta.reshape(b, t * n, h)}, initial_state
    )
    dtype = p.initial_state.dtype
    scale = resolve_scale(scale, key_dim)
    starts = jnp.zeros((b, t), bool)
    if segment_ids is not None:
        starts = document_starts(segment_ids, (b, t))
    xs = (
        q.astype(dtype),
        k.astype(dtype),
        v.astype(dtype),
        beta.astype(dtype),
        starts,
    )

    def token(s, inputs):
        q_t, k_t, v_t, beta_t, start = inputs  # [B, H, K], [B, N, H, K], [B, N, H, V], [B, N, H]
        s = jnp.where(start[:, None, None, None], 0.0, s)  # a document start empties the memory
        for j in range(n):  # the token's N Householder steps
            v_bar = jnp.einsum("bhk,bhkv->bhv", k_t[:, j], s, precision=HIGHEST)
            update = beta_t[:, j, :, None] * (v_t[:, j] - v_bar)
            s = s + k_t[:, j, :, :, None] * update[:, :, None, :]
        return s, scale * jnp.einsum("bhk,bhkv->bhv", q_t, s, precision=HIGHEST)

    s, out = jax.lax.scan(token, p.initial_state, tuple(jnp.moveaxis(x, 1, 0) for x in xs))
    return jnp.moveaxis(out, 0, 1).astype(p.out_dtype), s


def delta_product_step(q_t, k_t, v_t, beta_t, state, scale=1.0):
    """One DeltaProduct token for every batch element and head (the decode path).

    Args:
      q_t: ``[B, H, K]``; k_t: ``[B, N, H, K]``; v_t: ``[B, N, H, V]``; beta_t: ``[B, N, H]``.
      state: ``[B, H, K, V]``.
      scale: output scale; None: ``K ** -0.5``.

    Returns:
      ``(o_t [B, H, V], new_state)``.
    """
    zero = jnp.zeros_like(q_t)
    for j in range(k_t.shape[1]):
        read = q_t if j == k_t.shape[1] - 1 else zero
        o_t, state = delta_rule_step(read, k_t[:, j], v_t[:, j], beta_t[:, j], state, scale)
    return o_t, state


__all__ = ["delta_product", "delta_product_step"]
