"""Per-chunk math of the Pallas kernels, shared by every backend (values in, values out).

Row convention; one chunk of ``C`` rows and one value tile of ``tv`` columns. Matmul operands
are cast to the kernels' matmul dtype ``md`` (the inputs' dtype: bfloat16 inputs run on tensor
cores), products accumulate in the state dtype ``sd`` (at least float32), and the state tile
itself stays in ``sd``. Only 2-D ``dot_general`` with one contracting dimension is used, which
every Pallas backend lowers (Triton needs each dimension >= 16).

Delta rule (phase-1 terms ``W = T K``, ``U = T V``, ``P = Q Kᵀ ⊙ M`` from XLA)::

    forward:   Ũ = U − W S,   O = Q S + P Ũ,   S ← S + Kᵀ Ũ
    backward:  Ũ̄ = Pᵀ Ō + K G,   P̄ = (Ō Ũᵀ) ⊙ M,   Q̄ = Ō Sᵀ,   K̄ = Ũ Gᵀ,   W̄ = −Ũ̄ Sᵀ,
               G ← G + Qᵀ Ō − Wᵀ Ũ̄

Gated delta rule (phase-1 terms with the decays folded in, see
:mod:`fwjax.ops.gated_delta_rule.pallas`; ``Γ_C`` the chunk's total decay)::

    forward:   Ũ = U − W S,   O = Q' S + P Ũ,   S ← Γ_C S + K'ᵀ Ũ
    backward:  the delta rule's with Q', K', then Γ̄_C = Σ (S ⊙ G),   G ← Γ_C G + Q'ᵀ Ō − Wᵀ Ũ̄

Sum rule (``P = Q Kᵀ ⊙ M`` computed in the kernel)::

    forward:   O = Q S + P V,   S ← S + Kᵀ V
    backward:  P̄ = (Ō Vᵀ) ⊙ M,   Q̄ = Ō Sᵀ + P̄ K,   K̄ = V Gᵀ + P̄ᵀ Q,   V̄ = Pᵀ Ō + K G,
               G ← G + Qᵀ Ō

The phased schedule splits each rule's forward into the chain ``S ← Γ_C S + Kᵀ (U − W S)``
(sequential) and ``O = Q S + P (U − W S)`` (parallel over chunks), and the backward into
``G ← Γ_C G + Qᵀ Ō − Wᵀ Ũ̄`` (sequential) and the cotangents above (parallel over chunks).

``M`` is lower-triangular including the diagonal; ``S`` is the state entering the chunk and
``G`` the cotangent of the state after it. ``Q̄, K̄, W̄, P̄`` contract over the value dimension,
so with several value tiles each program returns a partial sum (added up in XLA).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fwjax.ops.common import causal_mask

_causal = functools.partial(causal_mask, include_diagonal=True)  # M: i >= j

_NN = (((1,), (0,)), ((), ()))  # a @ b
_TN = (((0,), (0,)), ((), ()))  # aᵀ @ b
_NT = (((1,), (1,)), ((), ()))  # a @ bᵀ


def _dot(a, b, dims, md, sd):
    return jax.lax.dot_general(a.astype(md), b.astype(md), dims, preferred_element_type=sd).astype(
        sd
    )


def _iota(shape, axis):
    return jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def _chunk_decay(decay, sd):
    """``Γ_C`` as a ``[1, 1]`` factor of the state (the chunk's ``CHUNK_SCALAR`` block) in
    the state dtype."""
    return decay.astype(sd)


def _decay_cotangent(s, g, sd):
    """``∂L/∂Γ_C = Σ S ⊙ G`` over the state (tile) as ``[1, 1]``: one reduction per axis
    (what every backend lowers)."""
    per_row = jnp.sum(s.astype(sd) * g.astype(sd), axis=1, keepdims=True)
    return jnp.sum(per_row, axis=0, keepdims=True)


def delta_forward(q, k, w, u, p, s, md, sd, decay=None):
    """One delta-rule chunk: returns ``(O [C, tv], S_new [K, tv])`` in ``sd``. With ``decay``,
    the gated rule's chunk (see :func:`gated_delta_forward`)."""
    u_tilde = u.astype(sd) - _dot(w, s, _NN, md, sd)  # Ũ = U − W S
    o = _dot(q, s, _NN, md, sd) + _dot(p, u_tilde, _NN, md, sd)  # O = Q S + P Ũ
    if decay is not None:
        s = _chunk_decay(decay, sd) * s  # Γ_C S
    return o, s + _dot(k, u_tilde, _TN, md, sd)  # S ← S + Kᵀ Ũ


def gated_delta_forward(q, k, w, u, p, decay, s, md, sd):
    """One gated-delta-rule chunk: ``(O [C, tv], S_new [K, tv])`` in ``sd``, with ``Q' S``,
    ``S ← Γ_C S + K'ᵀ Ũ``. ``decay [1, 1]``: the chunk's total decay ``Γ_C``."""
    return delta_forward(q, k, w, u, p, s, md, sd, decay)


def gated_delta_backward(q, k, w, u, p, decay, s, do, g, md, sd):
    """VJP of one gated-delta-rule chunk (:func:`gated_delta_forward`).

    Returns ``(g_new, dq, dk, dw, du, dp, d_decay)``: the delta rule's cotangents with the
    decayed ``Q', K'`` (:func:`delta_backward`, whose ``g_new`` carries ``G`` undecayed) and
    ``g_new = Γ_C G + Q'ᵀ Ō − Wᵀ Ũ̄``. ``d_decay [1, 1]``: ``Σ S ⊙ G`` over the state tile, a
    partial sum over value tiles.
    """
    g_new, dq, dk, dw, du, dp = delta_backward(q, k, w, u, p, s, do, g, md, sd)
    g_new = g_new + (_chunk_decay(decay, sd) - 1.0) * g  # Γ_C G instead of G
    return g_new, dq, dk, dw, du, dp, _decay_cotangent(s, g, sd)


def delta_backward(q, k, w, u, p, s, do, g, md, sd):
    """VJP of one delta-rule chunk. ``s``: state entering the chunk; ``g``: ∂L/∂S after it.

    Returns ``(g_new, dq, dk, dw, du, dp)``: ``g_new = ∂L/∂S`` entering the chunk,
    ``dq, dk, dw [C, K]`` and ``dp [C, C]`` (partial over value tiles), ``du [C, tv]``.
    """
    grads = delta_gradients(q, k, w, u, p, s, do, g, md, sd)
    du = grads[3]
    g_new = g + _dot(q, do, _TN, md, sd) - _dot(w, du, _TN, md, sd)
    return g_new, *grads


def delta_gradients(q, k, w, u, p, s, do, g, md, sd):
    """The operands' cotangents of one delta-rule chunk from ``s`` (state entering it) and
    ``g`` (∂L/∂S after it): ``(dq, dk, dw, du, dp)``, without the chain's update."""
    u_tilde = u.astype(sd) - _dot(w, s, _NN, md, sd)  # recomputed Ũ
    du = _dot(p, do, _TN, md, sd) + _dot(k, g, _NN, md, sd)  # Ũ̄ = Pᵀ Ō + K G
    dp = jnp.where(_causal(q.shape[0]), _dot(do, u_tilde, _NT, md, sd), 0)
    dq = _dot(do, s, _NT, md, sd)  # Q̄ = Ō Sᵀ
    dk = _dot(u_tilde, g, _NT, md, sd)  # K̄ = Ũ Gᵀ
    dw = -_dot(du, s, _NT, md, sd)  # W̄ = −Ũ̄ Sᵀ
    return dq, dk, dw, du, dp


# The phased schedule (PallasSchedule.PHASED): the sequential kernels carry only the chains,
# the parallel kernels (one program per chunk, the whole value dimension) do the rest.


def chain_forward(k, w, u, s, md, sd, decay=None):
    """The state chain of one chunk, ``S ← Γ_C S + Kᵀ (U − W S)`` (``Γ_C = 1`` without
    ``decay [1, 1]``): two matmuls."""
    u_tilde = u.astype(sd) - _dot(w, s, _NN, md, sd)  # Ũ = U − W S
    if decay is not None:
        s = _chunk_decay(decay, sd) * s
    return s + _dot(k, u_tilde, _TN, md, sd)


def chain_map(k, w, md, sd, decay=None):
    """The linear part of one chunk's state chain, ``M = Γ_C I − Kᵀ W`` ``[K, K]``."""
    m = -_dot(k, w, _TN, md, sd)
    eye = _iota(m.shape, 0) == _iota(m.shape, 1)
    gamma = 1.0 if decay is None else _chunk_decay(decay, sd)  # [1, 1]: Γ_C
    return m + jnp.where(eye, gamma, 0.0)


def chain_maps(k, w, u, md, sd, decay=None):
    """The state chain of one chunk as an affine map ``S ← M S + B`` (``PallasChain.AFFINE``):
    ``M`` of :func:`chain_map` and ``B = Kᵀ U`` ``[K, V]``."""
    return chain_map(k, w, md, sd, decay), _dot(k, u, _TN, md, sd)


def chain_affine(m, b, s, md, sd):
    """One step of the affine chain, ``S ← M S + B``: one matmul."""
    return _dot(m, s, _NN, md, sd) + b.astype(sd)


def cotangent_inputs(q, w, p, do, md, sd):
    """The constant part of the cotangent chain, ``H = Qᵀ Ō − Wᵀ Pᵀ Ō`` ``[K, V]``, so that
    ``G ← Mᵀ G + H`` (``PallasChain.AFFINE``)."""
    return _dot(q, do, _TN, md, sd) - _dot(w, _dot(p, do, _TN, md, sd), _TN, md, sd)


def chain_affine_backward(m, h, g, md, sd):
    """One step of the affine cotangent chain, ``G ← Mᵀ G + H``: one matmul."""
    return _dot(m, g, _TN, md, sd) + h.astype(sd)


def chunk_output(q, w, u, p, s, md, sd):
    """One chunk's output from the state entering it: ``O = Q S + P (U − W S)``."""
    u_tilde = u.astype(sd) - _dot(w, s, _NN, md, sd)
    return _dot(q, s, _NN, md, sd) + _dot(p, u_tilde, _NN, md, sd)


def chain_backward(q, k, w, p, do, g, md, sd, decay=None):
    """The cotangent chain of one chunk, ``G ← Γ_C G + Qᵀ Ō − Wᵀ (Pᵀ Ō + K G)``."""
    du = _dot(p, do, _TN, md, sd) + _dot(k, g, _NN, md, sd)  # Ũ̄
    decayed = g if decay is None else _chunk_decay(decay, sd) * g
    return decayed + _dot(q, do, _TN, md, sd) - _dot(w, du, _TN, md, sd)


def chunk_gradients(q, k, w, u, p, s, do, g, md, sd, decay=None):
    """One chunk's operand cotangents (:func:`delta_gradients`), exact over the whole value
    dimension; with ``decay`` also ``d_decay [1, 1]``, ``Σ S ⊙ G`` (as in
    :func:`gated_delta_backward`)."""
    grads = delta_gradients(q, k, w, u, p, s, do, g, md, sd)
    if decay is None:
        return grads
    return *grads, _decay_cotangent(s, g, sd)


def sum_forward(q, k, v, s, md, sd):
    """One sum-rule chunk: returns ``(O [C, tv], S_new [K, tv])`` in ``sd``."""
    p = jnp.where(_causal(q.shape[0]), _dot(q, k, _NT, md, sd), 0)
    o = _dot(q, s, _NN, md, sd) + _dot(p, v, _NN, md, sd)  # O = Q S + P V
    return o, s + _dot(k, v, _TN, md, sd)  # S ← S + Kᵀ V


def sum_backward(q, k, v, s, do, g, md, sd):
    """VJP of one sum-rule chunk. Returns ``(g_new, dq, dk, dv)``; ``dq, dk [C, K]`` are
    partial over value tiles, ``dv [C, tv]`` is exact."""
    mask = _causal(q.shape[0])
    p = jnp.where(mask, _dot(q, k, _NT, md, sd), 0)
    dp = jnp.where(mask, _dot(do, v, _NT, md, sd), 0)  # P̄ = (Ō Vᵀ) ⊙ M
    dq = _dot(do, s, _NT, md, sd) + _dot(dp, k, _NN, md, sd)  # Q̄ = Ō Sᵀ + P̄ K
    dk = _dot(v, g, _NT, md, sd) + _dot(dp, q, _TN, md, sd)  # K̄ = V Gᵀ + P̄ᵀ Q
    dv = _dot(p, do, _TN, md, sd) + _dot(k, g, _NN, md, sd)  # V̄ = Pᵀ Ō + K G
    return g + _dot(q, do, _TN, md, sd), dq, dk, dv


# Phase 1 as a kernel (the phased schedule's forward): one chunk's WY terms from its inputs.


def unit_lower_inverse(a_t, sd):
    """``X = (I + A)⁻¹`` of a strictly lower-triangular ``A [C, C]`` given as its transpose
    ``a_t = Aᵀ``, by forward substitution: row ``i`` of ``X`` is ``e_i − A[i, :] X``, and
    ``A[i, :]`` is column ``i`` of ``Aᵀ``. Masks and reductions only (no dynamic slices), so
    every backend lowers it; ``C − 1`` dependent steps of ``O(C²)`` work."""
    c = a_t.shape[0]
    rows, cols = _iota((c, c), 0), _iota((c, c), 1)
    eye = jnp.where(rows == cols, 1.0, 0.0).astype(sd)

    def row(i, x):
        a_i = jnp.sum(jnp.where(cols == i, a_t, 0.0), axis=1, keepdims=True)  # A[i, j] at [j, 0]
        e_i = jnp.where(_iota((1, c), 1) == i, 1.0, 0.0)
        new = e_i - jnp.sum(a_i * x, axis=0, keepdims=True)
        return jnp.where(rows == i, new, x)  # [1, C] broadcast into row i

    return jax.lax.fori_loop(1, c, row, eye)


def wy_chunk(q, k, v, beta_col, beta_row, sd, g_col=None, g_row=None):
    """One chunk's phase-1 terms (:func:`fwjax.ops.common.wy_terms`), in ``sd``.

    ``beta_col [C, 1]`` and ``beta_row [1, C]`` are the chunk's write strengths in both
    layouts; ``g_col``, ``g_row`` likewise the cumulative ``log α`` (the gated rule). With
    ``D_tj = exp(g_t − g_j)`` on ``j ≤ t`` (the causal mask without a gate)::

        A = tril(diag(β) K Kᵀ ⊙ D, −1),   T = (I + A)⁻¹
        W = T diag(βΓ) K,   U = T diag(β) V,   P = Q Kᵀ ⊙ D

    Returns ``(W, U, P)``, or for the gated rule ``(Q', K', W, U, P, decay)`` with
    ``Q' = diag(Γ) Q``, ``K' = diag(Γ_C / Γ) K`` and the chunk decay ``Γ_C`` ``[1, 1]``.
    """
    c = k.shape[0]
    rows, cols = _iota((c, c), 0), _iota((c, c), 1)
    kk = _dot(k, k, _NT, sd, sd)  # K Kᵀ (symmetric)
    scores = _dot(q, k, _NT, sd, sd)  # Q Kᵀ
    beta_k = beta_col * k.astype(sd)
    if g_col is not None:
        decay = jnp.exp(jnp.where(rows >= cols, g_col - g_row, 0.0))  # D, and Dᵀ at [j, i]
        decay_t = jnp.exp(jnp.where(cols >= rows, g_row - g_col, 0.0))
        a_t = jnp.where(cols > rows, beta_row * kk * decay_t, 0.0)  # Aᵀ[j, i] = β_i (KKᵀ D)_ij
        scores = scores * decay
        beta_k = jnp.exp(g_col) * beta_k
    else:
        a_t = jnp.where(cols > rows, beta_row * kk, 0.0)
    t_inv = unit_lower_inverse(a_t, sd)
    w = _dot(t_inv, beta_k, _NN, sd, sd)
    u = _dot(t_inv, beta_col * v.astype(sd), _NN, sd, sd)
    p = jnp.where(rows >= cols, scores, 0.0)
    if g_col is None:
        return w, u, p
    last = _iota((1, c), 1) == c - 1
    g_last = jnp.sum(jnp.where(last, g_row, 0.0), axis=1, keepdims=True)  # [1, 1]
    q_decayed = jnp.exp(g_col) * q.astype(sd)
    k_decayed = jnp.exp(g_last - g_col) * k.astype(sd)
    return q_decayed, k_decayed, w, u, p, jnp.exp(g_last).astype(sd)


def wy_chunk_backward(q, k, v, beta_col, beta_row, d_q, d_k, dw, du, dp, sd, **gated):
    """The VJP of :func:`wy_chunk` (phase 1's backward as a kernel, parallel over chunks): from
    one chunk's inputs and the cotangents of its operands, the inputs' cotangents, in ``sd``.

    ``T`` is recomputed (:func:`unit_lower_inverse`); then, with ``Ā`` kept on the strictly
    lower triangle where ``A`` lives and ``D`` the decays (1 without a gate)::

        T̄ = W̄ (diag(βΓ) K)ᵀ + Ū (diag(β) V)ᵀ,   (βΓK)‾ = Tᵀ W̄,   (βV)‾ = Tᵀ Ū
        Ā = −Tᵀ T̄ Tᵀ,   K̄ += (R + Rᵀ) K with R = diag(β) (Ā ⊙ D),   β̄ += rowsum(Ā ⊙ D ⊙ K Kᵀ)
        Q̄ += (P̄ ⊙ D ⊙ M) K,   K̄ += (P̄ ⊙ D ⊙ M)ᵀ Q

    and the gate's ``ḡ = rowsum(X) − colsum(X)`` with ``X = D̄ ⊙ D`` (``A`` and ``P`` through
    ``D_ij = exp(g_i − g_j)``), plus the terms of ``Γ = exp(g)`` in ``βΓK`` and ``Q'``, of
    ``exp(g_C − g)`` in ``K'`` and of ``Γ_C = exp(g_C)`` (on the last row: ``g_C`` is its ``g``).

    Args:
      q, k, v, beta_col, beta_row: as :func:`wy_chunk`.
      d_q, d_k: the cotangents of the operands ``Q``, ``K`` (the delta rule) or ``Q'``, ``K'``
        (the gated rule), ``[C, K]``.
      dw, du, dp: the cotangents of ``W [C, K]``, ``U [C, V]`` and ``P [C, C]``.
      sd: the dtype of every product.
      gated: ``g_col``, ``g_row`` (as :func:`wy_chunk`) and ``d_decay``, the cotangent of
        ``Γ_C`` ``[1, 1]``: the gated rule's.

    Returns:
      ``(Q̄, K̄, V̄, β̄ [C, 1])``, and for the gated rule ``ḡ [C, 1]`` (the cumulative
      ``log α``'s cotangent; its cumsum's VJP is left to the caller).
    """
    c = k.shape[0]
    rows, cols = _iota((c, c), 0), _iota((c, c), 1)
    dot = functools.partial(_dot, md=sd, sd=sd)
    q, k, v = (x.astype(sd) for x in (q, k, v))
    dw, du, dp, d_q, d_k = (x.astype(sd) for x in (dw, du, dp, d_q, d_k))
    kk = dot(k, k, _NT)
    g_col, g_row = gated.get("g_col"), gated.get("g_row")
    if g_col is None:
        decay, q_scale, k_scale, beta_gamma = 1.0, 1.0, 1.0, beta_col
        a_t = jnp.where(cols > rows, beta_row * kk, 0.0)
    else:
        decay = jnp.exp(jnp.where(rows >= cols, g_col - g_row, 0.0))  # D on i ≥ j
        decay_t = jnp.exp(jnp.where(cols >= rows, g_row - g_col, 0.0))
        a_t = jnp.where(cols > rows, beta_row * kk * decay_t, 0.0)
        last = _iota((1, c), 1) == c - 1
        g_last = jnp.sum(jnp.where(last, g_row, 0.0), axis=1, keepdims=True)  # g_C [1, 1]
        q_scale, k_scale = jnp.exp(g_col), jnp.exp(g_last - g_col)
        beta_gamma = beta_col * jnp.exp(g_col)
    t_inv = unit_lower_inverse(a_t, sd)

    # W = T diag(βΓ) K and U = T diag(β) V.
    d_t = dot(dw, beta_gamma * k, _NT) + dot(du, beta_col * v, _NT)
    d_beta_k = dot(t_inv, dw, _TN)  # the cotangent of diag(βΓ) K
    d_beta_v = dot(t_inv, du, _TN)  # of diag(β) V
    # T = (I + A)⁻¹, A = tril(diag(β) K Kᵀ ⊙ D, −1).
    d_a = -dot(dot(t_inv, d_t, _TN), t_inv, _NT)
    d_a_decay = jnp.where(rows > cols, d_a, 0.0) * decay
    r = beta_col * d_a_decay
    dk = dot(r, k, _NN) + dot(r, k, _TN)
    d_beta = jnp.sum(d_a_decay * kk, axis=1, keepdims=True)
    # P = (Q Kᵀ) ⊙ D ⊙ M.
    d_p = jnp.where(rows >= cols, dp, 0.0)
    d_scores = d_p * decay
    dq = q_scale * d_q + dot(d_scores, k, _NN)
    dk = dk + dot(d_scores, q, _TN) + beta_gamma * d_beta_k + k_scale * d_k
    k_d_beta_k = jnp.sum(d_beta_k * k, axis=1, keepdims=True)
    d_beta = d_beta + q_scale * k_d_beta_k  # Γ = q_scale
    d_beta = d_beta + jnp.sum(d_beta_v * v, axis=1, keepdims=True)
    dv = beta_col * d_beta_v
    if g_col is None:
        return dq, dk, dv, d_beta

    # The gate: D_ij = exp(g_i − g_j) in A and P, exp(g) in βΓK and Q', exp(g_C − g) in K'.
    x = r * kk + d_scores * dot(q, k, _NT)  # D̄ ⊙ D
    # rowsum − colsum, the column sums moved to a column by a masked reduction (exact; a
    # [C, C] × [C, 1] product would be a matrix-vector dot, which Triton does not lower).
    col_sums = jnp.sum(x, axis=0, keepdims=True)  # [1, C]
    col_sums = jnp.sum(jnp.where(rows == cols, col_sums, 0.0), axis=1, keepdims=True)  # [C, 1]
    d_g = jnp.sum(x, axis=1, keepdims=True) - col_sums
    d_g = d_g + beta_gamma * k_d_beta_k + q_scale * jnp.sum(d_q * q, axis=1, keepdims=True)
    k_terms = k_scale * jnp.sum(d_k * k, axis=1, keepdims=True)
    d_g_last = jnp.sum(k_terms, axis=0, keepdims=True) + gated["d_decay"].astype(sd) * jnp.exp(
        g_last
    )
    d_g = d_g - k_terms + jnp.where(_iota((c, 1), 0) == c - 1, d_g_last, 0.0)
    return dq, dk, dv, d_beta, d_g
