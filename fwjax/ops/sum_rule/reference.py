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

from fwjax.ops.common import HIGHEST, causal_mask, no_starts, per_head


def _one_head(q, k, v, starts, s0):
    """q, k: [T, K]; v: [T, V]; starts: [T]; s0: [K, V] -> (o: [T, V], S_T: [K, V])."""

    def step(s, inputs):
        q_t, k_t, v_t, start_t = inputs
        s = jnp.where(start_t != 0, 0.0, s)  # a document start empties the memory
        s = s + jnp.outer(k_t, v_t)  # S_t = S_{t-1} + k_t v_tᵀ
        return s, jnp.matmul(s.T, q_t, precision=HIGHEST)  # o_t = S_tᵀ q_t

    s_final, o = jax.lax.scan(step, s0, (q, k, v, starts))
    return o, s_final


def sum_rule_reference(q, k, v, gates, initial_state, scale, options):
    """See :func:`fwjax.ops.sum_rule`; ``options`` are unused."""
    return sum_rule_reference_packed(q, k, v, (no_starts(k),), initial_state, scale, options)


def sum_rule_reference_packed(q, k, v, gates, initial_state, scale, options):
    """The REFERENCE form on packed rows: ``gates = (starts,)``."""
    del options
    return per_head(_one_head, q, k, v, gates, initial_state, scale)


def sum_rule_quadratic(q, k, v, initial_state, scale):
    """The causal-masked quadratic form (not an :class:`~fwjax.ops.Impl`: a second oracle of the
    tests); inputs as :func:`fwjax.ops.sum_rule` after validation, the same results."""
    dtype = initial_state.dtype
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    t = q.shape[1]
    scores = jnp.einsum("bthk,bshk->bhts", q, k, precision=HIGHEST)
    scores = jnp.where(causal_mask(t, include_diagonal=True), scores, 0)
    o = jnp.einsum("bhts,bshv->bthv", scores, v, precision=HIGHEST)
    o = o + jnp.einsum("bthk,bhkv->bthv", q, initial_state, precision=HIGHEST)
    s = initial_state + jnp.einsum("bthk,bthv->bhkv", k, v, precision=HIGHEST)
    return scale * o, s
