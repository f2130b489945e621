"""Sum rule, RECURRENT form: a ``lax.scan`` over time on the ``[B, H, K, V]`` state."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sum_rule_step(q_t, k_t, v_t, state, scale=1.0):
    """One sum rule step for every batch element and head (the decode path).

    ``S' = S + k vᵀ``, ``o = scale · S'ᵀ q``.

    Args:
      q_t, k_t: ``[B, H, K]``.
      v_t: ``[B, H, V]``.
      state: ``[B, H, K, V]``; its dtype is the compute dtype.
      scale: output scale.

    Returns:
      ``(o_t: [B, H, V], new_state: [B, H, K, V])``; ``o_t`` in the state dtype.
    """
    dtype = state.dtype
    q_t, k_t, v_t = (x.astype(dtype) for x in (q_t, k_t, v_t))
    state = state + k_t[..., :, None] * v_t[..., None, :]
    o_t = scale * jnp.einsum("bhk,bhkv->bhv", q_t, state)
    return o_t, state


def sum_rule_recurrent(q, k, v, initial_state, scale, chunk_size):
    """See :func:`fwjax.ops.sum_rule`. ``chunk_size`` is unused."""
    del chunk_size

    def step(state, inputs):
        q_t, k_t, v_t = inputs
        o_t, state = sum_rule_step(q_t, k_t, v_t, state, scale)
        return state, o_t

    time_major = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v))
    state, o = jax.lax.scan(step, initial_state, time_major)
    return jnp.moveaxis(o, 0, 1), state
