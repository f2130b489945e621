"""Packed documents: a row holding several documents equals its documents run separately, in
every Impl of every rule (outputs, final state and the VJP), and the helpers of
:mod:`fwjax.ops.segments`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fwjax.ops import Impl
from fwjax.ops.segments import (
    document_positions,
    document_starts,
    segment_ids_from_cu_seqlens,
    segmented_cumsum,
)
from tests.jax_compat import enable_x64
from tests.ops.rules import IMPLS, PARITY_RULES, Case, make_inputs, state_tolerance, upcast
from tests.tolerances import assert_close

# T = 37 in chunks of 8 (PALLAS: 16). Row 0: starts at 5, at the chunk boundaries 8 and 16, and
# a one-step document at 16; row 1: three starts inside the first chunk (one-step documents).
CASE = Case(b=2, t=37, h=2, k=5, v=4, chunk=8)
LENGTHS = ((5, 3, 8, 1, 20), (2, 1, 1, 33))
SEQUENCE_ARGS = ("q", "k", "v", "beta", "alpha")


def _segment_ids(lengths=LENGTHS):
    rows = [np.repeat(np.arange(len(row)) + 7, row) for row in lengths]  # arbitrary ids
    return jnp.asarray(np.stack(rows), jnp.int32)


def _documents(lengths=LENGTHS):
    """``(row, slice, first)`` of every document."""
    for b, row in enumerate(lengths):
        starts = np.concatenate([[0], np.cumsum(row)[:-1]])
        for i, (start, n) in enumerate(zip(starts, row, strict=True)):
            yield b, slice(int(start), int(start + n)), i == 0


def _separately(rule, inputs):
    """The float64 oracle run on each document alone (the first from ``s0``, the others from
    zeros): the outputs concatenated back into rows and each row's last final state."""
    out = np.zeros((CASE.b, CASE.t, CASE.h, CASE.v))
    state = np.zeros((CASE.b, CASE.h, CASE.k, CASE.v))
    for b, sl, first in _documents():
        doc = {n: (x[b : b + 1, sl] if n in SEQUENCE_ARGS else x) for n, x in inputs.items()}
        s0 = inputs["s0"][b : b + 1]
        doc["s0"] = s0 if first else jnp.zeros_like(s0)
        o, s = rule.oracle(doc)
        out[b, sl], state[b] = o[0], s[0]
    return out, state


def _params(vjp: bool):
    return [
        pytest.param(rule, impl, id=f"{impl.value}-{rule.name}")
        for rule in PARITY_RULES
        for impl in IMPLS
        if not (vjp and impl is Impl.REFERENCE)  # REFERENCE is the VJP's oracle
    ]


@pytest.mark.parametrize(("rule", "impl"), _params(vjp=False))
def test_a_packed_row_equals_its_documents_run_separately(rule, impl):
    inputs = {**make_inputs(CASE, jnp.float32), "segment_ids": _segment_ids()}
    out, state = rule(inputs, impl, CASE.chunk)
    expected_out, expected_state = _separately(rule, inputs)
    assert_close(out, expected_out, err_msg="output")
    assert_close(state, expected_state, state_tolerance(impl, jnp.float32, state.dtype))


def _vjp(rule, inputs, impl, cotangents):
    names = rule.diff_args

    @jax.jit
    def vjp(primals, cotangents):
        def f(*args):
            return rule(inputs, impl, CASE.chunk, **dict(zip(names, args, strict=True)))

        return jax.vjp(f, *primals)[1](cotangents)

    return dict(zip(names, vjp(tuple(inputs[n] for n in names), cotangents), strict=True))


def test_the_packed_reference_vjp_equals_the_documents_vjps():
    """The oracle of the packed VJPs below: the REFERENCE form's float64 VJP on a packed row
    equals the sum of its documents' VJPs taken separately (the delta rule; the forms of the
    other rules share the mechanism, and their packed VJPs are checked against theirs)."""
    from tests.ops.rules import DELTA

    rng = np.random.default_rng(1)
    with enable_x64(True):
        inputs = upcast({**make_inputs(CASE, jnp.float32), "segment_ids": _segment_ids()})
        d_out = jnp.asarray(rng.normal(size=(CASE.b, CASE.t, CASE.h, CASE.v)))
        d_state = jnp.asarray(rng.normal(size=(CASE.b, CASE.h, CASE.k, CASE.v)))
        packed = _vjp(DELTA, inputs, Impl.REFERENCE, (d_out, d_state))
        expected = {n: np.zeros(inputs[n].shape) for n in DELTA.diff_args}
        last = {b: sl for b, sl, _ in _documents()}
        for b, sl, first in _documents():
            if b != 0:  # row 0 (five documents, starts at chunk boundaries) keeps CI short
                continue
            doc = {n: (x[b : b + 1, sl] if n in SEQUENCE_ARGS else x) for n, x in inputs.items()}
            doc["segment_ids"] = None
            doc["s0"] = inputs["s0"][b : b + 1] * (1.0 if first else 0.0)
            ds = d_state[b : b + 1] * (1.0 if sl == last[b] else 0.0)
            grads = _vjp(DELTA, doc, Impl.REFERENCE, (d_out[b : b + 1, sl], ds))
            for n in ("q", "k", "v", "beta"):
                expected[n][b, sl] = grads[n][0]
            if first:
                expected["s0"][b] = grads["s0"][0]
        for n, g in packed.items():
            assert_close(g[:1], expected[n][:1], err_msg=f"d{n}")


