"""Sum rule, RECURRENT form: a ``lax.scan`` over time on the ``[B, H, K, V]`` state, with a
hand-written backward pass that rebuilds ``S_{t-1} = S_t − k_t v_tᵀ`` in a reverse scan, so
nothing but the inputs and the final state is stored (autodiff would store every ``S_t``).

Backward per step, with ``G = ∂L/∂S_t``: ``G += q_t ōᵀ``, ``q̄_t = S_t ō_t``, ``k̄_t = G v_t``,
``v̄_t = Gᵀ k_t``; ``G`` carries over unchanged to ``S_{t-1}``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fwjax.ops.common import blocked_recurrence, in_time_major, scaled_inputs
from fwjax.ops.impl import resolve_scale
from fwjax.ops.segments import reset


def sum_rule_step(q_t, k_t, v_t, state, scale=1.0):
    """One sum rule step for every batch element and head (the decode path).

    ``S' = S + k vᵀ``, ``o = scale · S'ᵀ q``.

    Args:
      q_t, k_t: ``[B, H, K]``.
      v_t: ``[B, H, V]``.
      state: ``[B, H, K, V]``; its dtype is the compute dtype.
      scale: output scale; None: ``K ** -0.5``.

    Returns:
      ``(o_t: [B, H, V], new_state: [B, H, K, V])``; ``o_t`` in the state dtype.
    """
    dtype = state.dtype
    q_t, k_t, v_t = (x.astype(dtype) for x in (q_t, k_t, v_t))
    o_t, state = _step(q_t, k_t, v_t, state)
    return resolve_scale(scale, k_t.shape[-1]) * o_t, state


def _step(q_t, k_t, v_t, s):
    s = s + k_t[..., :, None] * v_t[..., None, :]
    return jnp.einsum("bhk,bhkv->bhv", q_t, s), s


def _scan_forward(q, k, v, s0):
    def step(s, inputs):
        o_t, s = _step(*inputs, s)
        return s, o_t

    s, o = jax.lax.scan(step, s0, (q, k, v))
    return o, s


@jax.custom_vjp
def _sum_scan(q, k, v, s0):
    """Time-major ``[T, B, H, .]`` inputs in the compute dtype -> (o [T, B, H, V], S_T)."""
    return _scan_forward(q, k, v, s0)


def _sum_scan_fwd(q, k, v, s0):
    o, s = _scan_forward(q, k, v, s0)
    return (o, s), (q, k, v, s)


def _sum_scan_bwd(residuals, cotangents):
    q, k, v, s_final = residuals
    d_o, d_s_final = cotangents

    def step(carry, inputs):
        s, g = carry
        q_t, k_t, v_t, do_t = inputs
        g = g + q_t[..., :, None] * do_t[..., None, :]
        dq_t = jnp.einsum("bhkv,bhv->bhk", s, do_t)
        dk_t = jnp.einsum("bhkv,bhv->bhk", g, v_t)
        dv_t = jnp.einsum("bhkv,bhk->bhv", g, k_t)
        s_prev = s - k_t[..., :, None] * v_t[..., None, :]
        return (s_prev, g), (dq_t, dk_t, dv_t)

    (_, d_s0), (dq, dk, dv) = jax.lax.scan(step, (s_final, d_s_final), (q, k, v, d_o), reverse=True)
    return dq, dk, dv, d_s0


_sum_scan.defvjp(_sum_scan_fwd, _sum_scan_bwd)


def sum_rule_recurrent(q, k, v, gates, initial_state, scale, options):
    """See :func:`fwjax.ops.sum_rule`; ``options`` are unused."""
    del options
    o, state = _sum_scan(*in_time_major(q, k, v, gates, initial_state, scale), initial_state)
    return jnp.moveaxis(o, 0, 1), state


def _packed_step(q_t, k_t, v_t, start_t, s):
    return _step(q_t, k_t, v_t, reset(s, start_t))


def sum_rule_recurrent_packed(q, k, v, gates, initial_state, scale, options):
    """The RECURRENT form on packed rows: ``gates = (starts,)``; the memory is emptied before
    each document's first step (:mod:`fwjax.ops.segments`); the backward pass keeps one state
    per ``options.remat_block`` steps (a start discards the state, so the reverse scan cannot
    rebuild the states before it)."""
    xs = scaled_inputs(q, k, v, gates, initial_state, scale)
    return blocked_recurrence(_packed_step, xs, (0,) * 4, initial_state, options.remat_block)
