"""Delta rule, RECURRENT form: a ``lax.scan`` over time on the whole ``[B, H, K, V]`` state.

Also provides the single-step update used for decoding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def delta_rule_step(q_t, k_t, v_t, beta_t, state, scale=1.0):
    """One delta rule step for every batch element and head (the decode path).

    ``v̄ = Sᵀk``, ``S' = S + β k (v − v̄)ᵀ``, ``o = scale · S'ᵀ q``.

    Args:
      q_t, k_t: ``[B, H, K]``.
      v_t: ``[B, H, V]``.
      beta_t: ``[B, H]``.
      state: ``[B, H, K, V]``; its dtype is the compute dtype.
      scale: output scale.

    Returns:
      ``(o_t: [B, H, V], new_state: [B, H, K, V])``; ``o_t`` in the state dtype.
    """
    dtype = state.dtype
    q_t, k_t, v_t, beta_t = (x.astype(dtype) for x in (q_t, k_t, v_t, beta_t))
    v_bar = jnp.einsum("bhk,bhkv->bhv", k_t, state)
    u = beta_t[..., None] * (v_t - v_bar)  # the written value u_t = β_t (v_t − v̄_t)
    state = state + k_t[..., :, None] * u[..., None, :]
    o_t = scale * jnp.einsum("bhk,bhkv->bhv", q_t, state)
    return o_t, state


def delta_rule_recurrent(q, k, v, beta, initial_state, scale, chunk_size):
    """See :func:`fwjax.ops.delta_rule`. ``chunk_size`` is unused."""
    del chunk_size

    def step(state, inputs):
        q_t, k_t, v_t, beta_t = inputs
        o_t, state = delta_rule_step(q_t, k_t, v_t, beta_t, state, scale)
        return state, o_t

    time_major = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, beta))
    state, o = jax.lax.scan(step, initial_state, time_major)
    return jnp.moveaxis(o, 0, 1), state
