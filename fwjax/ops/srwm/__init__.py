"""The modern self-referential weight matrix (SRWM; Irie, Schlag, Csordás, Schmidhuber, 2022,
"A Modern Self-Referential Weight Matrix That Learns to Modify Itself", ICML; official kernel
``self_ref_v0`` of IDSIA/modern-srwm): one matrix per head that computes its own output, query,
key and learning rates, and rewrites itself with the delta rule.

Per head, with ``W = [W_y, W_q, W_k, w_b]`` (``D×D``, ``D×D``, ``D×D``, ``D×4``; a row vector
times ``W`` applies it) and input ``x_t``::

    y_t = x_t W_y,   q_t = softmax(x_t W_q),   k_t = softmax(x_t W_k),   b_t = σ(x_t w_b) ∈ R⁴
    for each part (W_i, i = y, q, k, b; learning rate b_t[i]):
        W_i ← W_i + b_t[i] · k_tᵀ (q_t W_i − k_t W_i)      (the value is what W_i maps q_t to)

The output ``y_t`` is read before the update (with ``W_{t-1}``). Forms: REFERENCE (one head,
vmapped, highest precision) and RECURRENT (a ``lax.scan`` on the ``[B, H]`` batch), both
differentiated by autodiff. There is no chunkwise form: the keys and queries of step t are
produced by the matrix that step t − 1 wrote.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fwjax.ops.common import HIGHEST
from fwjax.ops.impl import Impl, state_dtype


class SRWMState(NamedTuple):
    """The self-referential matrix of every batch element and head: ``w_y, w_q, w_k
    [B, H, D, D]`` and ``w_b [B, H, D, 4]`` (input index first)."""

    w_y: jax.Array
    w_q: jax.Array
    w_k: jax.Array
    w_b: jax.Array


def _step(precision, w, x):
    """One step: ``w`` an :class:`SRWMState` (any leading axes), ``x [..., D]``."""
    mm = lambda a, m: jnp.einsum("...d,...de->...e", a, m, precision=precision)
    y = mm(x, w.w_y)
    q = jax.nn.softmax(mm(x, w.w_q), axis=-1)
    k = jax.nn.softmax(mm(x, w.w_k), axis=-1)
    b = jax.nn.sigmoid(mm(x, w.w_b))  # the four learning rates
    new = []
    for i, part in enumerate(w):
        insert = b[..., i, None] * (mm(q, part) - mm(k, part))  # b[i] (q W_i − k W_i)
        new.append(part + k[..., :, None] * insert[..., None, :])
    return SRWMState(*new), y


def _reference(x, state):
    def one_head(x, w_y, w_q, w_k, w_b):
        w, ys = jax.lax.scan(functools.partial(_step, HIGHEST), SRWMState(w_y, w_q, w_k, w_b), x)
        return ys, w

    heads = jax.vmap(one_head, in_axes=(1, 0, 0, 0, 0), out_axes=(1, 0))
    ys, w = jax.vmap(heads)(x, *state)
    return ys, SRWMState(*w)


def _recurrent(x, state):
    w, ys = jax.lax.scan(functools.partial(_step, None), state, jnp.moveaxis(x, 1, 0))
    return jnp.moveaxis(ys, 0, 1), w


_FORMS = {Impl.REFERENCE: _reference, Impl.RECURRENT: _recurrent}


@functools.partial(jax.jit, static_argnames=("impl",))
def srwm(
    x: jax.Array, state: SRWMState, impl: Impl | str = Impl.AUTO
) -> tuple[jax.Array, SRWMState]:
    """The self-referential weight matrix over a sequence (equations in the module docstring).

    Args:
      x: inputs ``[B, T, H, D]``.
      state: the matrix at the start (:class:`SRWMState`; a layer passes its slow weights plus
        a carried change).
      impl: REFERENCE or RECURRENT (AUTO: RECURRENT); no chunkwise form exists.

    Returns:
      ``(y [B, T, H, D], the final SRWMState)``; ``y`` in ``x``'s dtype, the matrix in at least
      float32.
    """
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"x must be [B, T, H, D]; got {x.shape=}")
    b, _, h, d = x.shape
    for name, part, last in zip(SRWMState._fields, state, (d, d, d, 4), strict=True):
        if part.shape != (b, h, d, last):
            raise ValueError(f"state.{name} must have shape {(b, h, d, last)}; got {part.shape}")
    impl = Impl(impl)
    impl = Impl.RECURRENT if impl is Impl.AUTO else impl
    if impl not in _FORMS:
        raise ValueError(
            f"{impl=} does not exist for the SRWM: its keys and queries at step t come from the "
            "matrix written at step t − 1, so there is no chunkwise form (use REFERENCE or "
            "RECURRENT)"
        )
    dtype = state_dtype(x.dtype, *(p.dtype for p in state))
    ys, final = _FORMS[impl](x.astype(dtype), SRWMState(*(p.astype(dtype) for p in state)))
    return ys.astype(x.dtype), final


def srwm_step(x_t: jax.Array, state: SRWMState) -> tuple[jax.Array, SRWMState]:
    """One step for every batch element and head (decoding): ``x_t [B, H, D]`` ->
    ``(y_t [B, H, D], new SRWMState)``."""
    new, y = _step(None, state, x_t)
    return y, new


__all__ = ["SRWMState", "srwm", "srwm_step"]
