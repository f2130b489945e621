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

import jax
import jax.numpy as jnp

from fwjax.ops.common import from_chunks, scaled_inputs, to_chunks
from fwjax.ops.impl import resolve_scale


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
    t = q.shape[1]
    c = min(options.remat_block, t)
    beta, alpha = gates
    # Padded steps (zero key, β = 0, α = 1) leave the state unchanged.
    alpha = jnp.pad(alpha, [(0, 0), (0, -t % c), (0, 0)], constant_values=1.0)
    blocks = scaled_inputs(q, k, v, (beta, alpha), initial_state, 1.0)
    # Time-major inside a block: [N, C, B, H, .].
    blocks = [jnp.moveaxis(to_chunks(x, c), 3, 1) for x in blocks]

    @jax.checkpoint
    def block(s, xs):
        def step(s, inputs):
            o_t, s = _step(*inputs, s)
            return s, o_t

        return jax.lax.scan(step, s, xs)

    s, o = jax.lax.scan(block, initial_state, tuple(blocks))
    o = jnp.moveaxis(o, 1, 3)  # [N, B, H, C, V]
    return scale * from_chunks(o, t), s
