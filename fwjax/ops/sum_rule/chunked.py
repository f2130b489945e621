"""Sum rule, CHUNKED form: masked quadratic attention inside chunks, a state scan across them,
with a hand-written backward pass.

Per chunk with incoming state ``S⁰`` and ``P = Q Kᵀ ⊙ M`` (``M`` lower-triangular including
the diagonal): ``O = Q S⁰ + P V`` and ``S = S⁰ + Kᵀ V``. The forward pass keeps the inputs and
the state entering each chunk (``[N, B, H, K, V]``); the backward pass walks the chunks in
reverse with ``G = ∂L/∂S``::

    P̄ = (Ō Vᵀ) ⊙ M,   Q̄ = Ō S⁰ᵀ + P̄ K,   K̄ = V Gᵀ + P̄ᵀ Q,   V̄ = Pᵀ Ō + K G,   G ← G + Qᵀ Ō
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fwjax.ops.common import causal_mask, from_chunks, in_chunks, mT, packed_chunks


def _scores(q, k):
    return jnp.where(causal_mask(q.shape[-2], include_diagonal=True), q @ mT(k), 0)


def _scan_forward(q, k, v, s0):
    def chunk_step(s, inputs):
        q_i, k_i, v_i = inputs
        o_i = q_i @ s + _scores(q_i, k_i) @ v_i
        return s + mT(k_i) @ v_i, (o_i, s)

    s, (o, states) = jax.lax.scan(chunk_step, s0, (q, k, v))
    return o, s, states


@jax.custom_vjp
def sum_chunks(q, k, v, s0):
    """Chunked ``[N, B, H, C, .]`` inputs in the compute dtype -> (o [N, B, H, C, V], S)."""
    o, s, _ = _scan_forward(q, k, v, s0)
    return o, s


def _sum_chunks_fwd(q, k, v, s0):
    o, s, states = _scan_forward(q, k, v, s0)
    return (o, s), (q, k, v, states)


def sum_chunks_bwd(residuals, cotangents):
    """The VJP of :func:`sum_chunks` from its residuals ``(q, k, v, states)`` (``states``: the
    state entering each chunk) and the cotangents ``(dO, dS)``; returns ``(dq, dk, dv, dS⁰)``."""
    q, k, v, states = residuals
    d_o, d_s = cotangents
    mask = causal_mask(q.shape[-2], include_diagonal=True)

    def chunk_step(g, inputs):
        q_i, k_i, v_i, s_i, do_i = inputs
        dp = jnp.where(mask, do_i @ mT(v_i), 0)
        dq = do_i @ mT(s_i) + dp @ k_i
        dk = v_i @ mT(g) + mT(dp) @ q_i
        dv = mT(_scores(q_i, k_i)) @ do_i + k_i @ g
        return g + mT(q_i) @ do_i, (dq, dk, dv)

    d_s0, (dq, dk, dv) = jax.lax.scan(chunk_step, d_s, (q, k, v, states, d_o), reverse=True)
    return dq, dk, dv, d_s0


sum_chunks.defvjp(_sum_chunks_fwd, sum_chunks_bwd)


def sum_rule_chunked(q, k, v, gates, initial_state, scale, options):
    """See :func:`fwjax.ops.sum_rule`. Any ``T``: the tail is padded with zeros."""
    chunks = in_chunks(q, k, v, gates, initial_state, scale, options.chunk_size)
    o, s = sum_chunks(*chunks, initial_state)
    return from_chunks(o, q.shape[1]), s


def sum_rule_chunked_packed(q, k, v, gates, initial_state, scale, options):
    """The CHUNKED form on packed rows: ``gates = (starts,)``; the document starts act as masks
    inside each chunk (:func:`fwjax.ops.common.packed_terms`)."""
    (starts,) = gates
    return packed_chunks(q, k, v, None, None, starts, initial_state, scale, options.chunk_size)
