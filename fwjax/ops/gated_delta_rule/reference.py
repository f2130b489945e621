"""Gated delta rule, REFERENCE form: the literal step-by-step equations of one head, vmapped.

The oracle of the parity suite: no algebraic rewriting, highest matmul precision, computed in the
state dtype (at least float32; float64 under ``jax_enable_x64``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def _one_head(q, k, v, beta, alpha, s0):
    """q, k: [T, K]; v: [T, V]; beta, alpha: [T]; s0: [K, V] -> (o: [T, V], S_T: [K, V])."""

    def step(s, inputs):
        q_t, k_t, v_t, beta_t, alpha_t = inputs
        # S_t = α_t (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ, literally.
        eye = jnp.eye(k_t.shape[0], dtype=s.dtype)
        erase = eye - beta_t * jnp.outer(k_t, k_t)
        s = alpha_t * jnp.matmul(erase, s, precision=_HIGHEST) + beta_t * jnp.outer(k_t, v_t)
        o_t = jnp.matmul(s.T, q_t, precision=_HIGHEST)  # o_t = S_tᵀ q_t (state after step t)
        return s, o_t

    s_final, o = jax.lax.scan(step, s0, (q, k, v, beta, alpha))
    return o, s_final


def gated_delta_rule_reference(q, k, v, beta, alpha, initial_state, scale, chunk_size):
    """See :func:`fwjax.ops.gated_delta_rule`. ``chunk_size`` is unused."""
    del chunk_size
    dtype = initial_state.dtype
    q, k, v, beta, alpha = (x.astype(dtype) for x in (q, k, v, beta, alpha))
    # [B, T, H, .] -> vmap over B (axis 0) and H (axis 2 of the inputs, axis 1 of the state).
    per_head = jax.vmap(_one_head, in_axes=(1, 1, 1, 1, 1, 0), out_axes=(1, 0))
    per_batch = jax.vmap(per_head, in_axes=(0, 0, 0, 0, 0, 0), out_axes=(0, 0))
    o, s = per_batch(q, k, v, beta, alpha, initial_state)
    return scale * o, s
