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
delta rule's chunked form. ``(I + A)⁻¹`` uses the matmul-only inverse of :mod:`fwjax.ops.linalg`.

Backward: autodiff through a ``lax.scan`` over chunks whose step is rematerialised
(``jax.checkpoint``): the forward pass keeps one state per chunk, the backward pass recomputes a
chunk's intra-chunk terms from it (the memory profile of the delta rule's hand-written VJP).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fwjax.ops.chunking import causal_mask, from_chunks, to_chunks
from fwjax.ops.linalg import unit_lower_triangular_inverse


def _mT(x):
    return jnp.swapaxes(x, -1, -2)


def gated_wy_terms(k, v, beta, log_alpha):
    """The intra-chunk terms of chunks ``[..., C, .]``: ``(g, D, W, U)`` with ``g = log Γ``,
    ``D_{tj} = Γ_t / Γ_j`` (``j ≤ t``, else 0), ``W = (I + A)⁻¹ diag(βΓ) K`` and
    ``U = (I + A)⁻¹ diag(β) V`` (shared by the CHUNKED and PALLAS forms)."""
    c = k.shape[-2]
    g = jnp.cumsum(log_alpha, axis=-1)  # g_t = log Γ_t
    incl = causal_mask(c, include_diagonal=True)
    excl = causal_mask(c, include_diagonal=False)
    diff = jnp.where(incl, g[..., :, None] - g[..., None, :], 0.0)
    decay = jnp.where(incl, jnp.exp(diff), 0.0)  # D_{tj} = Γ_t / Γ_j (j ≤ t)
    a = jnp.where(excl, beta[..., :, None] * (k @ _mT(k)) * decay, 0.0)
    t_inv = unit_lower_triangular_inverse(a)  # (I + A)⁻¹
    w = t_inv @ ((beta * jnp.exp(g))[..., None] * k)  # W = (I + A)⁻¹ diag(βΓ) K
    u = t_inv @ (beta[..., None] * v)  # U = (I + A)⁻¹ diag(β) V
    return g, decay, w, u


@jax.checkpoint
def _chunk(s, inputs):
    """One chunk ``[B, H, C, .]`` with incoming state ``s [B, H, K, V]`` -> (S, O)."""
    q, k, v, beta, log_alpha = inputs
    g, decay, w, u = gated_wy_terms(k, v, beta, log_alpha)
    gamma = jnp.exp(g)
    u_tilde = u - w @ s  # Ũ = U − W S⁰
    o = (gamma[..., None] * q) @ s + ((q @ _mT(k)) * decay) @ u_tilde
    tail = jnp.exp(g[..., -1:] - g)  # Γ_C / Γ_j
    s = jnp.exp(g[..., -1])[..., None, None] * s + _mT(tail[..., None] * k) @ u_tilde
    return s, o


def gated_delta_rule_chunked(q, k, v, beta, alpha, initial_state, scale, chunk_size):
    """See :func:`fwjax.ops.gated_delta_rule`. Any ``T``: the tail is padded with zero keys,
    β = 0 and α = 1 (exact no-ops)."""
    t = q.shape[1]
    dtype = initial_state.dtype
    c = min(chunk_size, t)
    q = scale * q.astype(dtype)  # o is linear in q: the scale stays differentiable
    log_alpha = jnp.log(alpha.astype(dtype))  # zero-padded by to_chunks: log α = 0, α = 1
    chunks = tuple(to_chunks(x.astype(dtype), c) for x in (q, k, v, beta, log_alpha))
    s, o = jax.lax.scan(_chunk, initial_state, chunks)
    return from_chunks(o, t), s
