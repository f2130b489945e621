"""Matmul-only inverse of unit lower-triangular matrices, for the chunkwise delta rule.

``jax.scipy.linalg.solve_triangular`` is avoided on purpose: its gradient hung intermittently on
XLA:CPU (the process idled on futexes), and a matmul-only algorithm maps onto matrix units on
GPU/TPU and differentiates through plain autodiff. Powers of the strictly lower part are never
formed (a Neumann series overflows once ``|A| > 1``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from fwjax.validation import check_positive_ints

# Diagonal blocks of 8 gave the fastest jitted forward + gradient on XLA:CPU for C = 16, 32, 64
# (256 matrices: 3.0 / 8.7 / 22 ms, vs 7.7 / 12.8 / 38 ms with blocks of 16) and compile faster
# than blocks of 16 (benchmarks/triangular_inverse.py).
DEFAULT_BLOCK_SIZE = 8


def _forward_substitution(a: jax.Array) -> jax.Array:
    """``(I + a)^{-1}`` for strictly lower-triangular ``a: [..., n, n]``, row by row.

    Row ``i`` of ``X = (I + A)^{-1}`` is ``e_i - A[i, :i] X[:i, :]``: rows above ``i`` are already
    final and ``A[i, j] = 0`` for ``j >= i``, so the whole ``A[i, :] @ X`` may be used. ``n - 1``
    dependent steps (n is at most the block size, so this is a short, unrolled loop).
    """
    n = a.shape[-1]
    eye = jnp.eye(n, dtype=a.dtype)
    x = jnp.broadcast_to(eye, a.shape)
    for i in range(1, n):
        row = eye[i] - jnp.einsum("...j,...jk->...k", a[..., i, :], x)
        x = x.at[..., i, :].set(row)
    return x


def _diagonal_blocks(a: jax.Array, size: int, row_offset: int) -> jax.Array:
    """Blocks ``(p + row_offset, p)`` (in units of ``size``) of ``a``, for every block column p
    with step 2 when ``row_offset == 1``; returns ``[..., n_blocks, size, size]``."""
    n = a.shape[-1]
    nb = n // size
    x = a.reshape(*a.shape[:-2], nb, size, nb, size)
    if row_offset:
        x = x[..., 1::2, :, 0::2, :]  # block (2p+1, 2p): the coupling of each pair
    blocks = jnp.diagonal(x, axis1=-4, axis2=-2)  # [..., size, size, nb']
    return jnp.moveaxis(blocks, -1, -3)


def unit_lower_triangular_inverse(
    a: jax.Array, *, block_size: int = DEFAULT_BLOCK_SIZE
) -> jax.Array:
    """Computes ``X = (I + tril(a, -1))^{-1}``.

    Args:
      a: ``[..., n, n]``; only its strictly lower part is read.
      block_size: size of the diagonal blocks inverted by forward substitution.

    Returns:
      ``[..., n, n]``, the unit lower-triangular inverse.

    Algorithm: pad ``n`` to ``block_size · 2^L`` (padding is an identity block, which leaves the
    top-left inverse unchanged), invert every diagonal block by forward substitution, then double
    the inverted blocks ``L`` times with
    ``inv([[L11, 0], [L21, L22]]) = [[X11, 0], [-X22 L21 X11, X22]]``.

    Gradient (closed form, no differentiation through the algorithm):
    ``dX = −X dA X``, so ``ā = tril(−Xᵀ X̄ Xᵀ, −1)``.
    """
    n = a.shape[-1]
    if a.shape[-2] != n:
        raise ValueError(f"a must be square in its last two axes; got {a.shape=}")
    return _inverse(a, block_size)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _inverse(a: jax.Array, block_size: int) -> jax.Array:
    return _inverse_impl(a, block_size)


def _inverse_fwd(a, block_size):
    x = _inverse_impl(a, block_size)
    return x, x


def _inverse_bwd(block_size, x, x_bar):
    del block_size
    xt = jnp.swapaxes(x, -1, -2)
    a_bar = -jnp.matmul(jnp.matmul(xt, x_bar), xt)
    return (jnp.tril(a_bar, -1),)


_inverse.defvjp(_inverse_fwd, _inverse_bwd)


def _inverse_impl(a: jax.Array, block_size: int) -> jax.Array:
    n = a.shape[-1]
    a = jnp.tril(a, -1)
    if n <= block_size:
        return _forward_substitution(a)
    levels = math.ceil(math.log2(math.ceil(n / block_size)))
    m = block_size * 2**levels
    padded = jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, m - n), (0, m - n)])
    x = _forward_substitution(_diagonal_blocks(padded, block_size, 0))  # [..., nb, b, b]
    size = block_size
    while x.shape[-3] > 1:
        x11, x22 = x[..., 0::2, :, :], x[..., 1::2, :, :]
        l21 = _diagonal_blocks(padded, size, 1)
        x21 = -jnp.matmul(jnp.matmul(x22, l21), x11)
        top = jnp.concatenate([x11, jnp.zeros_like(x11)], axis=-1)
        bottom = jnp.concatenate([x21, x22], axis=-1)
        x = jnp.concatenate([top, bottom], axis=-2)
        size *= 2
    return x[..., 0, :n, :n]


def solve_unit_lower(s: jax.Array, a: jax.Array, *, block_size: int = 64) -> jax.Array:
    """Solves ``r (I + tril(a, −1)) = s`` for the row vectors ``r`` (i.e. ``r = s (I + A)⁻¹``).

    Blocked back substitution over column blocks ``J`` (last first), matmul-only::

        r_J = (s_J − Σ_{I>J} r_I A_{IJ}) · (I + A_JJ)⁻¹

    with the diagonal blocks inverted by :func:`unit_lower_triangular_inverse`.
    Cost ``O(Q·n² + n·block_size²)`` instead of the ``O(n³)`` of inverting ``I + A``.
    Gradient (closed form): with ``X = (I + A)⁻¹``, ``s̄ = r̄ Xᵀ`` (the same solve on the
    reversed, transposed system) and ``ā = −tril(rᵀ s̄, −1)``.

    Args:
      s: right-hand sides ``[..., Q, n]``.
      a: ``[..., n, n]``; only its strictly lower part is read.
      block_size: the column block size.

    Returns:
      ``r``, ``[..., Q, n]``.
    """
    n = a.shape[-1]
    if a.shape[-2] != n or s.shape[-1] != n:
        raise ValueError(f"need a [..., n, n] and s [..., Q, n]; got {a.shape=} {s.shape=}")
    check_positive_ints(block_size=block_size)
    return _solve(s, a, block_size)


def _solve_impl(s, a, block_size):
    n = a.shape[-1]
    b = min(block_size, n)
    m = -(-n // b) * b  # pad n to a multiple of b: zero rows/columns of A are exact no-ops
    pad = m - n
    a = jnp.tril(a, -1)
    if pad:
        a = jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, pad), (0, pad)])
        s = jnp.pad(s, [(0, 0)] * (s.ndim - 1) + [(0, pad)])
    nb = m // b
    # Inverses of the diagonal blocks (I + A_JJ)⁻¹, [..., nb, b, b].
    blocks = a.reshape(*a.shape[:-2], nb, b, nb, b)
    diag = jnp.moveaxis(jnp.diagonal(blocks, axis1=-4, axis2=-2), -1, -3)
    diag_inv = unit_lower_triangular_inverse(diag)
    r_blocks = [None] * nb
    for j in reversed(range(nb)):
        rhs = s[..., j * b : (j + 1) * b]
        if j < nb - 1:
            # Σ_{I>J} r_I A_{IJ}: the solved tail times the rows below block J, columns of J.
            tail = jnp.concatenate(r_blocks[j + 1 :], axis=-1)
            rhs = rhs - tail @ a[..., (j + 1) * b :, j * b : (j + 1) * b]
        r_blocks[j] = rhs @ diag_inv[..., j, :, :]
    return jnp.concatenate(r_blocks, axis=-1)[..., :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _solve(s, a, block_size):
    return _solve_impl(s, a, block_size)


def _solve_fwd(s, a, block_size):
    r = _solve_impl(s, a, block_size)
    return r, (r, a)


def _solve_bwd(block_size, res, r_bar):
    r, a = res
    # s̄ = r̄ Xᵀ solves s̄ (I + A)ᵀ = r̄. Reversing the index order (P) turns the upper-triangular
    # (I + A)ᵀ into the unit-lower P (I + A)ᵀ P, so it is the same solve on flipped inputs.
    a_rev = jnp.flip(jnp.swapaxes(jnp.tril(a, -1), -1, -2), axis=(-2, -1))
    s_bar = jnp.flip(_solve_impl(jnp.flip(r_bar, -1), a_rev, block_size), -1)
    a_bar = -jnp.tril(jnp.swapaxes(r, -1, -2) @ s_bar, -1)
    return s_bar, a_bar


_solve.defvjp(_solve_fwd, _solve_bwd)
