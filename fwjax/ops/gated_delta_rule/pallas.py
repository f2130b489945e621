"""Gated delta rule, PALLAS form: the gated chunked form
(:mod:`fwjax.ops.gated_delta_rule.chunked`) with its sequential phase 2 as a Pallas chunk-scan
kernel (:mod:`fwjax.ops.pallas.rule_kernel`): the delta rule's step plus a per-chunk decay.

Phase 1 (XLA, :func:`~fwjax.ops.gated_delta_rule.chunked.gated_terms`), with
``g = cumsum(log α)``, ``Γ = exp(g)``, ``D_tj = Γ_t/Γ_j`` (j ≤ t)::

    T = (I + tril(diag(β) K Kᵀ ⊙ D, −1))⁻¹
    W = T diag(βΓ) K,  U = T diag(β) V,  P = Q Kᵀ ⊙ D,  Q' = diag(Γ) Q,  K' = diag(Γ_C/Γ) K

then per chunk (kernel, state tile on chip): ``Ũ = U − W S``, ``O = Q' S + P Ũ``,
``S ← Γ_C S + K'ᵀ Ũ``.

Backward (``PallasBackward.KERNEL``): a reverse kernel over the chunks
(:func:`~fwjax.ops.pallas.chunk_math.gated_delta_backward`: the delta rule's chunk VJP with the
decayed terms, plus ``Γ̄_C = Σ S ⊙ G`` and ``G ← Γ_C G + …``), then phase 1's VJP in XLA;
``PallasBackward.XLA`` runs the reverse chunk scan of the CHUNKED form's VJP
(:func:`~fwjax.ops.gated_delta_rule.chunked.gated_chunks_bwd`) on the kernel-saved states.
Packed rows always take the XLA backward.
"""

from __future__ import annotations

import jax.numpy as jnp

from fwjax.ops.gated_delta_rule.chunked import gated_chunks_bwd, gated_terms
from fwjax.ops.pallas import chunk_math as cm
from fwjax.ops.pallas.rule_kernel import (
    DECAY_OPERANDS,
    DECAYS,
    KernelRule,
    packed_kernel_rule,
    pallas_form,
)


def _phase1(q, k, v, beta, log_alpha):
    """Kernel layout ``[B, H, N, C, .]``: ``(Q', K', W, U, P, decay)``, the chunk decay ``Γ_C``
    one value per chunk ``[B, H, N, 1, 1]`` (``Kind.CHUNK_SCALAR``)."""
    *terms, chunk_decay = gated_terms(q, k, v, beta, log_alpha)
    return (*terms, chunk_decay[..., None, None])


KERNEL = KernelRule(
    name="gated_delta_rule",
    phase1=_phase1,
    operands=DECAY_OPERANDS,  # Q', K', W, U, P and Γ_C
    forward=cm.gated_delta_forward,
    backward=cm.gated_delta_backward,
    xla_backward=gated_chunks_bwd,
    exact_operands=DECAYS,  # Γ_C in float32 whatever the inputs' dtype
    phased=True,
)
_form = pallas_form(KERNEL)


def gated_delta_rule_pallas(q, k, v, gates, initial_state, scale, options):
    """See :func:`fwjax.ops.gated_delta_rule` (``Impl.PALLAS``). The kernel takes ``log α``,
    whose zero padding is the no-op α = 1."""
    beta, alpha = gates
    log_alpha = jnp.log(alpha.astype(initial_state.dtype))
    return _form(q, k, v, (beta, log_alpha), initial_state, scale, options)


_packed_form = pallas_form(packed_kernel_rule("gated_delta_rule", tuple))


def gated_delta_rule_pallas_packed(q, k, v, gates, initial_state, scale, options):
    """The PALLAS form on packed rows, ``gates = (β, α, starts)``
    (:func:`~fwjax.ops.pallas.rule_kernel.packed_kernel_rule`)."""
    beta, alpha, starts = gates
    log_alpha = jnp.log(alpha.astype(initial_state.dtype))
    return _packed_form(q, k, v, (beta, log_alpha, starts), initial_state, scale, options)
