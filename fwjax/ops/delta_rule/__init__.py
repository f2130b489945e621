"""The delta rule fast weight memory (Schlag, Irie, Schmidhuber, 2021)."""

from __future__ import annotations

import functools

import jax

from fwjax.ops.delta_rule.chunked import delta_rule_chunked
from fwjax.ops.delta_rule.pallas import delta_rule_pallas
from fwjax.ops.delta_rule.recurrent import delta_rule_recurrent, delta_rule_step
from fwjax.ops.delta_rule.reference import delta_rule_reference
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
    Impl.REFERENCE: delta_rule_reference,
    Impl.RECURRENT: delta_rule_recurrent,
    Impl.CHUNKED: delta_rule_chunked,
}


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size", "pallas"))
def delta_rule(
    q,
    k,
    v,
    beta,
    initial_state=None,
    scale=1.0,
    impl: Impl = Impl.AUTO,
    chunk_size=None,
    pallas: PallasOptions | None = None,
):
    """The delta rule fast weight memory.

    For every batch element and head, with state ``S ∈ R^{K×V}`` (row convention)::

        v̄_t = S_{t-1}ᵀ k_t                       (retrieve the value currently stored at k_t)
        S_t = S_{t-1} + β_t k_t (v_t − v̄_t)ᵀ      (replace it, with write strength β_t)
        o_t = scale · S_tᵀ q_t                    (read with the state AFTER step t)

    ``q, k`` are used as given: apply the feature map and normalisation first (see
    :func:`fwjax.ops.fast_weight_attention`). With sum- or L2-normalised keys and
    ``β ∈ [0, 1]``, ``I − β k kᵀ`` has eigenvalues in ``[1 − β, 1]`` and the state stays bounded.

    Args:
      q: queries ``[B, T, H, K]``.
      k: keys ``[B, T, H, K]``.
      v: values ``[B, T, H, V]``.
      beta: write strengths ``[B, T, H]`` (the paper uses ``σ(w_β·x_t)`` ∈ (0, 1)).
      initial_state: ``S_0``, ``[B, H, K, V]``; zeros when None.
      scale: output scale (the paper uses ``1/√d_head`` at the layer); None: ``K ** -0.5``
        (flash-linear-attention's convention).
      impl: an :class:`Impl` or its value (``"chunked"``). ``AUTO`` picks the fastest measured
        form for the backend.
      chunk_size: chunk length ``C`` of the CHUNKED form; None picks the backend's default.
        Any ``T`` is accepted (padding with zero keys and β = 0 is exact). PALLAS rounds it up
        to its backend's tile sizes (a power of two >= 16 on GPU).
      pallas: :class:`fwjax.ops.pallas.PallasOptions` of ``Impl.PALLAS`` (backend, interpret
        mode, backward kernel or XLA backward, value tile); None: the defaults. On a CPU
        backend PALLAS always runs in interpret mode.

    Returns:
      ``(out, state)``: ``out [B, T, H, V]`` in the inputs' promoted dtype, and the final
      state ``S_T`` ``[B, H, K, V]`` in the state dtype (the inputs', initial state's and
      β's promoted dtype, at least float32). ``T = 0`` gives an empty ``out`` and the initial
      state. Every form is causal even for non-finite inputs: a NaN at step t leaves the
      outputs before t exact (a NaN query only its own output; a NaN key, value or β every
      output from t on and the final state, as in the recurrence).
    """
    p = prepare_inputs(q, k, v, beta, initial_state, needs_beta=True)
    impl = resolve_impl(impl)
    chunk_size = resolve_chunk_size(chunk_size)
    scale = resolve_scale(scale, p.k.shape[-1])
    if p.k.shape[1] == 0:
        return empty_sequence(p)
    if impl is Impl.REFERENCE or impl is Impl.RECURRENT:
        out, state = _IMPLS[impl](p.q, p.k, p.v, p.beta, p.initial_state, scale, chunk_size)
        return out.astype(p.out_dtype), state
    (q, k, v, beta), steps = guard_nonfinite(p.q, p.k, p.v, [(p.beta, 0.0)])
    if impl is Impl.PALLAS:
        out, state = delta_rule_pallas(
            q, k, v, beta, p.initial_state, scale, chunk_size, pallas, p.out_dtype
        )
    else:
        out, state = _IMPLS[impl](q, k, v, beta, p.initial_state, scale, chunk_size)
    out, state = restore_nonfinite(out, state, steps)
    return out.astype(p.out_dtype), state


__all__ = ["delta_rule", "delta_rule_step"]
