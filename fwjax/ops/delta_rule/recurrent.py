"""Delta rule, RECURRENT form: a ``lax.scan`` over time on the whole ``[B, H, K, V]`` state,
with a hand-written, memory-lean backward pass.

Forward per step (row convention)::

    v̄_t = S_{t-1}ᵀ k_t,   u_t = β_t (v_t − v̄_t),   S_t = S_{t-1} + k_t u_tᵀ,   o_t = S_tᵀ q_t

The forward pass stores only the written values ``u_t`` (``[T, B, H, V]``, the size of ``v``)
and the final state. The backward pass walks time in reverse, rebuilding
``S_{t-1} = S_t − k_t u_tᵀ`` (the trick of the paper's official CUDA kernel), so memory is
``O(T·V + K·V)`` per head instead of the ``O(T·K·V)`` of autodiff through the scan. The
rebuilt states subtract exactly the stored increments, so reconstruction error grows only
additively (measured at T=8192 in benchmarks/README.md).

Backward per step, writing ``dX`` for ∂L/∂X and ``G = dS_t`` accumulated from later steps::

    G   += q_t do_tᵀ              dq_t = S_t do_t
    du   = Gᵀ k_t                 dv_t = β_t du,    dβ_t = du·(v_t − v̄_t)
    dv̄   = −dv_t                  dk_t = G u_t + S_{t-1} dv̄
    G   += k_t dv̄ᵀ                (G is now dS_{t-1})
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fwjax.ops.common import blocked_recurrence, in_time_major, scaled_inputs
from fwjax.ops.impl import resolve_scale
from fwjax.ops.segments import reset


def delta_rule_step(q_t, k_t, v_t, beta_t, state, scale=1.0):
    """One delta rule step for every batch element and head (the decode path).

    ``v̄ = Sᵀk``, ``S' = S + β k (v − v̄)ᵀ``, ``o = scale · S'ᵀ q``.

    Args:
      q_t, k_t: ``[B, H, K]``.
      v_t: ``[B, H, V]``.
      beta_t: ``[B, H]``.
      state: ``[B, H, K, V]``; its dtype is the compute dtype.
      scale: output scale; None: ``K ** -0.5``.

    Returns:
      ``(o_t: [B, H, V], new_state: [B, H, K, V])``; ``o_t`` in the state dtype.
    """
    dtype = state.dtype
    q_t, k_t, v_t, beta_t = (x.astype(dtype) for x in (q_t, k_t, v_t, beta_t))
    _, state, _ = _step(q_t, k_t, v_t, beta_t, state)
    o_t = resolve_scale(scale, k_t.shape[-1]) * jnp.einsum("bhk,bhkv->bhv", q_t, state)
    return o_t, state


def _step(q_t, k_t, v_t, beta_t, s):
    v_bar = jnp.einsum("bhk,bhkv->bhv", k_t, s)  # retrieve with the old state
    u = beta_t[..., None] * (v_t - v_bar)  # the written value u_t = β_t (v_t − v̄_t)
    s = s + k_t[..., :, None] * u[..., None, :]
    o_t = jnp.einsum("bhk,bhkv->bhv", q_t, s)  # read with the new state
    return o_t, s, u


def _scan_forward(q, k, v, beta, s0):
    def step(s, inputs):
        o_t, s, u = _step(*inputs, s)
        return s, (o_t, u)

    s, (o, u) = jax.lax.scan(step, s0, (q, k, v, beta))
    return o, s, u


@jax.custom_vjp
def _delta_scan(q, k, v, beta, s0):
    """Time-major ``[T, B, H, .]`` inputs in the compute dtype -> (o [T, B, H, V], S_T)."""
    o, s, _ = _scan_forward(q, k, v, beta, s0)
    return o, s


def _delta_scan_fwd(q, k, v, beta, s0):
    o, s, u = _scan_forward(q, k, v, beta, s0)
    return (o, s), (q, k, v, beta, u, s)


def _delta_scan_bwd(residuals, cotangents):
    q, k, v, beta, u, s_final = residuals
    d_o, d_s_final = cotangents

    def step(carry, inputs):
        s, g = carry  # S_t and ∂L/∂S_t from steps after t
        q_t, k_t, v_t, beta_t, u_t, do_t = inputs
        g = g + q_t[..., :, None] * do_t[..., None, :]  # o_t = S_tᵀ q_t
        dq_t = jnp.einsum("bhkv,bhv->bhk", s, do_t)
        s_prev = s - k_t[..., :, None] * u_t[..., None, :]  # rebuild S_{t-1}
        du = jnp.einsum("bhkv,bhk->bhv", g, k_t)
        v_bar = jnp.einsum("bhk,bhkv->bhv", k_t, s_prev)
        d_beta = jnp.sum(du * (v_t - v_bar), axis=-1)
        dv_t = beta_t[..., None] * du
        # v̄_t = S_{t-1}ᵀ k_t receives −dv_t.
        dk_t = jnp.einsum("bhkv,bhv->bhk", g, u_t) - jnp.einsum("bhkv,bhv->bhk", s_prev, dv_t)
        g = g - k_t[..., :, None] * dv_t[..., None, :]
        return (s_prev, g), (dq_t, dk_t, dv_t, d_beta)

    (_, d_s0), (dq, dk, dv, d_beta) = jax.lax.scan(
        step, (s_final, d_s_final), (q, k, v, beta, u, d_o), reverse=True
    )
    return dq, dk, dv, d_beta, d_s0


_delta_scan.defvjp(_delta_scan_fwd, _delta_scan_bwd)


def delta_rule_recurrent(q, k, v, gates, initial_state, scale, options):
    """See :func:`fwjax.ops.delta_rule`; ``options`` are unused."""
    del options
    o, state = _delta_scan(*in_time_major(q, k, v, gates, initial_state, scale), initial_state)
    return jnp.moveaxis(o, 0, 1), state


def _packed_step(q_t, k_t, v_t, beta_t, start_t, s):
    o_t, s, _ = _step(q_t, k_t, v_t, beta_t, reset(s, start_t))
    return o_t, s


def delta_rule_recurrent_packed(q, k, v, gates, initial_state, scale, options):
    """The RECURRENT form on packed rows: ``gates = (β, starts)``; the memory is emptied before
    each document's first step (:mod:`fwjax.ops.segments`). A start discards the state, so
    the backward pass cannot rebuild the states before it from the states after it; it keeps
    one state per ``options.remat_block`` steps and recomputes the rest instead
    (:func:`~fwjax.ops.common.blocked_recurrence`)."""
    xs = scaled_inputs(q, k, v, gates, initial_state, scale)
    return blocked_recurrence(_packed_step, xs, (0,) * 5, initial_state, options.remat_block)