@pytest.mark.parametrize(("rule", "impl"), _params(vjp=True))
def test_packed_vjp_matches_the_float64_reference(rule, impl):
    inputs = {**make_inputs(CASE, jnp.float32), "segment_ids": _segment_ids()}
    rng = np.random.default_rng(2)
    d_out = rng.normal(size=(CASE.b, CASE.t, CASE.h, CASE.v))
    d_state = rng.normal(size=(CASE.b, CASE.h, CASE.k, CASE.v))
    cotangents = (jnp.asarray(d_out, jnp.float32), jnp.asarray(d_state, jnp.float32))
    grads = _vjp(rule, inputs, impl, cotangents)
    with enable_x64(True):
        expected = _vjp(
            rule,
            upcast(inputs),
            Impl.REFERENCE,
            (jnp.asarray(d_out), jnp.asarray(d_state)),
        )
        expected = {n: np.asarray(g) for n, g in expected.items()}
    for name, g in grads.items():
        assert_close(g, expected[name], state_tolerance(impl, jnp.float32, g.dtype), name)


@pytest.mark.parametrize("rule", PARITY_RULES, ids=lambda r: r.name)
def test_one_segment_per_row_is_the_unpacked_op(rule):
    inputs = make_inputs(CASE, jnp.float32)
    plain = rule(inputs, Impl.CHUNKED, CASE.chunk)
    ids = jnp.full((CASE.b, CASE.t), 3, jnp.int32)
    for impl in (Impl.RECURRENT, Impl.CHUNKED):
        packed = rule({**inputs, "segment_ids": ids}, impl, CASE.chunk)
        for a, b in zip(packed, plain, strict=True):
            assert_close(a, b)


@pytest.mark.parametrize("impl", [Impl.REFERENCE, Impl.CHUNKED], ids=lambda i: i.value)
def test_a_nan_stays_in_its_document(impl):
    """A non-finite value poisons its own document from its step on, never the next one."""
    from tests.ops.rules import DELTA

    inputs = {**make_inputs(CASE, jnp.float32), "segment_ids": _segment_ids()}
    poisoned = {**inputs, "v": inputs["v"].at[0, 10, 1, 0].set(jnp.nan)}  # document 8..15
    clean, _ = DELTA(inputs, impl, CASE.chunk)
    out, state = DELTA(poisoned, impl, CASE.chunk)
    assert np.isnan(out[0, 10:16, 1, 0]).all()
    assert np.isfinite(np.delete(np.asarray(out[0, :, 1, 0]), np.s_[10:16])).all()
    np.testing.assert_allclose(out[0, 16:], clean[0, 16:], rtol=1e-6, atol=1e-7)
    assert np.isfinite(state).all()


def test_document_starts_positions_and_cu_seqlens():
    ids = jnp.asarray([[4, 4, 9, 9, 9, 2], [1, 1, 1, 1, 1, 1]])
    starts = document_starts(ids, (2, 6))
    np.testing.assert_array_equal(starts, [[0, 0, 1, 0, 0, 1], [0] * 6])
    np.testing.assert_array_equal(document_positions(ids), [[0, 1, 0, 1, 2, 0], range(6)])
    np.testing.assert_array_equal(
        segment_ids_from_cu_seqlens(jnp.asarray([0, 2, 5, 6]), 6), [[0, 0, 1, 1, 1, 2]]
    )
    x = jnp.arange(1.0, 7.0)[None].repeat(2, 0)
    np.testing.assert_array_equal(
        segmented_cumsum(x, starts), [[1, 3, 3, 7, 12, 6], np.cumsum(x[1])]
    )


def test_segment_ids_are_validated():
    from fwjax.ops import delta_rule

    inputs = make_inputs(Case(b=1, t=4, h=1, k=2, v=2, chunk=4), jnp.float32)
    args = [inputs[n] for n in ("q", "k", "v", "beta")]
    with pytest.raises(ValueError, match=r"segment_ids must have shape \[B, T\]=\(1, 4\)"):
        delta_rule(*args, segment_ids=jnp.zeros((1, 5), jnp.int32))
    with pytest.raises(TypeError, match="segment_ids must be integer"):
        delta_rule(*args, segment_ids=jnp.zeros((1, 4)))
