"""Delta rule, REFERENCE form: the literal step-by-step equations of one head, vmapped.

The oracle of the parity suite: no algebraic rewriting, highest matmul precision, computed in the
state dtype (at least float32; float64 under ``jax_enable_x64``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fwjax.ops.common import HIGHEST, no_starts, per_head


def _one_head(q, k, v, beta, starts, s0):
    """q, k: [T, K]; v: [T, V]; beta, starts: [T]; s0: [K, V] -> (o: [T, V], S_T: [K, V])."""

    def step(s, inputs):
        q_t, k_t, v_t, beta_t, start_t = inputs
        s = jnp.where(start_t != 0, 0.0, s)  # a document start empties the memory
        v_bar = jnp.matmul(s.T, k_t, precision=HIGHEST)  # v̄_t = S_{t-1}ᵀ k_t
        s = s + beta_t * jnp.outer(k_t, v_t - v_bar)  # S_t = S_{t-1} + β_t k_t (v_t − v̄_t)ᵀ
        o_t = jnp.matmul(s.T, q_t, precision=HIGHEST)  # o_t = S_tᵀ q_t (state after step t)
        return s, o_t

    s_final, o = jax.lax.scan(step, s0, (q, k, v, beta, starts))
    return o, s_final


def delta_rule_reference(q, k, v, gates, initial_state, scale, options):
    """See :func:`fwjax.ops.delta_rule`; ``options`` are unused."""
    return delta_rule_reference_packed(
        q, k, v, (*gates, no_starts(k)), initial_state, scale, options
    )


def delta_rule_reference_packed(q, k, v, gates, initial_state, scale, options):
    """The REFERENCE form on packed rows: ``gates = (β, starts)``."""
    del options
    return per_head(_one_head, q, k, v, gates, initial_state, scale)
