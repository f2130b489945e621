"""The Delta RNN and the Delta LSTM (Irie, Schlag, Csordás, Schmidhuber, 2021, "Going Beyond
Linear Transformers with Recurrent Fast Weight Programmers", NeurIPS; official code
IDSIA/recurrent-fwp, kernels ``fast_weight_rnn_v2`` and ``fast_lstm_v4``, the versions of the
paper's main tables): a Delta Net whose output is fed back through a second fast weight matrix.

This module is the recurrent part. Its inputs ``z`` are the outputs of the feed-forward fast
weights (a Delta Net, :func:`fwjax.ops.delta_rule`, whose chunkwise forms apply); the recurrent
fast weights ``R ∈ R^{D×D}`` per head are written with the delta rule by keys, values and write
strengths computed from the layer input, and read with the softmax of the previous output::

    a_t = softmax(h_{t-1})                                  (the recurrent query)
    R_t = R_{t-1} + β_t k_t (v_t − R_{t-1}ᵀ k_t)ᵀ            (delta rule; k_t: a softmax)
    p_t = z_t + R_tᵀ a_t

Delta RNN: ``h_t = p_t``. Delta LSTM (three gates g ∈ {i, u, o}, each with its own ``z^g``,
``R^g``, ``k^g``, ``v^g``, ``β^g``; coupled input and forget gates, as ``fast_lstm_v4``)::

    i_t = σ(p^i_t),   u_t = p^u_t,   o_t = σ(p^o_t)
    c_t = i_t ⊙ u_t + (1 − i_t) ⊙ c_{t-1},   h_t = o_t ⊙ c_t

The official kernels add 1e-6 to the softmax's denominator; here the softmax is exact.

Forms: REFERENCE (the equations for one head, vmapped, highest precision) and RECURRENT (one
``lax.scan`` over time on the whole ``[B, H]`` state, differentiated by autodiff). There is no
chunkwise form: the query of step t is a softmax of the output of step t − 1, which itself
reads ``R_{t-1}``, so a chunk's reads cannot be computed before the previous step's (CHUNKED
and PALLAS raise).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fwjax.ops.common import HIGHEST
from fwjax.ops.impl import Impl, state_dtype

GATES = 3  # the Delta LSTM's input gate, update term and output gate


class DeltaRNNState(NamedTuple):
    """The Delta RNN's carried state: recurrent fast weights ``R [B, H, D, D]`` and the previous
    output ``h [B, H, D]``."""

    fast_weights: jax.Array
    output: jax.Array


class DeltaLSTMState(NamedTuple):
    """The Delta LSTM's carried state: recurrent fast weights ``[B, 3, H, D, D]`` (input gate,
    update term, output gate), the previous output ``h [B, H, D]`` and cell ``c [B, H, D]``."""

    fast_weights: jax.Array
    output: jax.Array
    cell: jax.Array


def _rnn_cell(p, c):
    """Delta RNN: the output is the pre-activation of its one gate."""
    return p[0], c


def _lstm_cell(p, c):
    """Delta LSTM (``fast_lstm_v4``): coupled input/forget gate, linear update term."""
    i, u, o = jax.nn.sigmoid(p[0]), p[1], jax.nn.sigmoid(p[2])
    c = i * u + (1.0 - i) * c
    return o * c, c


def _step(cell: Callable, precision, carry, inputs):
    """One step; every input has the gate axis first (``[G, ...]``), the outputs do not.

    ``carry = (R [G, ..., D, D], h [..., D], c)``; ``inputs = (z, k, v [G, ..., D], β [G, ...])``.
    """
    r, h, c = carry
    z, k, v, beta = inputs
    a = jnp.broadcast_to(jax.nn.softmax(h, axis=-1), z.shape)  # the recurrent query
    v_bar = jnp.einsum("...k,...kv->...v", k, r, precision=precision)  # R_{t-1}ᵀ k_t
    r = r + beta[..., None, None] * k[..., :, None] * (v - v_bar)[..., None, :]
    p = z + jnp.einsum("...k,...kv->...v", a, r, precision=precision)  # z_t + R_tᵀ a_t
    h, c = cell(p, c)
    return (r, h, c), h


def _reference(cell, z, k, v, beta, r, h, c):
    """One head at a time (``jax.vmap`` over B and H), highest precision. Inputs are
    ``[B, T, G, H, ...]``, ``r [B, G, H, D, D]``, ``h, c [B, H, ...]``."""

    def one_head(z, k, v, beta, r, h, c):
        step = functools.partial(_step, cell, HIGHEST)
        (r, h, c), hs = jax.lax.scan(step, (r, h, c), (z, k, v, beta))
        return hs, r, h, c

    per_head = jax.vmap(one_head, in_axes=(2, 2, 2, 2, 1, 0, 0), out_axes=(1, 1, 0, 0))
    per_batch = jax.vmap(per_head)
    return per_batch(z, k, v, beta, r, h, c)


def _recurrent(cell, z, k, v, beta, r, h, c):
    """One ``lax.scan`` over time on the ``[B, H]`` state (gate axis moved first)."""
    step = functools.partial(_step, cell, None)
    xs = tuple(jnp.moveaxis(x, (1, 2), (0, 1)) for x in (z, k, v, beta))  # [T, G, B, ...]
    (r, h, c), hs = jax.lax.scan(step, (jnp.moveaxis(r, 1, 0), h, c), xs)
    return jnp.moveaxis(hs, 0, 1), jnp.moveaxis(r, 0, 1), h, c


_FORMS = {Impl.REFERENCE: _reference, Impl.RECURRENT: _recurrent}


def _resolve(impl, name: str) -> Impl:
    impl = Impl(impl)
    if impl is Impl.AUTO:
        return Impl.RECURRENT
    if impl not in _FORMS:
        raise ValueError(
            f"{impl=} does not exist for the {name}: its recurrent query is a softmax of the "
            "previous step's output, so there is no chunkwise form (use REFERENCE or RECURRENT)"
        )
    return impl


def _check(z, k, v, beta, gates: int | None):
    """Validates ``[B, T, (G,) H, D]`` inputs and ``[B, T, (G,) H]`` write strengths."""
    z, k, v, beta = (jnp.asarray(x) for x in (z, k, v, beta))
    layout = "[B, T, H, D]" if gates is None else f"[B, T, {gates}, H, D]"
    ndim = 4 if gates is None else 5
    if (
        z.ndim != ndim
        or z.shape != k.shape
        or z.shape != v.shape
        or beta.shape != z.shape[:-1]
        or (gates is not None and z.shape[2] != gates)
    ):
        raise ValueError(
            f"z, k, v must be {layout} and beta the same without D; got {z.shape=}, "
            f"{k.shape=}, {v.shape=}, {beta.shape=}"
        )
    return z, k, v, beta


def _run(cell, z, k, v, beta, r, h, c, impl):
    """Casts to the state dtype (at least float32) and runs the form ``impl`` on
    ``[B, T, G, H, D]`` inputs; returns ``(h_all [B, T, H, D] in the inputs' dtype, r, h, c)``."""
    out_dtype = jnp.result_type(z, k, v)
    dtype = jnp.promote_types(state_dtype(z.dtype, beta.dtype), r.dtype)
    cast = lambda x: x.astype(dtype)
    hs, r, h, c = _FORMS[impl](cell, *map(cast, (z, k, v, beta, r, h, c)))
    return hs.astype(out_dtype), r, h, c


@functools.partial(jax.jit, static_argnames=("impl",))
def delta_rnn(
    z: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    state: DeltaRNNState | None = None,
    impl: Impl | str = Impl.AUTO,
) -> tuple[jax.Array, DeltaRNNState]:
    """The Delta RNN's recurrent part: ``h_t = z_t + R_tᵀ softmax(h_{t-1})`` with ``R`` written
    by the delta rule (equations in the module docstring).

    Args:
      z: the feed-forward fast weights' outputs ``[B, T, H, D]``.
      k: recurrent keys ``[B, T, H, D]`` (already through their feature map; the official
        layer uses a softmax).
      v: recurrent values ``[B, T, H, D]``.
      beta: recurrent write strengths ``[B, T, H]``.
      state: a carried :class:`DeltaRNNState`; None: zeros.
      impl: REFERENCE or RECURRENT (AUTO: RECURRENT); CHUNKED and PALLAS do not exist.

    Returns:
      ``(h [B, T, H, D], DeltaRNNState)``; outputs in the inputs' promoted dtype, the state and
      all accumulation in at least float32.
    """
    z, k, v, beta = _check(z, k, v, beta, None)
    impl = _resolve(impl, "Delta RNN")
    b, _, heads, d = z.shape
    if state is None:
        dtype = state_dtype(z.dtype, beta.dtype)
        state = DeltaRNNState(jnp.zeros((b, heads, d, d), dtype), jnp.zeros((b, heads, d), dtype))
    gate = lambda x: x[:, :, None]  # one gate
    empty = jnp.zeros((b, heads, 0), state.output.dtype)
    inputs = tuple(map(gate, (z, k, v, beta)))
    hs, r, h, _ = _run(_rnn_cell, *inputs, state.fast_weights[:, None], state.output, empty, impl)
    return hs, DeltaRNNState(r[:, 0], h)


@functools.partial(jax.jit, static_argnames=("impl",))
def delta_lstm(
    z: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    state: DeltaLSTMState | None = None,
    impl: Impl | str = Impl.AUTO,
) -> tuple[jax.Array, DeltaLSTMState]:
    """The Delta LSTM's recurrent part (equations in the module docstring).

    Args:
      z: the feed-forward fast weights' outputs ``[B, T, 3, H, D]`` for the input gate, the
        update term and the output gate, in that order.
      k: recurrent keys ``[B, T, 3, H, D]`` (already through their feature map).
      v: recurrent values ``[B, T, 3, H, D]``.
      beta: recurrent write strengths ``[B, T, 3, H]``.
      state: a carried :class:`DeltaLSTMState`; None: zeros.
      impl: REFERENCE or RECURRENT (AUTO: RECURRENT); CHUNKED and PALLAS do not exist.

    Returns:
      ``(h [B, T, H, D], DeltaLSTMState)``; dtypes as :func:`delta_rnn`.
    """
    z, k, v, beta = _check(z, k, v, beta, GATES)
    impl = _resolve(impl, "Delta LSTM")
    b, _, _, heads, d = z.shape
    if state is None:
        dtype = state_dtype(z.dtype, beta.dtype)
        zeros = lambda *shape: jnp.zeros(shape, dtype)
        state = DeltaLSTMState(zeros(b, GATES, heads, d, d), zeros(b, heads, d), zeros(b, heads, d))
    hs, r, h, c = _run(
        _lstm_cell, z, k, v, beta, state.fast_weights, state.output, state.cell, impl
    )
    return hs, DeltaLSTMState(r, h, c.astype(h.dtype))


def delta_rnn_step(z_t, k_t, v_t, beta_t, state: DeltaRNNState):
    """One Delta RNN step for every batch element and head (the decode path): inputs
    ``[B, H, D]``, ``beta_t [B, H]``; returns ``(h_t [B, H, D], DeltaRNNState)``."""
    step = functools.partial(_step, _rnn_cell, None)
    empty = state.output[..., :0]
    (r, h, _), h_t = step(
        (state.fast_weights[None], state.output, empty),
        tuple(x[None] for x in (z_t, k_t, v_t, beta_t)),
    )
    return h_t, DeltaRNNState(r[0], h)


def delta_lstm_step(z_t, k_t, v_t, beta_t, state: DeltaLSTMState):
    """One Delta LSTM step (the decode path): inputs ``[B, 3, H, D]``, ``beta_t [B, 3, H]``;
    returns ``(h_t [B, H, D], DeltaLSTMState)``."""
    step = functools.partial(_step, _lstm_cell, None)
    first = lambda x: jnp.moveaxis(x, 1, 0)
    (r, h, c), h_t = step(
        (first(state.fast_weights), state.output, state.cell),
        tuple(map(first, (z_t, k_t, v_t, beta_t))),
    )
    return h_t, DeltaLSTMState(jnp.moveaxis(r, 0, 1), h, c)


__all__ = [
    "DeltaLSTMState",
    "DeltaRNNState",
    "delta_lstm",
    "delta_lstm_step",
    "delta_rnn",
    "delta_rnn_step",
]
