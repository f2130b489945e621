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

Two schedules, as the delta rule's (:mod:`fwjax.ops.delta_rule.chunked`), chosen per backend:

- fused (CPU): each chunk's terms, output and state in one scan step; the backward pass is
  autodiff through that scan with the step rematerialised (``jax.checkpoint``): one state per
  chunk is kept, a chunk's intra-chunk terms are recomputed from it.
- two-phase (accelerators): the terms of all chunks at once, a scan that carries only the
  chain ``S ← Γ_C S + K'ᵀ (U − W S)``, then every output ``O = Q' S + P (U − W S)`` at once; a
  hand-written backward pass mirrors it, with ``G = ∂L/∂S`` after each chunk::

      Ũ = U − W S,   Ũ̄ = Pᵀ Ō + K' G,   P̄ = (Ō Ũᵀ) ⊙ M,   Q̄' = Ō Sᵀ,   K̄' = Ũ Gᵀ,
      W̄ = −Ũ̄ Sᵀ,   Ū = Ũ̄,   Γ̄_C = Σ S ⊙ G,
      G ← Γ_C G + Q'ᵀ Ō − Wᵀ (Pᵀ Ō + K' G)            (a reverse scan of G alone)

  Both chains are affine, so ``state_segments > 1`` splits them into parallel segments
  (:mod:`fwjax.ops.state_split`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fwjax.ops.common import (
    chunk_cotangents,
    chunk_forward,
    cotangent_chain,
    cotangent_chain_linear,
    from_chunks,
    in_chunks,
    packed_chunks,
    state_chain,
    state_chain_linear,
    wy_terms,
)
from fwjax.ops.delta_rule.chunked import fused_phases
from fwjax.ops.state_split import emit_carry, pad_chunks, resolve_segments, segmented_scan


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


def _two_phase_forward(q, k, v, beta, log_alpha, s0, segments):
    """The accelerator schedule on chunked ``[N, B, H, C, .]`` inputs: ``(O, S, states)``."""
    q_d, k_d, w, u, p, decay = gated_terms(q, k, v, beta, log_alpha)  # all chunks at once
    xs, n = pad_chunks((k_d, w, u, decay), segments, fills=(0.0, 0.0, 0.0, 1.0))
    step = emit_carry(state_chain)  # emits the state entering each chunk
    s, states = segmented_scan(step, state_chain, state_chain_linear, s0, xs, segments)
    states = states[:n]
    o = q_d @ states + p @ (u - w @ states)  # every chunk at once
    return o, s, states


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def gated_chunks(q, k, v, beta, log_alpha, s0, segments):
    """The two-phase schedule: chunked inputs -> ``(o [N, B, H, C, V], S)``."""
    o, s, _ = _two_phase_forward(q, k, v, beta, log_alpha, s0, segments)
    return o, s


def _gated_chunks_fwd(q, k, v, beta, log_alpha, s0, segments):
    o, s, states = _two_phase_forward(q, k, v, beta, log_alpha, s0, segments)
    return (o, s), (q, k, v, beta, log_alpha, states)


def _gated_chunks_bwd(segments, residuals, cotangents):
    *xs, states = residuals
    d_o, d_s = cotangents
    (q_d, k_d, w, u, p, decay), terms_vjp = jax.vjp(gated_terms, *xs)  # recompute the terms
    chain_xs = (q_d, k_d, w, p, d_o, decay)
    chain_xs, n = pad_chunks(chain_xs, segments, fills=(0.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    step = emit_carry(cotangent_chain)  # emits G = ∂L/∂S after each chunk
    d_s0, g = segmented_scan(
        step, cotangent_chain, cotangent_chain_linear, d_s, chain_xs, segments, reverse=True
    )
    g = g[:n]
    d_terms = chunk_cotangents(q_d, k_d, w, u, p, states, g, d_o)  # all chunks at once
    d_decay = jnp.sum(states * g, axis=(-2, -1))  # Γ̄_C = Σ S ⊙ G
    return (*terms_vjp((*d_terms, d_decay)), d_s0)


gated_chunks.defvjp(_gated_chunks_fwd, _gated_chunks_bwd)


def gated_chunks_bwd(residuals, cotangents):
    """The VJP of the chunk scan from its residuals ``(q, k, v, β, log α, states)`` (chunked
    ``[N, B, H, C, .]``; ``states``: the state entering each chunk) and the cotangents
    ``(dO, dS)``: the two-phase backward pass (a reverse scan of ``G`` alone, then every
    chunk's cotangents at once). Returns ``(dq, dk, dv, dβ, d log α, dS⁰)``."""
    return _gated_chunks_bwd(1, residuals, cotangents)


def gated_delta_rule_chunked(q, k, v, gates, initial_state, scale, options):
    """See :func:`fwjax.ops.gated_delta_rule`. Any ``T``: the tail is padded with zero keys,
    β = 0 and α = 1 (exact no-ops)."""
    beta, alpha = gates
    log_alpha = jnp.log(alpha.astype(initial_state.dtype))  # zero-padded: log α = 0, α = 1
    chunks = in_chunks(q, k, v, (beta, log_alpha), initial_state, scale, options.chunk_size)
    segments = resolve_segments(options.state_segments, chunks[0].shape[0])
    if fused_phases(jax.default_backend()) and segments == 1:
        s, o = jax.lax.scan(chunk_step, initial_state, chunks)
    else:
        o, s = gated_chunks(*chunks, initial_state, segments)
    return from_chunks(o, q.shape[1]), s


def gated_delta_rule_chunked_packed(q, k, v, gates, initial_state, scale, options):
    """The CHUNKED form on packed rows: ``gates = (β, α, starts)``; the document starts act as
    masks inside each chunk (:func:`fwjax.ops.common.packed_terms`), never as ``log 0``."""
    beta, alpha, starts = gates
    log_alpha = jnp.log(alpha.astype(initial_state.dtype))
    chunk = options.chunk_size
    return packed_chunks(q, k, v, beta, log_alpha, starts, initial_state, scale, chunk)
