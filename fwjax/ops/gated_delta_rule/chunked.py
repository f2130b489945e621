"""Gated delta rule, CHUNKED form: the WY / UT transform with per-chunk decay (Yang, Kautz and
Hatamizadeh, 2024, "Gated Delta Networks"), in the row convention.

Inside one chunk of ``C`` steps with incoming state ``S⁰``, let ``g_t = Σ_{s≤t} log α_s`` (the
log of the cumulative gate ``Γ_t = α_1 ⋯ α_t`` from the chunk start) and
``D_{tj} = Γ_t / Γ_j = exp(g_t − g_j)`` for ``j ≤ t`` (0 above the diagonal). Unrolling
``u_t = β_t (v_t − α_t S_{t-1}ᵀ k_t)``, ``S_t = α_t S_{t-1} + k_t u_tᵀ`` gives
``(I + A) Ũ = diag(β) V − diag(β Γ) K S⁰`` with ``A = tril(diag(β) K Kᵀ ⊙ D, −1)``, hence::

    W = (I + A)⁻¹ diag(β Γ) K,   U = (I + A)⁻¹ diag(β) V,   Ũ = U − W S⁰
    O = diag(Γ) Q S⁰ + (Q Kᵀ ⊙ D) Ũ
    S = Γ_C S⁰ + (diag(Γ_C / Γ) K)ᵀ Ũ

All exponents are ``≤ 0``: no overflow however small the gates. With ``α ≡ 1`` this is the
delta rule's chunked form: both take ``W, U, P`` from :func:`fwjax.ops.common.wy_terms` and run
phase 2 with :func:`fwjax.ops.common.chunk_forward`.

Backward: autodiff through a ``lax.scan`` over chunks whose step is rematerialised
(``jax.checkpoint``): the forward pass keeps one state per chunk, the backward pass recomputes a
chunk's intra-chunk terms from it (the memory profile of the delta rule's hand-written VJP).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fwjax.ops.common import chunk_forward, from_chunks, in_chunks, packed_chunks, wy_terms


def gated_terms(q, k, v, beta, log_alpha):
    """The intra-chunk terms of chunks ``[..., C, .]`` with the decays folded in:
    ``(Q', K', W, U, P, Γ_C)`` with ``Q' = diag(Γ) Q``, ``K' = diag(Γ_C / Γ) K`` (factors ≤ 1)
    and ``W, U, P`` of :func:`fwjax.ops.common.wy_terms` (shared by the CHUNKED and PALLAS
    forms)."""
    w, u, p, g = wy_terms(q, k, v, beta, log_alpha)
    q_decayed = jnp.exp(g)[..., None] * q
    k_decayed = jnp.exp(g[..., -1:] - g)[..., None] * k
    return q_decayed, k_decayed, w, u, p, jnp.exp(g[..., -1])


@jax.checkpoint
def chunk_step(s, inputs):
    """One chunk ``(q, k, v, β, log α)``, each ``[B, H, C, .]``, with incoming state
    ``s [B, H, K, V]`` -> ``(S, O)``."""
    *terms, decay = gated_terms(*inputs)
    o, s = chunk_forward(*terms, s, decay)
    return s, o


def gated_chunks_bwd(residuals, cotangents):
    """The VJP of the chunk scan from its residuals ``(q, k, v, β, log α, states)`` (chunked
    ``[N, B, H, C, .]``; ``states``: the state entering each chunk) and the cotangents
    ``(dO, dS)``: a reverse scan of :func:`chunk_step`'s VJP. Returns
    ``(dq, dk, dv, dβ, d log α, dS⁰)``."""
    *xs, states = residuals

    def step(g, inputs):
        *x, s, do = inputs
        _, pullback = jax.vjp(chunk_step, s, tuple(x))
        g, dx = pullback((g, do))
        return g, dx

    d_o, d_s = cotangents
    d_s0, dxs = jax.lax.scan(step, d_s, (*xs, states, d_o), reverse=True)
    return (*dxs, d_s0)


def gated_delta_rule_chunked(q, k, v, gates, initial_state, scale, options):
    """See :func:`fwjax.ops.gated_delta_rule`. Any ``T``: the tail is padded with zero keys,
    β = 0 and α = 1 (exact no-ops)."""
    beta, alpha = gates
    log_alpha = jnp.log(alpha.astype(initial_state.dtype))  # zero-padded: log α = 0, α = 1
    chunks = in_chunks(q, k, v, (beta, log_alpha), initial_state, scale, options.chunk_size)
    s, o = jax.lax.scan(chunk_step, initial_state, chunks)
    return from_chunks(o, q.shape[1]), s


def gated_delta_rule_chunked_packed(q, k, v, gates, initial_state, scale, options):
    """The CHUNKED form on packed rows: ``gates = (β, α, starts)``; the document starts act as
    masks inside each chunk (:func:`fwjax.ops.common.packed_terms`), never as ``log 0``."""
    beta, alpha, starts = gates
    log_alpha = jnp.log(alpha.astype(initial_state.dtype))
    chunk = options.chunk_size
    return packed_chunks(q, k, v, beta, log_alpha, starts, initial_state, scale, chunk)
