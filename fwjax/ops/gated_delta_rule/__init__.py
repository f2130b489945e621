"""The gated delta rule (Yang, Kautz and Hatamizadeh, 2024): the delta rule with a decay gate."""

from __future__ import annotations

import functools

import jax

from fwjax.ops import registry
from fwjax.ops.gated_delta_rule.recurrent import gated_delta_rule_step
from fwjax.ops.impl import Impl
from fwjax.ops.pallas import PallasOptions
from fwjax.shapes import Alpha, Beta, Keys, Outputs, Queries, Scale, SegmentIds, State, Values

_STATIC = ("impl", "chunk_size", "pallas", "remat_block", "state_segments")


@functools.partial(jax.jit, static_argnames=_STATIC)
def gated_delta_rule(
    q: Queries,
    k: Keys,
    v: Values,
    beta: Beta,
    alpha: Alpha,
    initial_state: State | None = None,
    scale: Scale = 1.0,
    impl: Impl | str = Impl.AUTO,
    chunk_size: int | None = None,
    pallas: PallasOptions | None = None,
    remat_block: int | None = None,
    segment_ids: SegmentIds | None = None,
    state_segments: int | None = None,
) -> tuple[Outputs, State]:
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
        CHUNKED (any ``T``) or PALLAS (the delta rule's chunk-scan kernel with the chunk decay
        and a backward kernel, or by option CHUNKED's VJP in XLA); AUTO picks the backend's
        default. CHUNKED off CPU, CHUNKED with ``state_segments`` and PALLAS have hand-written
        VJPs: reverse-mode autodiff only (``jax.jvp`` needs REFERENCE or RECURRENT).
      chunk_size: the chunk length of the chunkwise forms (CHUNKED, PALLAS; see
        :func:`fwjax.ops.delta_rule`); None picks the backend's default.
      pallas: :class:`fwjax.ops.pallas.PallasOptions` of ``Impl.PALLAS`` (backend, interpret
        mode, precision, value tile; ``backward`` does not apply); None: the defaults. On a CPU
        backend PALLAS always runs in interpret mode.
      remat_block: the steps per rematerialised block of RECURRENT's backward pass (memory
        ``O(T/remat_block + remat_block)`` states per head); None: the backend's default chunk
        length (also the packed RECURRENT forms of every rule). It changes memory and speed,
        never the results.
      segment_ids: packed rows: integer document ids ``[B, T]`` (equal within a document);
        the memory is emptied before each document's first step, so every document computes
        what it would alone (:mod:`fwjax.ops.segments`). The first document continues
        ``initial_state``; the final state is the last document's. None: one sequence per row.
      state_segments: CHUNKED, and PALLAS under ``PallasSchedule.PHASED``: the forward and
        backward chunk scans as ``P`` parallel segments (see :func:`fwjax.ops.delta_rule`);
        None: one sequential scan. Packed rows ignore it.

    Returns:
      ``(out, state)``: ``out [B, T, H, V]`` in the inputs' promoted dtype and ``S_T``
      ``[B, H, K, V]`` in the state dtype (at least float32). ``T = 0`` gives an empty ``out``
      and the initial state; non-finite inputs at step t leave the outputs before t exact in
      every form (see :func:`fwjax.ops.delta_rule`).
    """
    rule, gates = registry.GATED_DELTA, (beta, alpha)
    return registry.run_rule(
        rule,
        q,
        k,
        v,
        gates,
        initial_state,
        scale,
        impl,
        chunk_size,
        pallas,
        remat_block,
        segment_ids,
        state_segments,
    )


__all__ = ["gated_delta_rule", "gated_delta_rule_step"]
