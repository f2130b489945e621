"""Delta rule, CHUNKED form: chunkwise-parallel WY / UT transform (Yang et al., 2024), with a
hand-written backward pass.

Row convention, one chunk of ``C`` steps with rows ``K, V, Q``, write strengths ``β`` and
incoming state ``S⁰``. Unrolling ``u_t = β_t (v_t − S_{t-1}ᵀ k_t)`` inside the chunk gives
``(I + A) Ũ = diag(β) (V − K S⁰)`` with ``A = tril(diag(β) K Kᵀ, −1)``, hence

    T = (I + A)⁻¹ diag(β),   W = T K,   U = T V,   P = Q Kᵀ ⊙ M      (phase 1: all chunks at once)
    Ũ = U − W S⁰                                                     (the written values u_t)
    O = Q S⁰ + P Ũ,   S = S⁰ + Kᵀ Ũ                                   (phase 2: scan over chunks)

with ``M`` lower-triangular including the diagonal. ``(I + A)⁻¹`` comes from a matmul-only
triangular inverse (:mod:`fwjax.ops.linalg`).

Memory: the forward pass keeps only the inputs and the state entering each chunk
(``[N, B, H, K, V]``). The backward pass recomputes phase 1 (and takes its VJP) and walks the
chunks in reverse with ``G = ∂L/∂S`` (state after the chunk)::

    Ũ̄ = Pᵀ Ō + K G,   P̄ = (Ō Ũᵀ) ⊙ M,   Q̄ = Ō S⁰ᵀ,   K̄ = Ũ Gᵀ,   W̄ = −Ũ̄ S⁰ᵀ,   Ū = Ũ̄
    G ← G + Qᵀ Ō − Wᵀ Ũ̄                                           (now ∂L/∂S⁰)

Both chains are affine in their carry, ``S ← (I − KᵀW) S + KᵀU`` and
``G ← (I − WᵀK) G + Qᵀ Ō − Wᵀ Pᵀ Ō``, so with ``state_segments = P > 1`` both scans run as
``P`` parallel segments (:mod:`fwjax.ops.state_split`): more parallelism for long sequences
with few batch elements and heads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fwjax.ops.common import (
    causal_mask,
    chunk_cotangents,
    chunk_forward,
    cotangent_chain,
    cotangent_chain_linear,
    from_chunks,
    in_chunks,
    mT,
    packed_chunks,
    state_chain,
    state_chain_linear,
    wy_terms,
)
from fwjax.ops.state_split import emit_carry, pad_chunks, resolve_segments, segmented_scan


def delta_wy_terms(q, k, v, beta):
    """Phase 1 on chunked inputs ``[N, B, H, C, .]``: ``(W, U, P)``
    (:func:`fwjax.ops.common.wy_terms` without a gate)."""
    return wy_terms(q, k, v, beta)[:3]


def _chunk_backward(q_i, k_i, w_i, u_i, p_i, s_i, do_i, g):
    """VJP of one chunk of phase 2; ``g`` is ∂L/∂S after the chunk, ``s_i`` the state before."""
    u_tilde = u_i - w_i @ s_i
    du_tilde = mT(p_i) @ do_i + k_i @ g
    mask = causal_mask(q_i.shape[-2], include_diagonal=True)
    dp = jnp.where(mask, do_i @ mT(u_tilde), 0)
    dq = do_i @ mT(s_i)
    dk = u_tilde @ mT(g)
    dw = -du_tilde @ mT(s_i)
    g = g + mT(q_i) @ do_i - mT(w_i) @ du_tilde  # now ∂L/∂S⁰
    return g, (dq, dk, dw, du_tilde, dp)


def _scan_forward(q, k, v, beta, s0, fused, segments=1):
    """Phase 2 over all chunks; returns ``(O, S_final, states entering each chunk)``.

    ``fused``: compute each chunk's phase-1 terms and output inside the scan step (working set
    of one chunk, which stays in cache on CPU). Otherwise (the accelerator schedule of
    flash-linear-attention's ``chunk_delta_h`` + ``chunk_o``): phase 1 for all chunks at once,
    a scan that carries only the state chain ``S ← S + Kᵀ (U − W S)`` (two matmuls per chunk),
    then every chunk's output ``O = Q S + P (U − W S)`` at once. ``segments``: that chain as
    so many parallel segments (:mod:`fwjax.ops.state_split`).
    """
    if fused and segments == 1:

        def chunk_step(s, inputs):
            q_i, k_i, v_i, beta_i = inputs
            o_i, s_new = chunk_forward(q_i, k_i, *delta_wy_terms(q_i, k_i, v_i, beta_i), s)
            return s_new, (o_i, s)

        s, (o, states) = jax.lax.scan(chunk_step, s0, (q, k, v, beta))
        return o, s, states

    w, u, p = delta_wy_terms(q, k, v, beta)
    xs, n = pad_chunks((k, w, u, None), segments)
    step = emit_carry(state_chain)  # emits the state entering each chunk
    s, states = segmented_scan(step, state_chain, state_chain_linear, s0, xs, segments)
    states = states[:n]
    o = q @ states + p @ (u - w @ states)  # every chunk at once
    return o, s, states


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def delta_chunks(q, k, v, beta, s0, fused, segments=1):
    """Chunked ``[N, B, H, C, .]`` inputs in the compute dtype -> (o [N, B, H, C, V], S).

    ``fused`` and ``segments``: the schedule of :func:`_scan_forward` (the backward pass uses
    the same)."""
    o, s, _ = _scan_forward(q, k, v, beta, s0, fused, segments)
    return o, s


def _delta_chunks_fwd(q, k, v, beta, s0, fused, segments):
    o, s, states = _scan_forward(q, k, v, beta, s0, fused, segments)
    return (o, s), (q, k, v, beta, states)


def delta_chunks_bwd(fused, segments, residuals, cotangents):
    """The VJP of :func:`delta_chunks` from its residuals ``(q, k, v, β, states)`` (``states``:
    the state entering each chunk, ``[N, B, H, K, V]``) and the cotangents ``(dO, dS)``;
    returns ``(dq, dk, dv, dβ, dS⁰)``.

    Unfused, the mirror of the forward schedule: the chain ``G ← G + Qᵀ Ō − Wᵀ (Pᵀ Ō + K G)``
    alone in a reverse scan (as ``segments`` parallel segments when ``segments > 1``), then
    every chunk's gradients at once from its incoming state and its ``G``."""
    q, k, v, beta, states = residuals
    d_o, d_s = cotangents
    if fused and segments == 1:

        def chunk_step(g, inputs):
            q_i, k_i, v_i, beta_i, s_i, do_i = inputs
            wy, wy_vjp = jax.vjp(delta_wy_terms, q_i, k_i, v_i, beta_i)  # recompute phase 1
            g, (dq, dk, *d_wy) = _chunk_backward(q_i, k_i, *wy, s_i, do_i, g)
            dq_wy, dk_wy, dv, d_beta = wy_vjp(tuple(d_wy))
            return g, (dq + dq_wy, dk + dk_wy, dv, d_beta)

        d_s0, grads = jax.lax.scan(chunk_step, d_s, (q, k, v, beta, states, d_o), reverse=True)
        return (*grads, d_s0)

    (w, u, p), wy_vjp = jax.vjp(delta_wy_terms, q, k, v, beta)  # recompute phase 1
    xs, n = pad_chunks((q, k, w, p, d_o, None), segments)
    step = emit_carry(cotangent_chain)  # emits G = ∂L/∂S after each chunk
    d_s0, g = segmented_scan(
        step, cotangent_chain, cotangent_chain_linear, d_s, xs, segments, reverse=True
    )
    d_q, d_k, *d_wy = chunk_cotangents(q, k, w, u, p, states, g[:n], d_o)  # all chunks at once
    dq_wy, dk_wy, dv, d_beta = wy_vjp(tuple(d_wy))
    return d_q + dq_wy, d_k + dk_wy, dv, d_beta, d_s0


delta_chunks.defvjp(_delta_chunks_fwd, delta_chunks_bwd)

# Whether phase 1 runs inside the chunk scan, per backend platform. On XLA:CPU, small batched
# matmuls are several times faster when their working set (one chunk) stays in cache
# (benchmarks/README.md); accelerators prefer all chunks' phase 1 as one parallel batch.
_FUSED_PHASES = {"cpu": True}


def delta_rule_chunked(q, k, v, gates, initial_state, scale, options):
    """See :func:`fwjax.ops.delta_rule`. Any ``T``: the tail is padded with zero keys and β = 0."""
    chunks = in_chunks(q, k, v, gates, initial_state, scale, options.chunk_size)
    segments = resolve_segments(options.state_segments, chunks[0].shape[0])
    fused = fused_phases(jax.default_backend())
    o, s = delta_chunks(*chunks, initial_state, fused, segments)
    return from_chunks(o, q.shape[1]), s


def delta_rule_chunked_packed(q, k, v, gates, initial_state, scale, options):
    """The CHUNKED form on packed rows: ``gates = (β, starts)``; the document starts act as
    masks inside each chunk (:func:`fwjax.ops.common.packed_terms`)."""
    beta, starts = gates
    return packed_chunks(q, k, v, beta, None, starts, initial_state, scale, options.chunk_size)


def fused_phases(platform: str) -> bool:
    """Whether the chunked delta rule fuses phase 1 into the chunk scan on ``platform``."""
    return _FUSED_PHASES.get(platform, False)
