"""The gated delta rule (Yang, Kautz and Hatamizadeh, 2024): the delta rule with a decay gate."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fwjax.ops.gated_delta_rule.chunked import gated_delta_rule_chunked
from fwjax.ops.gated_delta_rule.pallas import gated_delta_rule_pallas
from fwjax.ops.gated_delta_rule.recurrent import (
    gated_delta_rule_recurrent,
    gated_delta_rule_step,
)
from fwjax.ops.gated_delta_rule.reference import gated_delta_rule_reference
from fwjax.ops.impl import (
    Impl,
    empty_sequence,
    guard_nonfinite,
    prepare_inputs,
    resolve_chunk_size,
    resolve_impl,
    resolve_scale,
    restore_nonfinite,
)
from fwjax.ops.pallas import PallasOptions

_IMPLS = {
    Impl.REFERENCE: gated_delta_rule_reference,
    Impl.RECURRENT: gated_delta_rule_recurrent,
    Impl.CHUNKED: gated_delta_rule_chunked,
}


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size", "pallas"))
def gated_delta_rule(
    q,
    k,
    v,
    beta,
    alpha,
    initial_state=None,
    scale=1.0,
    impl: Impl = Impl.AUTO,
    chunk_size=None,
    pallas: PallasOptions | None = None,
):
    """The gated delta rule: the delta rule whose memory decays by a gate ``α_t`` each step.

    For every batch element and head, with state ``S ∈ R^{K×V}`` (row convention)::

        S_t = α_t (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ
        o_t = scale · S_tᵀ q_t                    (read with the state AFTER step t)

    ``α ≡ 1`` is the delta rule; ``β ≡ 0`` is pure decay. With L2- or sum-normalised keys,
    ``β, α ∈ [0, 1]``, the state stays bounded.

    Args:
      q: queries ``[B, T, H, K]``.
      k: keys ``[B, T, H, K]``.
      v: values ``[B, T, H, V]``.
      beta: write strengths ``[B, T, H]``.
      alpha: decay gates ``[B, T, H]``, in ``(0, 1]`` (e.g. ``exp(−softplus(·))``); the CHUNKED
        form works with ``log α``, so ``α = 0`` is not allowed there.
      initial_state: ``S_0``, ``[B, H, K, V]``; zeros when None.
      scale: output scale; None: ``K ** -0.5`` (flash-linear-attention's convention).
      impl: an :class:`Impl` (or its value): REFERENCE, RECURRENT (block-rematerialised scan),
        CHUNKED (any ``T``) or PALLAS (the delta rule's chunk-scan kernel with the chunk decay;
        its backward pass is CHUNKED's VJP in XLA); AUTO picks the backend's default.
      chunk_size: the chunk length of CHUNKED / PALLAS and the rematerialisation block of
        RECURRENT.
      pallas: :class:`fwjax.ops.pallas.PallasOptions` of ``Impl.PALLAS`` (backend, interpret
        mode, precision, value tile; ``backward`` does not apply); None: the defaults. On a CPU
        backend PALLAS always runs in interpret mode.

    Returns:
      ``(out, state)``: ``out [B, T, H, V]`` in the inputs' promoted dtype and ``S_T``
      ``[B, H, K, V]`` in the state dtype (at least float32). ``T = 0`` gives an empty ``out``
      and the initial state; non-finite inputs at step t leave the outputs before t exact in
      every form (see :func:`fwjax.ops.delta_rule`).
    """
    p = prepare_inputs(q, k, v, beta, initial_state, needs_beta=True)
    alpha = jnp.asarray(alpha)
    if alpha.shape != p.k.shape[:3]:
        raise ValueError(f"alpha must have shape [B, T, H]={p.k.shape[:3]}; got {alpha.shape=}")
    if not jnp.issubdtype(alpha.dtype, jnp.floating):
        raise TypeError(f"alpha must be floating point; got {alpha.dtype=}")
    impl = resolve_impl(impl)
    chunk_size = resolve_chunk_size(chunk_size)
    scale = resolve_scale(scale, p.k.shape[-1])
    if p.k.shape[1] == 0:
        return empty_sequence(p)
    if impl is Impl.REFERENCE or impl is Impl.RECURRENT:
        args = (p.q, p.k, p.v, p.beta, alpha, p.initial_state, scale, chunk_size)
        out, state = _IMPLS[impl](*args)
        return out.astype(p.out_dtype), state
    (q, k, v, beta, alpha), steps = guard_nonfinite(p.q, p.k, p.v, [(p.beta, 0.0), (alpha, 1.0)])
    if impl is Impl.PALLAS:
        out, state = gated_delta_rule_pallas(
            q, k, v, beta, alpha, p.initial_state, scale, chunk_size, pallas, p.out_dtype
        )
    else:
        out, state = _IMPLS[impl](q, k, v, beta, alpha, p.initial_state, scale, chunk_size)
    out, state = restore_nonfinite(out, state, steps)
    return out.astype(p.out_dtype), state


__all__ = ["gated_delta_rule", "gated_delta_rule_step"]
