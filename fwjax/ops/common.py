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
from fwjax.ops.segments import chunk_masks

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


def no_starts(k: jax.Array) -> jax.Array:
    """The document starts ``[B, T, H]`` of an unpacked row: none (zeros in ``k``'s dtype)."""
    return jnp.zeros(k.shape[:3], k.dtype)


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

    ``Ũ`` are the values written (``U`` itself when ``w`` is None: the sum rule); ``decay`` is
    the chunk's total decay ``γ [...]`` (1 when None).
    """
    u_tilde = u if w is None else u - w @ s
    o = q @ s + p @ u_tilde
    if decay is not None:
        s = decay[..., None, None] * s
    return o, s + mT(k) @ u_tilde


# The two-phase (accelerator) schedule of the chunked delta and gated delta rules: scans that
# carry only the state chain (forward) or its cotangent (backward), every chunk's outputs and
# cotangents at once outside them. Per-chunk inputs ``[..., C, .]``; ``decay`` is the chunk's
# total decay ``Γ_C [...]`` (None: 1, the delta rule). Both chains are affine in their carry,
# so each comes with its linear part for the split state scan (:mod:`fwjax.ops.state_split`).


def _decayed(x, decay):
    return x if decay is None else decay[..., None, None] * x


def state_chain(s, inputs):
    """``S ← Γ_C S + Kᵀ (U − W S)`` for inputs ``(K, W, U, Γ_C)``."""
    k, w, u, decay = inputs
    return _decayed(s, decay) + mT(k) @ (u - w @ s)


def state_chain_linear(m, inputs):
    """The linear part of :func:`state_chain`: ``(Γ_C I − Kᵀ W) m``."""
    k, w, _, decay = inputs
    return _decayed(m, decay) - mT(k) @ (w @ m)


def cotangent_chain(g, inputs):
    """``G ← Γ_C G + Qᵀ Ō − Wᵀ (Pᵀ Ō + K G)`` for inputs ``(Q, K, W, P, Ō, Γ_C)``: ``∂L/∂S``
    entering a chunk from ``G = ∂L/∂S`` after it (the chunk's ``Q, K`` decayed for the gated
    rule)."""
    q, k, w, p, d_o, decay = inputs
    return _decayed(g, decay) + mT(q) @ d_o - mT(w) @ (mT(p) @ d_o + k @ g)


def cotangent_chain_linear(m, inputs):
    """The linear part of :func:`cotangent_chain`: ``(Γ_C I − Wᵀ K) m``."""
    _, k, w, _, _, decay = inputs
    return _decayed(m, decay) - mT(w) @ (k @ m)


def chunk_cotangents(q, k, w, u, p, states, g, d_o):
    """Every chunk's cotangents at once from the state entering it (``states``) and ``G`` after
    it: ``(Q̄, K̄, W̄, Ū, P̄)`` with ``Ũ = U − W S``, ``Ũ̄ = Pᵀ Ō + K G``, ``Q̄ = Ō Sᵀ``,
    ``K̄ = Ũ Gᵀ``, ``W̄ = −Ũ̄ Sᵀ``, ``Ū = Ũ̄``, ``P̄ = (Ō Ũᵀ) ⊙ M``."""
    u_tilde = u - w @ states
    du_tilde = mT(p) @ d_o + k @ g
    mask = causal_mask(q.shape[-2], include_diagonal=True)
    d_p = jnp.where(mask, d_o @ mT(u_tilde), 0)
    return d_o @ mT(states), u_tilde @ mT(g), -du_tilde @ mT(states), du_tilde, d_p


def packed_terms(q, k, v, beta, log_alpha, starts):
    """The intra-chunk terms of any rule on chunks ``[..., C, .]`` of packed rows, with the
    document starts ``starts [..., C]`` (1 at a start) applied as masks
    (:func:`fwjax.ops.segments.chunk_masks`): ``(Q', K', W, U, P, γ)`` for
    :func:`chunk_forward`.

    With ``same`` (steps in one document), ``entry`` (the document began before the chunk),
    ``exit`` (the chunk's last document) and ``carry`` (no start in the chunk), ``g`` the
    cumulative ``log α`` (0 without a gate; a start's own ``α`` multiplies an empty memory and
    is dropped) and ``D_tj = exp(g_t − g_j)`` on ``same`` causal pairs, 0 elsewhere::

        A = tril(diag(β) K Kᵀ ⊙ D, −1)
        W = (I + A)⁻¹ diag(β Γ · entry) K,   U = (I + A)⁻¹ diag(β) V
        P = Q Kᵀ ⊙ D,   Q' = diag(Γ · entry) Q,   K' = diag(Γ_C / Γ · exit) K,   γ = Γ_C · carry

    Without ``beta`` (the sum rule) ``W`` is None and ``U = V``. Without starts this is
    :func:`wy_terms` with the decays folded in as in the gated delta rule.
    """
    same, entry, exit_, carry = chunk_masks(starts)
    c = k.shape[-2]
    incl = causal_mask(c, include_diagonal=True) & same
    dtype = k.dtype
    if log_alpha is None:
        decay = jnp.ones((), dtype)
        gamma = jnp.ones(k.shape[:-1], dtype)  # Γ_t
        gamma_exit = gamma  # Γ_C / Γ_t
        total = jnp.ones(k.shape[:-2], dtype)  # Γ_C
    else:
        g = jnp.cumsum(jnp.where(starts != 0, 0.0, log_alpha), axis=-1)
        decay = jnp.exp(jnp.where(incl, g[..., :, None] - g[..., None, :], 0.0))
        gamma, gamma_exit, total = jnp.exp(g), jnp.exp(g[..., -1:] - g), jnp.exp(g[..., -1])
    scores = jnp.where(incl, (q @ mT(k)) * decay, 0)
    q_entry = jnp.where(entry, gamma, 0)[..., None] * q
    k_exit = jnp.where(exit_, gamma_exit, 0)[..., None] * k
    total = jnp.where(carry, total, 0)
    if beta is None:
        return q_entry, k_exit, None, v, scores, total
    strict = causal_mask(c, include_diagonal=False) & same
    a = jnp.where(strict, beta[..., :, None] * (k @ mT(k)) * decay, 0)
    t_inv = unit_lower_triangular_inverse(a)  # (I + A)⁻¹
    w = t_inv @ (jnp.where(entry, beta * gamma, 0)[..., None] * k)
    return q_entry, k_exit, w, t_inv @ (beta[..., None] * v), scores, total


@jax.checkpoint
def packed_chunk_step(s, inputs):
    """One chunk ``(q, k, v, β, log α, starts)`` of packed rows (``β``, ``log α`` may be None),
    each ``[B, H, C, .]``, with incoming state ``s`` -> ``(S, O)``; rematerialised, so a scan
    of it keeps one state per chunk for the backward pass."""
    q_e, k_e, w, u, p, total = packed_terms(*inputs)
    o, s = chunk_forward(q_e, k_e, w, u, p, s, total)
    return s, o


def packed_chunks(q, k, v, beta, log_alpha, starts, initial_state, scale, chunk_size):
    """Any rule's CHUNKED form on packed rows: ``[B, T, H, .]`` inputs (``β``, ``log α`` may be
    None; ``starts [B, T, H]`` 1 at a document start) -> ``(out [B, T, H, V], S_T)``. The
    backward pass is autodiff through the chunk scan of :func:`packed_chunk_step`; padding is
    exact (zero keys write and read nothing, ``β = 0``, ``log α = 0``, no start)."""
    t = q.shape[1]
    gates = tuple(x for x in (beta, log_alpha, starts) if x is not None)
    q, k, v, *gates = in_chunks(q, k, v, gates, initial_state, scale, chunk_size)
    starts = gates.pop()
    beta = gates.pop(0) if beta is not None else None
    log_alpha = gates.pop(0) if log_alpha is not None else None
    s, o = jax.lax.scan(packed_chunk_step, initial_state, (q, k, v, beta, log_alpha, starts))
    return from_chunks(o, t), s


def packed_chunks_bwd(arrange, residuals, cotangents):
    """The VJP of a scan of :func:`packed_chunk_step` from its residuals ``(*xs, states)``
    (chunked ``[N, B, H, C, .]``; ``states``: the state entering each chunk) and the
    cotangents ``(dO, dS)``: a reverse scan of the step's VJP. ``arrange(xs)`` gives the step's
    ``(q, k, v, β, log α, starts)``. Returns ``(*dxs, dS⁰)``."""
    *xs, states = residuals

    def step(g, inputs):
        *x, s, do = inputs
        _, pullback = jax.vjp(lambda s, x: packed_chunk_step(s, arrange(x)), s, tuple(x))
        return pullback((g, do))

    d_o, d_s = cotangents
    d_s0, dxs = jax.lax.scan(step, d_s, (*xs, states, d_o), reverse=True)
    return (*dxs, d_s0)


def blocked_recurrence(step, xs, fills, initial_state, block):
    """A step-by-step recurrence over ``[B, T, H, .]`` inputs whose backward pass keeps one
    state per block of ``block`` steps and recomputes a block's states from it (each block's
    scan is rematerialised): ``O(T/C · K·V + C · K·V)`` memory per head instead of autodiff's
    ``O(T · K·V)``.

    Args:
      step: ``step(*x_t, s) -> (o_t, s_new)`` on ``[B, H, .]`` slices.
      xs: the inputs ``[B, T, H, .]``.
      fills: the no-op value of each input, used to pad time to whole blocks.
      initial_state: ``[B, H, K, V]``.
      block: steps per rematerialised block.

    Returns:
      ``(o [B, T, H, V], S_T)``.
    """
    t = xs[0].shape[1]
    c = min(block, t)
    padded = []
    for x, fill in zip(xs, fills, strict=True):
        pad = [(0, 0), (0, -t % c)] + [(0, 0)] * (x.ndim - 2)
        padded.append(jnp.pad(x, pad, constant_values=fill))
    # Time-major inside a block: [N, C, B, H, .].
    blocks = tuple(jnp.moveaxis(to_chunks(x, c), 3, 1) for x in padded)

    @jax.checkpoint
    def run_block(s, xb):
        def one(s, inputs):
            o_t, s = step(*inputs, s)
            return s, o_t

        return jax.lax.scan(one, s, xb)

    s, o = jax.lax.scan(run_block, initial_state, blocks)
    return from_chunks(jnp.moveaxis(o, 1, 3), t), s
