"""Helpers shared by the forms of every fast weight rule (the pattern of flash-linear-attention's
``ops/common``): chunking of ``[B, T, H, .]`` sequences, the causal mask, and the WY / UT terms
and phase-2 step that the chunkwise delta and gated delta rules share.

Padding appends zeros at the end of time. For the fast weight ops that is exact: a zero key
writes nothing and reads nothing, β = 0 writes nothing and log α = 0 (α = 1) decays nothing, so
padded steps leave the state unchanged; padded outputs are sliced away.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fwjax.ops.linalg import unit_lower_triangular_inverse

HIGHEST = jax.lax.Precision.HIGHEST  # the REFERENCE forms' matmul precision


def mT(x: jax.Array) -> jax.Array:
    """Swaps the last two axes (the matrix transpose of a batch of matrices)."""
    return jnp.swapaxes(x, -1, -2)


def causal_mask(size: int, *, include_diagonal: bool) -> jax.Array:
    """Boolean ``[C, C]`` lower-triangular mask (``i >= j``, or ``i > j`` without the diagonal),
    from 2-D iotas: it lowers in XLA and inside the Pallas kernels (Triton, Mosaic)."""
    rows = jax.lax.broadcasted_iota(jnp.int32, (size, size), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (size, size), 1)
    return rows >= cols if include_diagonal else rows > cols


def num_chunks(t: int, chunk_size: int) -> int:
    return -(-t // chunk_size)


def to_chunks(x: jax.Array, chunk_size: int) -> jax.Array:
    """``[B, T, H, *rest] -> [N, B, H, C, *rest]``, zero-padding time to ``N·C``."""
    b, t, h = x.shape[:3]
    rest = x.shape[3:]
    n = num_chunks(t, chunk_size)
    x = jnp.pad(x, [(0, 0), (0, n * chunk_size - t)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(b, n, chunk_size, h, *rest)
    return jnp.moveaxis(x, (1, 2), (0, 3))  # [N, B, H, C, *rest]


def from_chunks(x: jax.Array, t: int) -> jax.Array:
    """``[N, B, H, C, *rest] -> [B, T, H, *rest]``, dropping the padding."""
    n, b, h, c = x.shape[:4]
    x = jnp.moveaxis(x, (0, 3), (1, 2))  # [B, N, C, H, *rest]
    return x.reshape(b, n * c, h, *x.shape[4:])[:, :t]


def scaled_inputs(q, k, v, gates, initial_state, scale) -> tuple[jax.Array, ...]:
    """``(scale·q, k, v, *gates)`` in the state dtype. The scale is folded into ``q`` (every
    output is linear in ``q``), so it stays differentiable."""
    dtype = initial_state.dtype
    return (scale * q.astype(dtype), *(x.astype(dtype) for x in (k, v, *gates)))


def in_chunks(q, k, v, gates, initial_state, scale, chunk_size) -> tuple[jax.Array, ...]:
    """:func:`scaled_inputs` split into chunks of ``min(chunk_size, T)`` steps, ``[N, B, H, C, .]``
    (one short chunk is cheaper than padding a long one)."""
    c = min(chunk_size, q.shape[1])
    return tuple(to_chunks(x, c) for x in scaled_inputs(q, k, v, gates, initial_state, scale))


def in_time_major(q, k, v, gates, initial_state, scale) -> tuple[jax.Array, ...]:
    """:func:`scaled_inputs` as time-major ``[T, B, H, .]`` scan inputs."""
    return tuple(jnp.moveaxis(x, 1, 0) for x in scaled_inputs(q, k, v, gates, initial_state, scale))


def per_head(one_head, q, k, v, gates, initial_state, scale) -> tuple[jax.Array, jax.Array]:
    """The REFERENCE forms' driver: ``one_head(q, k, v, *gates, s0) -> (o [T, V], S [K, V])``
    vmapped over batch and heads, in the state dtype; returns ``(scale · o [B, T, H, V],
    S [B, H, K, V])``."""
    xs = tuple(x.astype(initial_state.dtype) for x in (q, k, v, *gates))
    # [B, T, H, .] -> vmap over B (axis 0) and H (axis 2 of the inputs, axis 1 of the state).
    heads = jax.vmap(one_head, in_axes=(1,) * len(xs) + (0,), out_axes=(1, 0))
    o, s = jax.vmap(heads)(*xs, initial_state)
    return scale * o, s


def wy_terms(q, k, v, beta, log_alpha=None):
    """Phase 1 of the chunkwise (gated) delta rule on chunks ``[..., C, .]``: ``(W, U, P, g)``.

    With ``g_t = Σ_{s≤t} log α_s`` (``log Γ_t``, the cumulative gate from the chunk start),
    ``D_{tj} = exp(g_t − g_j)`` for ``j ≤ t`` (0 above the diagonal; all ones without a gate)
    and ``A = tril(diag(β) K Kᵀ ⊙ D, −1)``::

        W = (I + A)⁻¹ diag(βΓ) K,   U = (I + A)⁻¹ diag(β) V,   P = Q Kᵀ ⊙ D

    Without ``log_alpha`` (the delta rule) ``Γ ≡ 1``, ``D`` is the causal mask and ``g`` is None.
    All exponents are ``≤ 0``, so small gates cannot overflow. ``(I + A)⁻¹`` comes from the
    matmul-only inverse of :mod:`fwjax.ops.linalg`.
    """
    incl = causal_mask(k.shape[-2], include_diagonal=True)
    kk, scores, beta_k = k @ mT(k), q @ mT(k), beta[..., None] * k
    g = None
    if log_alpha is not None:
        g = jnp.cumsum(log_alpha, axis=-1)
        decay = jnp.exp(jnp.where(incl, g[..., :, None] - g[..., None, :], 0.0))
        kk, scores, beta_k = kk * decay, scores * decay, jnp.exp(g)[..., None] * beta_k
    a = jnp.where(causal_mask(k.shape[-2], include_diagonal=False), beta[..., :, None] * kk, 0)
    t_inv = unit_lower_triangular_inverse(a)  # (I + A)⁻¹
    return t_inv @ beta_k, t_inv @ (beta[..., None] * v), jnp.where(incl, scores, 0), g


def chunk_forward(q, k, w, u, p, s, decay=None):
    """Phase 2 of one chunk ``[..., C, .]`` with incoming state ``s [..., K, V]``: ``(O, S)``::

        Ũ = U − W S,   O = Q S + P Ũ,   S ← γ S + Kᵀ Ũ

    ``Ũ`` are the values written; ``decay`` is the chunk's total decay ``γ [...]`` (1 when None).
    """
    u_tilde = u - w @ s
    o = q @ s + p @ u_tilde
    if decay is not None:
        s = decay[..., None, None] * s
    return o, s + mT(k) @ u_tilde
