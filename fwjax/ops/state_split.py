"""The split state scan: a scan over chunks whose carry is affine in itself, run as ``P``
segments in parallel instead of one sequential chain.

The chunkwise forms carry a ``[..., K, V]`` matrix across chunks with an affine update. For the
delta rule's forward pass (``W, U``: the chunk's WY terms) and its backward pass (``G = ∂L/∂S``,
walked in reverse)::

    S ← (I − Kᵀ W) S + Kᵀ U                       (forward)
    G ← (I − Wᵀ K) G + Qᵀ Ō − Wᵀ Pᵀ Ō             (backward)

A sequential scan over ``N`` chunks has only ``B·H·(V / tile)`` independent chains; with long
sequences and few heads that does not fill an accelerator (B 1, H 16 is 16 chains). Split the
``N`` chunks into ``P`` segments of ``L = N / P``; then (the parallel prefix of affine maps,
Blelloch, 1990, "Prefix sums and their applications", with one level)::

    1. every segment in parallel, from a zero carry and from the identity:
         b_p = the segment's chain applied to 0,   M_p = the product of its transitions
    2. sequentially over the P segments (P small matrix products):
         c_0 = carry₀,   c_{p+1} = M_p c_p + b_p
    3. every segment in parallel: the original scan from its true incoming carry c_p

Step 3 gives exactly what the sequential scan gives (outputs, per-chunk carries, final carry)
up to rounding. Step 1 runs the chain once more and applies each chunk's linear part to a
``[K, K]`` matrix (for ``K ≈ V`` about twice the chain again): about three times the chain's
matmuls in all, in exchange for ``P`` times its parallelism. ``M_p`` is a product of ``L``
transitions: with normalised keys and ``β ∈ [0, 2]`` their eigenvalues lie in ``[−1, 1]`` and the
product stays bounded; with unnormalised keys it can grow or shrink by orders of magnitude and
the combine ``M_p c_p`` can lose the accuracy the sequential scan keeps.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def segmented_scan(
    step: Callable,
    chain: Callable,
    linear: Callable,
    init: jax.Array,
    xs,
    segments: int,
    *,
    reverse: bool = False,
):
    """``jax.lax.scan(step, init, xs, reverse=reverse)`` computed as ``segments`` parallel
    segments, for a step whose carry update is affine.

    Args:
      step: ``step(carry, x) -> (carry', y)``, the scan's step; ``carry [..., K, V]``.
      chain: ``chain(carry, x) -> carry'``, the carry update of ``step`` alone (cheaper: no
        output); it must be affine, ``chain(c, x) = A_x c + b_x`` with ``A_x [..., K, K]``
        acting from the left.
      linear: ``linear(m, x) -> A_x m`` for ``m [..., K, K]``: the linear part of ``chain``.
      init: the initial carry ``[..., K, V]``.
      xs: the scanned inputs, a pytree of ``[N, ...]`` arrays; ``N`` must be a multiple of
        ``segments`` (pad with chunks whose transition is the identity: zero keys).
      segments: ``P``; 1 is the plain sequential scan.
      reverse: scan from the last chunk to the first (the backward pass).

    Returns:
      ``(final carry, ys)`` as :func:`jax.lax.scan` returns them.

    Raises:
      ValueError: ``segments`` does not divide ``N``.
    """
    if segments == 1:
        return jax.lax.scan(step, init, xs, reverse=reverse)
    n = jax.tree.leaves(xs)[0].shape[0]
    if segments < 1 or n % segments:
        raise ValueError(f"{segments=} must be a positive divisor of the number of chunks {n=}")
    per_segment = jax.tree.map(lambda x: x.reshape(segments, n // segments, *x.shape[1:]), xs)

    # 1. Each segment's affine map (M_p, b_p), all segments at once.
    def segment_map(x_segment):
        k = init.shape[-2]
        identity = jnp.broadcast_to(jnp.eye(k, dtype=init.dtype), (*init.shape[:-2], k, k))

        def body(carry, x):
            m, b = carry
            return (linear(m, x), chain(b, x)), None

        (m, b), _ = jax.lax.scan(body, (identity, jnp.zeros_like(init)), x_segment, reverse=reverse)
        return m, b

    maps = jax.vmap(segment_map)(per_segment)  # M [P, ..., K, K], b [P, ..., K, V]

    # 2. The carry entering each segment: c_{p+1} = M_p c_p + b_p, in the scan's direction.
    incoming = incoming_carries(*maps, init, reverse=reverse)

    # 3. Every segment's scan from its true incoming carry.
    finals, ys = jax.vmap(lambda c, x: jax.lax.scan(step, c, x, reverse=reverse))(
        incoming, per_segment
    )
    ys = jax.tree.map(lambda y: y.reshape(n, *y.shape[2:]), ys)
    return finals[0 if reverse else -1], ys


def incoming_carries(m: jax.Array, b: jax.Array, init: jax.Array, *, reverse: bool = False):
    """Step 2 of the split state scan: the carry entering each of the ``P`` segments from
    their maps ``end = M_p start + b_p``, ``c_0 = init``, ``c_{p+1} = M_p c_p + b_p`` (from the
    last segment to the first when ``reverse``), matrix products at full precision.

    Args:
      m: ``[P, ..., K, K]``; b: ``[P, ..., K, V]``; init: ``[..., K, V]``.

    Returns:
      ``[P, ..., K, V]``: ``c_p`` for every segment.
    """

    def combine(c, mb):
        m_p, b_p = mb
        return jnp.matmul(m_p, c, precision=jax.lax.Precision.HIGHEST) + b_p, c

    _, incoming = jax.lax.scan(combine, init, (m, b), reverse=reverse)
    return incoming


def emit_carry(chain: Callable) -> Callable:
    """A scan step that applies ``chain`` and emits the carry it was given (the state entering
    each chunk, or in a reverse scan ``G`` after each chunk)."""
    return lambda carry, inputs: (chain(carry, inputs), carry)


def pad_chunks(xs, segments: int, fills=None):
    """Pads the ``[N, ...]`` leaves of ``xs`` (a chain's per-chunk inputs) to a multiple of
    ``segments`` chunks; returns ``(padded, N)``. ``fills``: the padding value of each leaf (a
    tuple like ``xs``; None: all zeros). Zero keys and WY terms, and a chunk decay of 1, make a
    chunk whose transition is the identity; the caller slices the padded chunks' outputs
    away."""
    n = jax.tree.leaves(xs)[0].shape[0]
    extra = -n % segments
    fills = jax.tree.map(lambda _: 0.0, xs) if fills is None else fills
    pad = lambda x, fill: jnp.pad(x, [(0, extra)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
    return jax.tree.map(pad, xs, fills), n


def resolve_segments(segments: int | None, num_chunks: int) -> int:
    """``P`` for a scan over ``num_chunks`` chunks: None gives 1 (the sequential scan); otherwise
    segments of ``L = ⌈N / segments⌉`` chunks, ``P = ⌈N / L⌉`` of them, so that padding adds
    fewer than ``L`` identity chunks (N 9 asked for 8 segments: 5 segments of 2, one pad
    chunk). The automatic choice stays 1 on every backend until a GPU measurement
    (``benchmarks/gpu_bench.py``, the ``split`` jobs) shows where splitting pays."""
    if segments is None:
        return 1
    if segments < 1:
        raise ValueError(f"{segments=} must be a positive integer")
    per_segment = -(-num_chunks // segments)
    return -(-num_chunks // per_segment)
