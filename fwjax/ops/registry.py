"""The rule registry: every fast weight rule as one table of forms, and the one dispatcher that
validates, resolves the options and calls a form (:func:`run_rule`).

Each public op (:func:`fwjax.ops.delta_rule`, :func:`fwjax.ops.sum_rule`,
:func:`fwjax.ops.gated_delta_rule`) is :func:`run_rule` on its :class:`Rule`; every
:class:`~fwjax.ops.Impl` is an ordinary entry of ``Rule.forms`` with the signature of
:mod:`fwjax.ops.impl`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

from fwjax.ops.delta_rule.chunked import delta_rule_chunked
from fwjax.ops.delta_rule.pallas import delta_rule_pallas
from fwjax.ops.delta_rule.recurrent import delta_rule_recurrent
from fwjax.ops.delta_rule.reference import delta_rule_reference
from fwjax.ops.gated_delta_rule.chunked import gated_delta_rule_chunked
from fwjax.ops.gated_delta_rule.pallas import gated_delta_rule_pallas
from fwjax.ops.gated_delta_rule.recurrent import gated_delta_rule_recurrent
from fwjax.ops.gated_delta_rule.reference import gated_delta_rule_reference
from fwjax.ops.impl import (
    FormOptions,
    Impl,
    empty_sequence,
    guard_nonfinite,
    prepare_inputs,
    resolve_chunk_size,
    resolve_impl,
    resolve_scale,
    restore_nonfinite,
)
from fwjax.ops.sum_rule.chunked import sum_rule_chunked
from fwjax.ops.sum_rule.pallas import sum_rule_pallas
from fwjax.ops.sum_rule.recurrent import sum_rule_recurrent
from fwjax.ops.sum_rule.reference import sum_rule_reference


@dataclasses.dataclass(frozen=True)
class Rule:
    """A fast weight rule: its per-step ``[B, T, H]`` inputs and its forms.

    Attributes:
      name: the op's name.
      gates: ``(name, neutral value)`` of each ``[B, T, H]`` input, in call order; the neutral
        value is a no-op step (β = 0 writes nothing, α = 1 decays nothing).
      forms: one form per concrete :class:`~fwjax.ops.Impl`.
    """

    name: str
    gates: tuple[tuple[str, float], ...]
    forms: Mapping[Impl, Callable]


def _forms(*forms: Callable) -> dict[Impl, Callable]:
    """The forms of every concrete Impl, in the order of the enum (REFERENCE, RECURRENT,
    CHUNKED, PALLAS)."""
    return dict(zip([i for i in Impl if i is not Impl.AUTO], forms, strict=True))


SUM = Rule(
    "sum_rule",
    gates=(),
    forms=_forms(sum_rule_reference, sum_rule_recurrent, sum_rule_chunked, sum_rule_pallas),
)
DELTA = Rule(
    "delta_rule",
    gates=(("beta", 0.0),),
    forms=_forms(delta_rule_reference, delta_rule_recurrent, delta_rule_chunked, delta_rule_pallas),
)
GATED_DELTA = Rule(
    "gated_delta_rule",
    gates=(("beta", 0.0), ("alpha", 1.0)),
    forms=_forms(
        gated_delta_rule_reference,
        gated_delta_rule_recurrent,
        gated_delta_rule_chunked,
        gated_delta_rule_pallas,
    ),
)
RULES = {rule.name: rule for rule in (SUM, DELTA, GATED_DELTA)}


def run_rule(
    rule: Rule,
    q,
    k,
    v,
    gates: tuple,
    initial_state,
    scale,
    impl,
    chunk_size,
    pallas,
    remat_block=None,
):
    """Validates the inputs, resolves ``impl``, ``chunk_size``, ``remat_block`` and ``scale``,
    and runs ``rule``'s form; the arguments and result are those of the public op (e.g.
    :func:`fwjax.ops.delta_rule`), with ``gates`` the rule's ``[B, T, H]`` inputs in order.

    The chunkwise forms (:attr:`Impl.chunkwise`) run on inputs whose non-finite entries are
    replaced by the gates' neutral values and get NaN back where the recurrence has it
    (:func:`fwjax.ops.impl.guard_nonfinite`).
    """
    names = [name for name, _ in rule.gates]
    p = prepare_inputs(q, k, v, dict(zip(names, gates, strict=True)), initial_state)
    impl = resolve_impl(impl)
    options = FormOptions(
        chunk_size=resolve_chunk_size(chunk_size),
        remat_block=resolve_chunk_size(remat_block, "remat_block"),
        pallas=pallas,
        out_dtype=p.out_dtype,
    )
    scale = resolve_scale(scale, p.k.shape[-1])
    if p.k.shape[1] == 0:
        return empty_sequence(p)
    q, k, v, gates = p.q, p.k, p.v, p.gates
    if impl.chunkwise:
        neutral = [fill for _, fill in rule.gates]
        (q, k, v, *gates), steps = guard_nonfinite(q, k, v, list(zip(gates, neutral, strict=True)))
    out, state = rule.forms[impl](q, k, v, tuple(gates), p.initial_state, scale, options)
    if impl.chunkwise:
        out, state = restore_nonfinite(out, state, steps)
    return out.astype(p.out_dtype), state
