"""Padding and reshaping of ``[B, T, H, .]`` sequences into chunks for the chunkwise forms.

Padding appends zeros at the end of time. For the fast weight ops that is exact: a zero key
writes nothing and reads nothing, and β = 0 writes nothing, so padded steps leave the state
unchanged; padded outputs are sliced away.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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


def causal_mask(chunk_size: int, *, include_diagonal: bool) -> jax.Array:
    """Boolean ``[C, C]`` lower-triangular mask (``i >= j``, or ``i > j`` without the diagonal)."""
    return jnp.tri(chunk_size, k=0 if include_diagonal else -1, dtype=bool)
