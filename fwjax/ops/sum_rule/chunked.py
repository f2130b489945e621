"""Sum rule, CHUNKED form: masked quadratic attention inside chunks, a state scan across them.

Per chunk with incoming state ``S⁰``: ``O = Q S⁰ + (Q Kᵀ ⊙ M) V`` (``M`` lower-triangular
including the diagonal) and ``S = S⁰ + Kᵀ V``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fwjax.ops.chunking import causal_mask, from_chunks, to_chunks


def sum_rule_chunked(q, k, v, initial_state, scale, chunk_size):
    """See :func:`fwjax.ops.sum_rule`. Any ``T``: the tail is padded with zeros."""
    t = q.shape[1]
    dtype = initial_state.dtype
    c = min(chunk_size, t)
    qc, kc, vc = (to_chunks(x.astype(dtype), c) for x in (q, k, v))  # [N, B, H, C, .]
    # Intra-chunk causal scores, in parallel over all chunks.
    qk = jnp.where(causal_mask(c, include_diagonal=True), qc @ jnp.swapaxes(kc, -1, -2), 0)

    def chunk_step(s, inputs):
        q_i, k_i, v_i, qk_i = inputs
        o_i = q_i @ s + qk_i @ v_i
        s = s + jnp.swapaxes(k_i, -1, -2) @ v_i
        return s, o_i

    s, o = jax.lax.scan(chunk_step, initial_state, (qc, kc, vc, qk))
    return scale * from_chunks(o, t), s
