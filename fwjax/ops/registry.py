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

import jax.numpy as jnp

from fwjax.ops.delta_rule import chunked as delta_chunked
from fwjax.ops.delta_rule import pallas as delta_pallas
from fwjax.ops.delta_rule import recurrent as delta_recurrent
from fwjax.ops.delta_rule import reference as delta_reference
from fwjax.ops.gated_delta_rule import chunked as gated_chunked
from fwjax.ops.gated_delta_rule import pallas as gated_pallas
from fwjax.ops.gated_delta_rule import recurrent as gated_recurrent
from fwjax.ops.gated_delta_rule import reference as gated_reference
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
from fwjax.ops.segments import document_starts, restore_nonfinite_packed
from fwjax.ops.sum_rule import chunked as sum_chunked
from fwjax.ops.sum_rule import pallas as sum_pallas
from fwjax.ops.sum_rule import recurrent as sum_recurrent
from fwjax.ops.sum_rule import reference as sum_reference
from fwjax.validation import check_positive_ints


@dataclasses.dataclass(frozen=True)
class Rule:
    """A fast weight rule: its per-step ``[B, T, H]`` inputs and its forms.

    Attributes:
      name: the op's name.
      gates: ``(name, neutral value)`` of each ``[B, T, H]`` input, in call order; the neutral
        value is a no-op step (β = 0 writes nothing, α = 1 decays nothing).
      forms: one form per concrete :class:`~fwjax.ops.Impl`.
      packed: one form per concrete Impl for packed rows (:mod:`fwjax.ops.segments`): the same
        signature, with the document starts ``[B, T, H]`` (1 at a start) as a last gate.
    """

    name: str
    gates: tuple[tuple[str, float], ...]
    forms: Mapping[Impl, Callable]
    packed: Mapping[Impl, Callable]


def _forms(*forms: Callable) -> dict[Impl, Callable]:
    """The forms of every concrete Impl, in the order of the enum (REFERENCE, RECURRENT,
    CHUNKED, PALLAS)."""
    return dict(zip([i for i in Impl if i is not Impl.AUTO], forms, strict=True))


def _rule(name: str, gates, reference, recurrent, chunked, pallas) -> Rule:
    """The rule ``name`` from its four form modules (``{name}_{form}`` and
    ``{name}_{form}_packed`` in each)."""
    modules = (reference, recurrent, chunked, pallas)
    forms = [getattr(m, f"{name}_{m.__name__.rsplit('.', 1)[1]}") for m in modules]
    packed = [getattr(m, f"{name}_{m.__name__.rsplit('.', 1)[1]}_packed") for m in modules]
    return Rule(name, gates, _forms(*forms), _forms(*packed))


SUM = _rule("sum_rule", (), sum_reference, sum_recurrent, sum_chunked, sum_pallas)
DELTA = _rule(
    "delta_rule",
    (("beta", 0.0),),
    delta_reference,
    delta_recurrent,
    delta_chunked,
    delta_pallas,
)
GATED_DELTA = _rule(
    "gated_delta_rule",
    (("beta", 0.0), ("alpha", 1.0)),
    gated_reference,
    gated_recurrent,
    gated_chunked,
    gated_pallas,
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
    segment_ids=None,
    state_segments=None,
):
    """Validates the inputs, resolves ``impl``, ``chunk_size``, ``remat_block`` and ``scale``,
    and runs ``rule``'s form; the arguments and result are those of the public op (e.g.
    :func:`fwjax.ops.delta_rule`), with ``gates`` the rule's ``[B, T, H]`` inputs in order.
    With ``segment_ids`` (packed rows, :mod:`fwjax.ops.segments`) the rule's packed form runs,
    fed the document starts as a last gate.

    The chunkwise forms (:attr:`Impl.chunkwise`) run on inputs whose non-finite entries are
    replaced by the gates' neutral values and get NaN back where the recurrence has it
    (:func:`fwjax.ops.impl.guard_nonfinite`).
    """
    names = [name for name, _ in rule.gates]
    p = prepare_inputs(q, k, v, dict(zip(names, gates, strict=True)), initial_state)
    if segment_ids is not None and impl in (Impl.AUTO, Impl.AUTO.value):
        # Packed rows: the chunked form's masks cost +5–13 % per training step where the
        # recurrent form's rematerialised blocks cost +72–77 % (CPU, benchmarks/README.md).
        impl = Impl.CHUNKED
    impl = resolve_impl(impl)
    check_positive_ints(allow_none=True, state_segments=state_segments)
    options = FormOptions(
        chunk_size=resolve_chunk_size(chunk_size),
        remat_block=resolve_chunk_size(remat_block, "remat_block"),
        pallas=pallas,
        out_dtype=p.out_dtype,
        state_segments=state_segments,
    )
    scale = resolve_scale(scale, p.k.shape[-1])
    starts = None
    if segment_ids is not None:
        starts = document_starts(segment_ids, p.k.shape[:2])
    if p.k.shape[1] == 0:
        return empty_sequence(p)
    q, k, v, gates = p.q, p.k, p.v, p.gates
    if impl.chunkwise:
        neutral = [fill for _, fill in rule.gates]
        (q, k, v, *gates), steps = guard_nonfinite(q, k, v, list(zip(gates, neutral, strict=True)))
    form = rule.forms[impl]
    if starts is not None:
        form = rule.packed[impl]
        per_head = jnp.broadcast_to(starts[..., None], p.k.shape[:3])
        gates = (*gates, per_head.astype(p.initial_state.dtype))
    out, state = form(q, k, v, tuple(gates), p.initial_state, scale, options)
    if impl.chunkwise:
        if starts is None:
            out, state = restore_nonfinite(out, state, steps)
        else:
            out, state = restore_nonfinite_packed(out, state, steps, starts)
    return out.astype(p.out_dtype), state
