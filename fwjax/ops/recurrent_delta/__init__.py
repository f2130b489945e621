"""The Recurrent Delta Net (Irie, Schlag, Csordás, Schmidhuber, 2021, "Going Beyond Linear
Transformers with Recurrent Fast Weight Programmers", NeurIPS; official code IDSIA/recurrent-fwp,
kernel ``rec_update_fwm_tanh``): the delta rule whose slow network also sees its own previous
output.

Per head, with fast weights ``W ∈ R^{D×D}`` and the previous (unscaled) output ``y_{t-1}``::

    r_t = tanh(y_{t-1})
    q_t = softmax(q^x_t + R_qᵀ r_t),   k_t = softmax(k^x_t + R_kᵀ r_t)
    v_t = v^x_t + R_vᵀ r_t,            β_t = σ(b^x_t + r_b · r_t)
    W_t = W_{t-1} + β_t k_t (v_t − W_{t-1}ᵀ k_t)ᵀ
    y_t = W_tᵀ q_t,                    o_t = scale · y_t

``q^x, k^x, v^x, b^x`` are the feed-forward parts (projections of the layer input); the
recurrent matrices ``R_q, R_k, R_v`` and vector ``r_b`` feed the previous output back. The
softmax is the official kernel's feature map (ELU+1 with sum normalisation replaced by it).

Forms: REFERENCE (the equations for one head, vmapped, highest precision) and RECURRENT (one
``lax.scan`` over time on the whole ``[B, H]`` state, differentiated by autodiff). There is no
chunkwise form: the keys, values and write strengths of step t depend on the output of step
t − 1 through a tanh and a softmax, so the steps of a chunk cannot be computed before the
previous step's read (CHUNKED and PALLAS raise).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fwjax.ops.common import HIGHEST
from fwjax.ops.impl import Impl, resolve_scale, state_dtype


class RecurrentDeltaState(NamedTuple):
    """The carried state: fast weights ``W [B, H, D, D]`` and the previous unscaled output
    ``y [B, H, D]``."""

    fast_weights: jax.Array
    output: jax.Array


class RecurrentWeights(NamedTuple):
    """The recurrent (slow) weights: ``R_q, R_k, R_v [H, D, D]`` (input index first: the
    recurrent part of ``q`` is ``r @ R_q``) and ``r_b [H, D]``."""

    r_q: jax.Array
    r_k: jax.Array
    r_v: jax.Array
    r_b: jax.Array


def _step(weights: RecurrentWeights, precision, carry, inputs):
    """One step for the ``[B, H]`` batch (or one head when the leading axes are absent)."""
    w, y = carry
    qx, kx, vx, bx = inputs
    r = jnp.tanh(y)
    rec = lambda m: jnp.einsum("...d,...de->...e", r, m, precision=precision)
    q = jax.nn.softmax(qx + rec(weights.r_q), axis=-1)
    k = jax.nn.softmax(kx + rec(weights.r_k), axis=-1)
    v = vx + rec(weights.r_v)
    beta = jax.nn.sigmoid(bx + jnp.sum(r * weights.r_b, axis=-1))
    v_bar = jnp.einsum("...k,...kv->...v", k, w, precision=precision)  # W_{t-1}ᵀ k_t
    w = w + beta[..., None, None] * k[..., :, None] * (v - v_bar)[..., None, :]
    y = jnp.einsum("...k,...kv->...v", q, w, precision=precision)  # W_tᵀ q_t
    return (w, y), y


def _reference(qx, kx, vx, bx, weights, state, scale):
    """One head at a time (``jax.vmap`` over B and H), highest precision."""

    def one_head(qx, kx, vx, bx, r_q, r_k, r_v, r_b, w0, y0):
        step = functools.partial(_step, RecurrentWeights(r_q, r_k, r_v, r_b), HIGHEST)
        (w, y), ys = jax.lax.scan(step, (w0, y0), (qx, kx, vx, bx))
        return ys, w, y

    per_head = jax.vmap(one_head, in_axes=(1, 1, 1, 1, 0, 0, 0, 0, 0, 0), out_axes=(1, 0, 0))
    per_batch = jax.vmap(per_head, in_axes=(0, 0, 0, 0, None, None, None, None, 0, 0))
    ys, w, y = per_batch(qx, kx, vx, bx, *weights, state.fast_weights, state.output)
    return scale * ys, RecurrentDeltaState(w, y)


def _recurrent(qx, kx, vx, bx, weights, state, scale):
    """One ``lax.scan`` over time on the ``[B, H]`` state."""
    step = functools.partial(_step, weights, None)
    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (qx, kx, vx, bx))
    (w, y), ys = jax.lax.scan(step, tuple(state), xs)
    return scale * jnp.moveaxis(ys, 0, 1), RecurrentDeltaState(w, y)


_FORMS = {Impl.REFERENCE: _reference, Impl.RECURRENT: _recurrent}


@functools.partial(jax.jit, static_argnames=("impl",))
def recurrent_delta_rule(
    qx: jax.Array,
    kx: jax.Array,
    vx: jax.Array,
    bx: jax.Array,
    weights: RecurrentWeights,
    state: RecurrentDeltaState | None = None,
    scale=1.0,
    impl: Impl | str = Impl.AUTO,
) -> tuple[jax.Array, RecurrentDeltaState]:
    """The Recurrent Delta Net's fast weight memory (equations in the module docstring).

    Args:
      qx, kx, vx: the feed-forward parts of queries, keys and values ``[B, T, H, D]``.
      bx: the feed-forward part of the write-strength logits ``[B, T, H]``.
      weights: the :class:`RecurrentWeights` (``[H, D, D]`` and ``[H, D]``).
      state: a carried :class:`RecurrentDeltaState`; None: zeros.
      scale: output scale; None: ``D ** -0.5``.
      impl: REFERENCE or RECURRENT (AUTO: RECURRENT); CHUNKED and PALLAS do not exist for this
        rule.

    Returns:
      ``(o [B, T, H, D], RecurrentDeltaState)``; outputs in the inputs' promoted dtype, the
      state and all accumulation in at least float32.
    """
    qx, kx, vx, bx = (jnp.asarray(x) for x in (qx, kx, vx, bx))
    if qx.ndim != 4 or qx.shape != kx.shape or qx.shape != vx.shape or bx.shape != qx.shape[:3]:
        raise ValueError(
            f"qx, kx, vx must be [B, T, H, D] and bx [B, T, H]; got {qx.shape=}, {kx.shape=}, "
            f"{vx.shape=}, {bx.shape=}"
        )
    b, _, h, d = qx.shape
    for name, x, shape in zip(
        RecurrentWeights._fields, weights, ((h, d, d),) * 3 + ((h, d),), strict=True
    ):
        if x.shape != shape:
            raise ValueError(f"weights.{name} must have shape {shape}; got {x.shape}")
    impl = Impl(impl)
    if impl is Impl.AUTO:
        impl = Impl.RECURRENT
    if impl not in _FORMS:
        raise ValueError(
            f"{impl=} does not exist for the Recurrent Delta Net: its keys depend on the previous "
            "step's output, so there is no chunkwise form (use REFERENCE or RECURRENT)"
        )
    out_dtype = jnp.result_type(qx, kx, vx)
    dtype = state_dtype(qx.dtype, bx.dtype, *(w.dtype for w in weights))
    if state is None:
        state = RecurrentDeltaState(jnp.zeros((b, h, d, d), dtype), jnp.zeros((b, h, d), dtype))
    dtype = jnp.promote_types(dtype, state.fast_weights.dtype)
    cast = lambda x: x.astype(dtype)
    state = RecurrentDeltaState(*(cast(x) for x in state))
    weights = RecurrentWeights(*(cast(x) for x in weights))
    out, state = _FORMS[impl](
        *(cast(x) for x in (qx, kx, vx, bx)), weights, state, resolve_scale(scale, d)
    )
    return out.astype(out_dtype), state


def recurrent_delta_step(qx_t, kx_t, vx_t, bx_t, weights, state, scale=1.0):
    """One step for every batch element and head (the decode path): inputs ``[B, H, D]`` and
    ``bx_t [B, H]``; returns ``(o_t [B, H, D], RecurrentDeltaState)``."""
    step = functools.partial(_step, weights, None)
    (w, y), y_t = step(tuple(state), (qx_t, kx_t, vx_t, bx_t))
    return resolve_scale(scale, qx_t.shape[-1]) * y_t, RecurrentDeltaState(w, y)


__all__ = [
    "RecurrentDeltaState",
    "RecurrentWeights",
    "recurrent_delta_rule",
    "recurrent_delta_step",
]
