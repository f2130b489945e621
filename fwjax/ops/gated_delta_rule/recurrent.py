"""Gated delta rule, RECURRENT form: a ``lax.scan`` over time on the ``[B, H, K, V]`` state.

Per step (row convention), the gated rule ``S_t = α_t (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ``
rewritten with one retrieval and one rank-1 write::

    u_t = β_t (v_t − α_t S_{t-1}ᵀ k_t),   S_t = α_t S_{t-1} + k_t u_tᵀ,   o_t = S_tᵀ q_t

Memory of the backward pass: the delta rule's trick of rebuilding ``S_{t-1}`` from ``S_t`` would
divide by ``α_t`` (unstable for small gates), so instead time is split into blocks of
``remat_block`` steps and each block's scan is rematerialised (``jax.checkpoint``): the forward
pass keeps one state per block, the backward pass recomputes a block's states from it.
``O(T/C · K·V + C · K·V)`` per head instead of autodiff's ``O(T · K·V)``.
"""

from __future__ import annotations

import jax.numpy as jnp

from fwjax.ops.common import blocked_recurrence, scaled_inputs
from fwjax.ops.impl import resolve_scale
from fwjax.ops.segments import reset


def _step(q_t, k_t, v_t, beta_t, alpha_t, s):
    """One step on ``[B, H, .]`` slices; returns ``(o_t, S_t)``."""
    v_bar = jnp.einsum("bhk,bhkv->bhv", k_t, s)  # S_{t-1}ᵀ k_t
    a = alpha_t[..., None]
    u = beta_t[..., None] * (v_t - a * v_bar)  # u_t = β_t (v_t − α_t S_{t-1}ᵀ k_t)
    s = a[..., None] * s + k_t[..., :, None] * u[..., None, :]  # S_t = α_t S_{t-1} + k_t u_tᵀ
    return jnp.einsum("bhk,bhkv->bhv", q_t, s), s


def gated_delta_rule_step(q_t, k_t, v_t, beta_t, alpha_t, state, scale=1.0):
    """One gated delta rule step for every batch element and head (the decode path).

    ``S' = α (I − β k kᵀ) S + β k vᵀ``, ``o = scale · S'ᵀ q``.

    Args:
      q_t, k_t: ``[B, H, K]``.
      v_t: ``[B, H, V]``.
      beta_t, alpha_t: ``[B, H]``.
      state: ``[B, H, K, V]``; its dtype is the compute dtype.
      scale: output scale; None: ``K ** -0.5``.

    Returns:
      ``(o_t: [B, H, V], new_state: [B, H, K, V])``; ``o_t`` in the state dtype.
    """
    dtype = state.dtype
    args = (x.astype(dtype) for x in (q_t, k_t, v_t, beta_t, alpha_t))
    o_t, state = _step(*args, state)
    return resolve_scale(scale, k_t.shape[-1]) * o_t, state


def gated_delta_rule_recurrent(q, k, v, gates, initial_state, scale, options):
    """See :func:`fwjax.ops.gated_delta_rule`. ``options.remat_block``: the steps per
    rematerialised block."""
    xs = scaled_inputs(q, k, v, gates, initial_state, 1.0)
    # Padded steps (zero key, β = 0, α = 1) leave the state unchanged.
    o, s = blocked_recurrence(_step, xs, (0, 0, 0, 0, 1), initial_state, options.remat_block)
    return scale * o, s


def _packed_step(q_t, k_t, v_t, beta_t, alpha_t, start_t, s):
    return _step(q_t, k_t, v_t, beta_t, alpha_t, reset(s, start_t))


def gated_delta_rule_recurrent_packed(q, k, v, gates, initial_state, scale, options):
    """The RECURRENT form on packed rows: ``gates = (β, α, starts)``; the memory is emptied
    before each document's first step (:mod:`fwjax.ops.segments`)."""
    xs = scaled_inputs(q, k, v, gates, initial_state, 1.0)
    fills = (0, 0, 0, 0, 1, 0)
    o, s = blocked_recurrence(_packed_step, xs, fills, initial_state, options.remat_block)
    return scale * o, s
