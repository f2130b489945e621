"""Gated delta rule, REFERENCE form: the literal step-by-step equations of one head, vmapped.

The oracle of the parity suite: no algebraic rewriting, highest matmul precision, computed in the
state dtype (at least float32; float64 under ``jax_enable_x64``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fwjax.ops.common import HIGHEST, no_starts, per_head


def _one_head(q, k, v, beta, alpha, starts, s0):
    """q, k: [T, K]; v: [T, V]; beta, alpha, starts: [T]; s0: [K, V] -> (o: [T, V], S_T)."""

    def step(s, inputs):
        q_t, k_t, v_t, beta_t, alpha_t, start_t = inputs
        s = jnp.where(start_t != 0, 0.0, s)  # a document start empties the memory
        # S_t = α_t (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ, literally.
        eye = jnp.eye(k_t.shape[0], dtype=s.dtype)
        erase = eye - beta_t * jnp.outer(k_t, k_t)
        s = alpha_t * jnp.matmul(erase, s, precision=HIGHEST) + beta_t * jnp.outer(k_t, v_t)
        o_t = jnp.matmul(s.T, q_t, precision=HIGHEST)  # o_t = S_tᵀ q_t (state after step t)
        return s, o_t

    s_final, o = jax.lax.scan(step, s0, (q, k, v, beta, alpha, starts))
    return o, s_final


def gated_delta_rule_reference(q, k, v, gates, initial_state, scale, options):
    """See :func:`fwjax.ops.gated_delta_rule`; ``options`` are unused."""
    gates = (*gates, no_starts(k))
    return gated_delta_rule_reference_packed(q, k, v, gates, initial_state, scale, options)


def gated_delta_rule_reference_packed(q, k, v, gates, initial_state, scale, options):
    """The REFERENCE form on packed rows: ``gates = (β, α, starts)``."""
    del options
    return per_head(_one_head, q, k, v, gates, initial_state, scale)
