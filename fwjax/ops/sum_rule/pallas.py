"""Sum rule, PALLAS form: the chunked form (:mod:`fwjax.ops.sum_rule.chunked`) as one Pallas
kernel per direction (:mod:`fwjax.ops.pallas.rule_kernel`), with no phase 1.

Per chunk the kernel computes ``O = Q S + (Q Kᵀ ⊙ M) V``, ``S ← S + Kᵀ V``; its backward kernel
walks the chunks in reverse with the state cotangent on chip (equations in
:mod:`fwjax.ops.pallas.chunk_math`); ``PallasBackward.XLA`` runs
:func:`~fwjax.ops.sum_rule.chunked.sum_chunks_bwd` on the kernel-saved states instead.
"""

from __future__ import annotations

from fwjax.ops.pallas import chunk_math as cm
from fwjax.ops.pallas.rule_kernel import KernelRule, packed_kernel_rule, pallas_form
from fwjax.ops.pallas.scan_spec import Kind
from fwjax.ops.sum_rule.chunked import sum_chunks_bwd

KERNEL = KernelRule(
    name="sum_rule",
    phase1=lambda q, k, v: (q, k, v),
    operands=(("q", Kind.SEQ_KEY), ("k", Kind.SEQ_KEY), ("v", Kind.SEQ_VALUE)),
    forward=cm.sum_forward,
    backward=cm.sum_backward,
    xla_backward=sum_chunks_bwd,
)

sum_rule_pallas = pallas_form(KERNEL)


def _arrange_packed(xs):
    q, k, v, starts = xs
    return q, k, v, None, None, starts


# Packed rows (``gates = (starts,)``):
# :func:`~fwjax.ops.pallas.rule_kernel.packed_kernel_rule`.
sum_rule_pallas_packed = pallas_form(packed_kernel_rule("sum_rule", _arrange_packed))
