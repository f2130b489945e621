"""The delta rule fast weight memory (Schlag, Irie, Schmidhuber, 2021)."""

from __future__ import annotations

import functools

import jax

from fwjax.ops import registry
from fwjax.ops.delta_rule.recurrent import delta_rule_step
from fwjax.ops.impl import Impl
from fwjax.ops.pallas import PallasOptions
from fwjax.shapes import Beta, Keys, Outputs, Queries, Scale, SegmentIds, State, Values


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size", "pallas", "state_segments"))
def delta_rule(
    q: Queries,
    k: Keys,
    v: Values,
    beta: Beta,
    initial_state: State | None = None,
    scale: Scale = 1.0,
    impl: Impl | str = Impl.AUTO,
    chunk_size: int | None = None,
    pallas: PallasOptions | None = None,
    segment_ids: SegmentIds | None = None,
    state_segments: int | None = None,
) -> tuple[Outputs, State]:
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
      chunk_size: the chunk length ``C`` of the chunkwise forms (CHUNKED, PALLAS); None picks
        the backend's default; REFERENCE and RECURRENT do not use it. Any ``T`` is accepted
        (padding with zero keys and β = 0 is exact). PALLAS runs its kernel on ``C`` rounded
        up to its backend's tile (``Tiling.chunk``: a power of two >= 16 on GPU).
      pallas: :class:`fwjax.ops.pallas.PallasOptions` of ``Impl.PALLAS`` (backend, interpret
        mode, backward kernel or XLA backward, value tile); None: the defaults. On a CPU
        backend PALLAS always runs in interpret mode.

      segment_ids: packed rows: integer document ids ``[B, T]`` (equal within a document);
        the memory is emptied before each document's first step, so every document computes
        what it would alone (:mod:`fwjax.ops.segments`). The first document continues
        ``initial_state``; the final state is the last document's. None: one sequence per row.
      state_segments: CHUNKED, and PALLAS under ``PallasSchedule.PHASED``: run the forward
        and backward chunk scans as ``P`` parallel segments (each segment's affine map from a
        zero start, the ``P`` maps combined in sequence, each segment rerun from its true
        incoming state; :mod:`fwjax.ops.state_split`, and the chain kernels of
        :mod:`fwjax.ops.pallas.phased`). Same result up to rounding, ``P`` times the
        parallelism of the state chain for about three times its matmuls: for long sequences with
        few ``B·H``. None: one sequential scan (the default on every backend until measured).
        Packed rows (``segment_ids``) ignore it.

    Returns:
      ``(out, state)``: ``out [B, T, H, V]`` in the inputs' promoted dtype, and the final
      state ``S_T`` ``[B, H, K, V]`` in the state dtype (the inputs', initial state's and
      β's promoted dtype, at least float32). ``T = 0`` gives an empty ``out`` and the initial
      state. Every form is causal even for non-finite inputs: a NaN at step t leaves the
      outputs before t exact (a NaN query only its own output; a NaN key, value or β every
      output from t on and the final state, as in the recurrence).
    """
    return registry.run_rule(
        registry.DELTA,
        q,
        k,
        v,
        (beta,),
        initial_state,
        scale,
        impl,
        chunk_size,
        pallas,
        segment_ids=segment_ids,
        state_segments=state_segments,
    )


__all__ = ["delta_rule", "delta_rule_step"]
