"""Packed documents: several documents in one row of a batch, each with its own memory.

A row ``[T]`` holding documents one after another is described by ``segment_ids [B, T]``
(integers, equal within a document, different between neighbouring documents; the convention
of flax, MaxText and splash attention). A document starts at every ``t > 0`` whose id differs
from ``t − 1``'s. There the fast weight memory (and the attention normaliser ``z``, and a short
convolution's window) is emptied before the step::

    S_{t-1} ← 0   at a document start,   then the rule's step as usual

so a packed row computes exactly what its documents compute run separately. The first document
of a row starts from the op's ``initial_state`` (a carried memory); the final state is the last
document's. flash-linear-attention describes a packed row by ``cu_seqlens`` (the cumulative
document lengths of one ``B = 1`` row): :func:`segment_ids_from_cu_seqlens` converts.

For the chunkwise forms, a document start is a decay gate of 0 that the chunk math applies as
masks rather than as ``log 0`` (:func:`chunk_masks`): inside a chunk a step only sees steps of
its own document, only the chunk's first document reads (and is read against) the incoming
state, and only its last document writes the outgoing one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fwjax.shapes import SegmentIds


def document_starts(segment_ids: SegmentIds, batch_time: tuple[int, int]) -> jax.Array:
    """Where documents start: ``starts[b, t]`` is True when ``t > 0`` and the id changes.

    Args:
      segment_ids: integer ``[B, T]`` ids (each document contiguous).
      batch_time: the expected ``(B, T)``.

    Returns:
      ``[B, T]`` bool; ``starts[:, 0]`` is False (the first document continues the initial
      state).

    Raises:
      ValueError / TypeError: ``segment_ids`` has another shape or is not integer.
    """
    segment_ids = jnp.asarray(segment_ids)
    if segment_ids.shape != tuple(batch_time):
        raise ValueError(
            f"segment_ids must have shape [B, T]={tuple(batch_time)}; got {segment_ids.shape=}"
        )
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise TypeError(f"segment_ids must be integer; got {segment_ids.dtype=}")
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], bool), changed], axis=1)


def segment_ids_from_cu_seqlens(cu_seqlens: jax.Array, length: int) -> jax.Array:
    """flash-linear-attention's ``cu_seqlens`` as ``segment_ids [1, length]``.

    Args:
      cu_seqlens: ``[N + 1]`` nondecreasing integers, ``0 = c_0 ≤ c_1 ≤ … ≤ c_N = length``:
        document ``i`` holds steps ``c_i … c_{i+1} − 1``.
      length: ``T``.

    Returns:
      ``[1, T]`` int32: the document index of every step.
    """
    cu_seqlens = jnp.asarray(cu_seqlens)
    if cu_seqlens.ndim != 1 or not jnp.issubdtype(cu_seqlens.dtype, jnp.integer):
        raise ValueError(f"cu_seqlens must be a 1-D integer array; got {cu_seqlens.shape=}")
    steps = jnp.arange(length)
    ids = jnp.searchsorted(cu_seqlens, steps, side="right") - 1
    return ids.astype(jnp.int32)[None]


def start_index(starts: jax.Array) -> jax.Array:
    """The step at which each step's document starts (0 for a row's first document).

    Args:
      starts: ``[B, T]`` bool document starts (:func:`document_starts`).

    Returns:
      ``[B, T]`` int32.
    """
    steps = jnp.arange(starts.shape[1], dtype=jnp.int32)
    return jax.lax.cummax(jnp.where(starts, steps, 0), axis=1)


def document_positions(segment_ids: SegmentIds) -> jax.Array:
    """Each step's position inside its own document (``0`` at every document start).

    Args:
      segment_ids: integer ``[B, T]``.

    Returns:
      ``[B, T]`` int32.
    """
    segment_ids = jnp.asarray(segment_ids)
    starts = document_starts(segment_ids, segment_ids.shape)
    return jnp.arange(segment_ids.shape[1], dtype=jnp.int32) - start_index(starts)


def segmented_cumsum(x: jax.Array, starts: jax.Array) -> jax.Array:
    """A cumulative sum over time that restarts at every document start (an associative scan:
    no cancellation between the documents of a long row).

    Args:
      x: ``[B, T, ...]``.
      starts: ``[B, T]`` bool.

    Returns:
      ``[B, T, ...]``: ``Σ x_s`` over the steps ``s ≤ t`` of ``t``'s document.
    """
    flags = starts.reshape(starts.shape + (1,) * (x.ndim - 2))

    def combine(a, b):
        (a_sum, a_start), (b_sum, b_start) = a, b
        return jnp.where(b_start, b_sum, a_sum + b_sum), a_start | b_start

    return jax.lax.associative_scan(combine, (x, jnp.broadcast_to(flags, x.shape)), axis=1)[0]


def chunk_masks(starts: jax.Array):
    """Which steps of a chunk see each other and the state, from the chunk's document starts.

    Args:
      starts: ``[..., C]``, 1 at a document start, 0 elsewhere (any dtype).

    Returns:
      ``(same, entry, exit, carry)``: ``same [..., C, C]`` (steps ``i, j`` are in one
      document), ``entry [..., C]`` (the step's document began before the chunk: it reads the
      incoming state), ``exit [..., C]`` (the step is in the chunk's last document: it writes
      the outgoing state) and ``carry [...]`` (no document starts in the chunk: the incoming
      state survives it). All bool.
    """
    doc = jnp.cumsum(starts.astype(jnp.int32), axis=-1)  # document index inside the chunk
    same = doc[..., :, None] == doc[..., None, :]
    return same, doc == 0, doc == doc[..., -1:], doc[..., -1] == 0


def reset(state: jax.Array, start: jax.Array) -> jax.Array:
    """Empties ``state [B, H, K, V]`` (or ``[B, H, K]``) where ``start [B, H]`` is nonzero
    (a replacement, not a product: a non-finite memory does not reach the next document)."""
    start = start.reshape(start.shape + (1,) * (state.ndim - start.ndim))
    return jnp.where(start != 0, jnp.zeros_like(state), state)


def restore_nonfinite_packed(out, state, steps, starts):
    """:func:`fwjax.ops.impl.restore_nonfinite` for packed rows: a non-finite write reaches
    the outputs of its own document from its step on, and the final state only when it is in
    the last document.

    Args:
      out: ``[B, T, H, V]``; state: ``[B, H, K, V]``.
      steps: the :class:`~fwjax.ops.impl.NonFiniteSteps` of the inputs.
      starts: ``[B, T]`` bool document starts.
    """
    writes = jnp.cumsum(steps.write.astype(jnp.int32), axis=1)  # [B, T, H, V]
    first = start_index(starts)  # [B, T]
    # Non-finite writes before each step's document: the running count one step before it.
    before = jnp.take_along_axis(writes, jnp.maximum(first - 1, 0)[:, :, None, None], axis=1)
    before = jnp.where((first > 0)[:, :, None, None], before, 0)
    bad_out = steps.read[..., None] | (writes > before)
    out = jnp.where(bad_out, jnp.array(jnp.nan, out.dtype), out)
    bad_state = (writes[:, -1] > before[:, -1])[:, :, None, :]
    state = jnp.where(bad_state, jnp.array(jnp.nan, state.dtype), state)
    return out, state
