"""The sum rule fast weight memory: (unnormalised) linear attention."""

from __future__ import annotations

import functools

import jax

from fwjax.ops import registry
from fwjax.ops.impl import Impl
from fwjax.ops.pallas import PallasOptions
from fwjax.ops.sum_rule.recurrent import sum_rule_step
from fwjax.shapes import Keys, Outputs, Queries, Scale, SegmentIds, State, Values


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size", "pallas"))
def sum_rule(
    q: Queries,
    k: Keys,
    v: Values,
    initial_state: State | None = None,
    scale: Scale = 1.0,
    impl: Impl | str = Impl.AUTO,
    chunk_size: int | None = None,
    pallas: PallasOptions | None = None,
    segment_ids: SegmentIds | None = None,
) -> tuple[Outputs, State]:
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
      chunk_size: the chunk length of the chunkwise forms (CHUNKED, PALLAS; see
        :func:`fwjax.ops.delta_rule`); None picks the backend's default.
      pallas: :class:`fwjax.ops.pallas.PallasOptions` of ``Impl.PALLAS``; None: the defaults
        (see :func:`fwjax.ops.delta_rule`).

      segment_ids: packed rows: integer document ids ``[B, T]`` (equal within a document);
        the memory is emptied before each document's first step, so every document computes
        what it would alone (:mod:`fwjax.ops.segments`). The first document continues
        ``initial_state``; the final state is the last document's. None: one sequence per row.
    Returns:
      ``(out, state)``: ``out [B, T, H, V]`` in the inputs' promoted dtype, and ``S_T``
      ``[B, H, K, V]`` in the state dtype (at least float32). ``T = 0`` gives an empty ``out``
      and the initial state; non-finite inputs at step t leave the outputs before t exact in
      every form (see :func:`fwjax.ops.delta_rule`).
    """
    return registry.run_rule(
        registry.SUM,
        q,
        k,
        v,
        (),
        initial_state,
        scale,
        impl,
        chunk_size,
        pallas,
        segment_ids=segment_ids,
    )


__all__ = ["sum_rule", "sum_rule_step"]
