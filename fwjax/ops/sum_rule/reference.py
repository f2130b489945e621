"""Sum rule, REFERENCE form: the causal-masked quadratic form of linear attention.

``O = scale · (Q S⁰ + (Q Kᵀ ⊙ M) V)`` with ``M`` lower-triangular including the diagonal, and
``S_T = S⁰ + Kᵀ V``. Independent of the recurrence (no state is ever stepped), at the highest
matmul precision: the oracle of the parity suite. Memory ``O(T²)`` per head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fwjax.ops.chunking import causal_mask

_HIGHEST = jax.lax.Precision.HIGHEST


def sum_rule_reference(q, k, v, initial_state, scale, chunk_size):
    """See :func:`fwjax.ops.sum_rule`. ``chunk_size`` is unused."""
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
