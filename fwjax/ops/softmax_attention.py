"""Exact softmax attention: the baseline that linear attention approximates."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fwjax.ops.segments import document_starts
from fwjax.shapes import Outputs, RawHeads, Scale, SegmentIds, SoftmaxKeys, SoftmaxValues


def softmax_attention(
    q: RawHeads,
    k: SoftmaxKeys,
    v: SoftmaxValues,
    causal: bool = True,
    scale: Scale = None,
    segment_ids: SegmentIds | None = None,
) -> Outputs:
    """Multi-head softmax attention ``softmax(scale · q kᵀ + mask) v`` per batch element and head.

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, S, H, D]`` (``S >= T`` when ``causal``).
      v: ``[B, S, H, V]``.
      causal: query ``i`` attends to keys ``j <= i + (S − T)``: the queries are the LAST ``T``
        positions of the key sequence (``S = T`` for self-attention; ``S > T`` when decoding
        against a key/value cache).
      scale: logit scale; ``1/√D`` when None.
      segment_ids: packed rows of self-attention (``S = T``): integer ``[B, T]`` document ids;
        a query attends only to keys of its own document (:mod:`fwjax.ops.segments`).

    Returns:
      ``[B, T, H, V]`` in the inputs' promoted dtype; logits and softmax are computed in at least
      float32, with the row maximum subtracted.
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got {q.shape=}, {k.shape=}, {v.shape=}")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"incompatible shapes: {q.shape=}, {k.shape=}, {v.shape=}")
    t, s = q.shape[1], k.shape[1]
    if causal and s < t:
        raise ValueError(f"causal attention needs at least as many keys as queries; got {t=}, {s=}")
    out_dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    dtype = jnp.promote_types(out_dtype, jnp.float32)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    logits = scale * jnp.einsum("bthd,bshd->bhts", q.astype(dtype), k.astype(dtype))
    mask = jnp.ones((1, 1, t, s), bool)
    if causal:
        mask = jnp.tri(t, s, k=s - t, dtype=bool)[None, None]
    if segment_ids is not None:
        if s != t:
            raise ValueError(f"segment_ids need self-attention (S = T); got {t=}, {s=}")
        document_starts(segment_ids, q.shape[:2])  # validates shape and dtype
        segment_ids = jnp.asarray(segment_ids)
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    if causal or segment_ids is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhts,bshv->bthv", weights, v.astype(dtype)).astype(out_dtype)
