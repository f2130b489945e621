"""Sum rule, REFERENCE forms: the literal step-by-step equations, and the causal-masked quadratic
form of linear attention. Both at the highest matmul precision, in the state dtype.

``sum_rule_reference`` (what ``Impl.REFERENCE`` runs) steps ``S_t = S_{t-1} + k_t v_tᵀ``,
``o_t = scale · S_tᵀ q_t`` for one head at a time. ``sum_rule_quadratic`` never steps a state:
``O = scale · (Q S⁰ + (Q Kᵀ ⊙ M) V)`` with ``M`` lower-triangular including the diagonal and
``S_T = S⁰ + Kᵀ V`` (memory ``O(T²)`` per head); the tests use it as a second, independent oracle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fwjax.ops.chunking import causal_mask

_HIGHEST = jax.lax.Precision.HIGHEST


def _one_head(q, k, v, s0):
    """q, k: [T, K]; v: [T, V]; s0: [K, V] -> (o: [T, V], S_T: [K, V])."""

    def step(s, inputs):
        q_t, k_t, v_t = inputs
        s = s + jnp.outer(k_t, v_t)  # S_t = S_{t-1} + k_t v_tᵀ
        return s, jnp.matmul(s.T, q_t, precision=_HIGHEST)  # o_t = S_tᵀ q_t

    s_final, o = jax.lax.scan(step, s0, (q, k, v))
    return o, s_final


def sum_rule_reference(q, k, v, initial_state, scale, chunk_size):
    """See :func:`fwjax.ops.sum_rule`. ``chunk_size`` is unused."""
    del chunk_size
    dtype = initial_state.dtype
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    per_head = jax.vmap(_one_head, in_axes=(1, 1, 1, 0), out_axes=(1, 0))
    o, s = jax.vmap(per_head)(q, k, v, initial_state)
    return scale * o, s


def sum_rule_quadratic(q, k, v, initial_state, scale, chunk_size=None):
    """The causal-masked quadratic form; same signature and results as the other forms."""
    del chunk_size
    dtype = initial_state.dtype
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    t = q.shape[1]
    scores = jnp.einsum("bthk,bshk->bhts", q, k, precision=_HIGHEST)
    scores = jnp.where(causal_mask(t, include_diagonal=True), scores, 0)
    o = jnp.einsum("bhts,bshv->bthv", scores, v, precision=_HIGHEST)
    o = o + jnp.einsum("bthk,bhkv->bthv", q, initial_state, precision=_HIGHEST)
    s = initial_state + jnp.einsum("bthk,bthv->bhkv", k, v, precision=_HIGHEST)
    return scale * o, s
