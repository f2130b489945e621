"""The sum rule fast weight memory: (unnormalised) linear attention."""

from __future__ import annotations

import functools

import jax

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
from fwjax.ops.sum_rule.chunked import sum_rule_chunked
from fwjax.ops.sum_rule.pallas import sum_rule_pallas
from fwjax.ops.sum_rule.recurrent import sum_rule_recurrent, sum_rule_step
from fwjax.ops.sum_rule.reference import sum_rule_reference

_IMPLS = {
    Impl.REFERENCE: sum_rule_reference,
    Impl.RECURRENT: sum_rule_recurrent,
    Impl.CHUNKED: sum_rule_chunked,
}


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size", "pallas"))
def sum_rule(
    q,
    k,
    v,
    initial_state=None,
    scale=1.0,
    impl: Impl = Impl.AUTO,
    chunk_size=None,
    pallas: PallasOptions | None = None,
):
    """The sum rule fast weight memory, i.e. causal linear attention without normalisation.

    For every batch element and head, with state ``S ∈ R^{K×V}`` (row convention)::

        S_t = S_{t-1} + k_t v_tᵀ
        o_t = scale · S_tᵀ q_t  =  scale · (S_0ᵀ q_t + Σ_{i<=t} (q_t·k_i) v_i)

    ``q, k`` are used as given (apply the feature map first). Attention normalisation (division
    by ``z_tᵀ q_t``) lives in :func:`fwjax.ops.fast_weight_attention`.

    Args:
      q: queries ``[B, T, H, K]``.
      k: keys ``[B, T, H, K]``.
      v: values ``[B, T, H, V]``.
      initial_state: ``S_0``, ``[B, H, K, V]``; zeros when None.
      scale: output scale; None: ``K ** -0.5`` (flash-linear-attention's convention).
      impl: an :class:`Impl` or its value. ``AUTO`` picks the fastest measured form for the
        backend.
      chunk_size: chunk length of the CHUNKED and PALLAS forms; None picks the backend's
        default.
      pallas: :class:`fwjax.ops.pallas.PallasOptions` of ``Impl.PALLAS``; None: the defaults
        (see :func:`fwjax.ops.delta_rule`).

    Returns:
      ``(out, state)``: ``out [B, T, H, V]`` in the inputs' promoted dtype, and ``S_T``
      ``[B, H, K, V]`` in the state dtype (at least float32). ``T = 0`` gives an empty ``out``
      and the initial state; non-finite inputs at step t leave the outputs before t exact in
      every form (see :func:`fwjax.ops.delta_rule`).
    """
    p = prepare_inputs(q, k, v, None, initial_state, needs_beta=False)
    impl = resolve_impl(impl)
    chunk_size = resolve_chunk_size(chunk_size)
    scale = resolve_scale(scale, p.k.shape[-1])
    if p.k.shape[1] == 0:
        return empty_sequence(p)
    if impl is Impl.REFERENCE or impl is Impl.RECURRENT:
        out, state = _IMPLS[impl](p.q, p.k, p.v, p.initial_state, scale, chunk_size)
        return out.astype(p.out_dtype), state
    (q, k, v), steps = guard_nonfinite(p.q, p.k, p.v, [])
    if impl is Impl.PALLAS:
        out, state = sum_rule_pallas(
            q, k, v, p.initial_state, scale, chunk_size, pallas, p.out_dtype
        )
    else:
        out, state = _IMPLS[impl](q, k, v, p.initial_state, scale, chunk_size)
    out, state = restore_nonfinite(out, state, steps)
    return out.astype(p.out_dtype), state


__all__ = ["sum_rule", "sum_rule_step"]
