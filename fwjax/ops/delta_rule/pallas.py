"""Delta rule, PALLAS form: the chunked form (:mod:`fwjax.ops.delta_rule.chunked`) with its
sequential phase 2 as a Pallas kernel (:mod:`fwjax.ops.pallas.rule_kernel`).

Phase 1 (XLA) gives ``W, U, P``; per chunk the kernel computes ``Ũ = U − W S``,
``O = Q S + P Ũ``, ``S ← S + Kᵀ Ũ``. Its backward kernel walks the chunks in reverse with the
state cotangent on chip (equations in :mod:`fwjax.ops.pallas.chunk_math`), then phase 1's VJP
runs in XLA; ``PallasBackward.XLA`` runs :func:`~fwjax.ops.delta_rule.chunked.delta_chunks_bwd`
on the kernel-saved states instead.
"""

from __future__ import annotations

import functools

from fwjax.ops.delta_rule.chunked import delta_chunks_bwd, delta_wy_terms
from fwjax.ops.pallas import chunk_math as cm
from fwjax.ops.pallas.rule_kernel import (
    DELTA_OPERANDS,
    KernelRule,
    packed_kernel_rule,
    pallas_form,
)

# The kernels' operands: Q, K and the phase-1 terms W, U, P.
OPERANDS = DELTA_OPERANDS
KERNEL = KernelRule(
    name="delta_rule",
    phase1=lambda q, k, v, beta: (q, k, *delta_wy_terms(q, k, v, beta)),
    operands=OPERANDS,
    forward=cm.delta_forward,
    backward=cm.delta_backward,
    xla_backward=functools.partial(delta_chunks_bwd, False, 1),
    phased=True,
)

delta_rule_pallas = pallas_form(KERNEL)


def _arrange_packed(xs):
    q, k, v, beta, starts = xs
    return q, k, v, beta, None, starts


# Packed rows (``gates = (β, starts)``):
# :func:`~fwjax.ops.pallas.rule_kernel.packed_kernel_rule`.
delta_rule_pallas_packed = pallas_form(packed_kernel_rule("delta_rule", _arrange_packed))
