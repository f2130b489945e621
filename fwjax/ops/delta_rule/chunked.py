"""Delta rule, CHUNKED form: chunkwise-parallel WY / UT transform (Yang et al., 2024).

Row convention, one chunk of ``C`` steps with rows ``K, V, Q``, write strengths ``β`` and
incoming state ``S⁰``. Unrolling ``u_t = β_t (v_t − S_{t-1}ᵀ k_t)`` inside the chunk gives
``(I + A) U_true = diag(β) (V − K S⁰)`` with ``A = tril(diag(β) K Kᵀ, −1)``, hence

    T = (I + A)⁻¹ diag(β),   W = T K,   U = T V          (intra-chunk, all chunks in parallel)
    Ũ = U − W S⁰                                          (the written values u_t of the chunk)
    O = Q S⁰ + (Q Kᵀ ⊙ M) Ũ,   S = S⁰ + Kᵀ Ũ               (inter-chunk scan; M includes i = j)

``(I + A)⁻¹`` comes from a matmul-only triangular inverse (:mod:`fwjax.ops.linalg`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fwjax.ops.chunking import causal_mask, from_chunks, to_chunks
from fwjax.ops.linalg import unit_lower_triangular_inverse


def delta_rule_chunked(q, k, v, beta, initial_state, scale, chunk_size):
    """See :func:`fwjax.ops.delta_rule`. Any ``T``: the tail is padded with zero keys and β = 0."""
    t = q.shape[1]
    dtype = initial_state.dtype
    c = min(chunk_size, t)  # one short chunk is cheaper than padding a long one
    qc, kc, vc = (to_chunks(x.astype(dtype), c) for x in (q, k, v))  # [N, B, H, C, .]
    bc = to_chunks(beta.astype(dtype), c)  # [N, B, H, C]

    # Intra-chunk WY terms, in parallel over all chunks.
    kk = jnp.einsum("...ik,...jk->...ij", kc, kc)
    a = jnp.where(causal_mask(c, include_diagonal=False), bc[..., :, None] * kk, 0)
    t_mat = unit_lower_triangular_inverse(a) * bc[..., None, :]  # (I + A)⁻¹ diag(β)
    w = t_mat @ kc  # [N, B, H, C, K]
    u = t_mat @ vc  # [N, B, H, C, V]
    qk = jnp.where(causal_mask(c, include_diagonal=True), qc @ jnp.swapaxes(kc, -1, -2), 0)

    # Inter-chunk recurrence on the state.
    def chunk_step(s, inputs):
        q_i, k_i, w_i, u_i, qk_i = inputs
        u_tilde = u_i - w_i @ s  # Ũ = U − W S⁰
        o_i = q_i @ s + qk_i @ u_tilde  # O = Q S⁰ + (Q Kᵀ ⊙ M) Ũ
        s = s + jnp.swapaxes(k_i, -1, -2) @ u_tilde  # S = S⁰ + Kᵀ Ũ
        return s, o_i

    s, o = jax.lax.scan(chunk_step, initial_state, (qc, kc, w, u, qk))
    return scale * from_chunks(o, t), s
