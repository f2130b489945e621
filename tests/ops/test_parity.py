"""The parity suite: every Impl of every rule against the float64 oracles.

Forward outputs and final state against NumPy float64 loops; VJPs with random cotangents on BOTH
outputs against the float64 REFERENCE VJP; all shapes from ``CASES`` (T=1, T not divisible by the
chunk, B and H > 1); float32 and bfloat16 inputs (bfloat16 with a float32 state).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fwjax.ops import Impl
from tests.jax_compat import enable_x64
from tests.ops.rules import (
    CASES,
    DELTA_NEG,
    GATED,
    GATED_NEG,
    IMPLS,
    PARITY_RULES,
    PHASED_RULES,
    SPLIT_RULES,
    SUM,
    Case,
    make_inputs,
    state_tolerance,
    upcast,
)
from tests.tolerances import assert_close

DTYPES = (jnp.float32, jnp.bfloat16)


# PALLAS runs in interpret mode on CPU, where a call compiles ~1.5x as long as CHUNKED. Its
# tiling rounds the chunk up to 16, so "C=8" and "C > T" add nothing beyond these two cases:
# T=1 (one padded chunk) and T=37 (three chunks, T not divisible, B, H > 1, odd K and V, padded).
PALLAS_CASES = {"forward": (CASES[0], CASES[1]), "vjp": (CASES[1],)}
# The gated rule's forms share the delta rule's chunking code (covered by every case above).
GATED_CASES = {"forward": (CASES[0], CASES[1], CASES[3]), "vjp": (CASES[1],)}


def _covered(rule, impl, case, kind, dtype):
    if rule in PHASED_RULES:
        # Only PALLAS has the phased schedule; its cases, bfloat16 only in the forward at T=37.
        bf16 = dtype == jnp.bfloat16 and (kind == "vjp" or case is CASES[0])
        return impl is Impl.PALLAS and case in PALLAS_CASES[kind] and not bf16
    if rule in SPLIT_RULES:
        # Only CHUNKED splits; cases with 3 chunks (T not divisible) and 4 (T divisible).
        bf16_vjp = kind == "vjp" and dtype == jnp.bfloat16
        return impl is Impl.CHUNKED and case in (CASES[1], CASES[2]) and not bf16_vjp
    if rule in (DELTA_NEG, GATED_NEG):
        # β ∈ (1, 2): the case that has everything, in float32. The gated rule's RECURRENT form
        # is autodiff of the step; CHUNKED and PALLAS (the inverse, the masks, the kernels'
        # VJP) are the forms that could depend on β ≤ 1.
        gated_form = impl is not Impl.RECURRENT
        first = case is CASES[1] and dtype == jnp.float32
        return first and (rule is DELTA_NEG or gated_form)
    if kind == "vjp" and dtype == jnp.bfloat16 and case is not CASES[1]:
        return False  # bfloat16 VJPs: the one case that has everything (CI time)
    if rule is GATED and case not in GATED_CASES[kind]:
        return False
    return impl is not Impl.PALLAS or case in PALLAS_CASES[kind]


def over_the_suite(kind):
    """Parametrises ``test(rule, impl, case, dtype)`` over every rule, Impl, case and dtype
    (PALLAS over ``PALLAS_CASES[kind]``)."""

    def parametrize(test):
        params = [
            pytest.param(
                rule,
                impl,
                case,
                dtype,
                id=f"{jnp.dtype(dtype).name}-{case}-{impl.value}-{rule.name}",
            )
            for rule in (*PARITY_RULES, DELTA_NEG, GATED_NEG, *SPLIT_RULES, *PHASED_RULES)
            for impl in IMPLS
            for case in CASES
            for dtype in DTYPES
            if _covered(rule, impl, case, kind, dtype)
        ]
        return pytest.mark.parametrize(("rule", "impl", "case", "dtype"), params)(test)

    return parametrize


def _vjp(rule, inputs, impl, chunk, cotangents):
    names = rule.diff_args

    def f(*args):
        return rule(inputs, impl, chunk, **dict(zip(names, args, strict=True)))

    @jax.jit
    def vjp(primals, cotangents):
        _, pullback = jax.vjp(f, *primals)
        return pullback(cotangents)

    grads = vjp(tuple(inputs[n] for n in names), cotangents)
    return dict(zip(names, grads, strict=True))


@over_the_suite("forward")
def test_forward_matches_oracle(rule, impl, case, dtype):
    inputs = make_inputs(case, dtype)
    out, state = rule(inputs, impl, case.chunk)
    expected_out, expected_state = rule.oracle(inputs)
    assert out.dtype == jnp.dtype(dtype)
    assert state.dtype == jnp.float32
    assert out.shape == (case.b, case.t, case.h, case.v)
    assert state.shape == (case.b, case.h, case.k, case.v)
    assert_close(out, expected_out, err_msg="output")
    tol = state_tolerance(impl, dtype, state.dtype)
    assert_close(state, expected_state, tol, err_msg="final state")


@over_the_suite("vjp")
def test_vjp_matches_float64_reference(rule, impl, case, dtype):
    inputs = make_inputs(case, dtype)
    rng = np.random.default_rng(1)
    d_out = rng.normal(size=(case.b, case.t, case.h, case.v))
    d_state = rng.normal(size=(case.b, case.h, case.k, case.v))
    grads = _vjp(
        rule,
        inputs,
        impl,
        case.chunk,
        (jnp.asarray(d_out, jnp.float32).astype(dtype), jnp.asarray(d_state, jnp.float32)),
    )
    with enable_x64(True):
        expected = _vjp(
            rule,
            upcast(inputs),
            Impl.REFERENCE,
            case.chunk,
            (
                jnp.asarray(jnp.asarray(d_out, jnp.float32).astype(dtype), jnp.float64),
                jnp.asarray(d_state, jnp.float64),
            ),
        )
        expected = {n: np.asarray(g) for n, g in expected.items()}
    for name, g in grads.items():
        assert g.dtype == inputs[name].dtype, name
        assert_close(g, expected[name], state_tolerance(impl, dtype, g.dtype), err_msg=f"d{name}")


# PALLAS's VJP is held to the float64 REFERENCE VJP above, which this test checks against finite
# differences; finite differences through interpreted kernels would add ~20 s to CI.
@pytest.mark.parametrize("impl", [i for i in IMPLS if i is not Impl.PALLAS], ids=lambda i: i.value)
@pytest.mark.parametrize("rule", PARITY_RULES, ids=lambda r: r.name)
def test_check_grads_float64(rule, impl):
    """Finite differences against autodiff, on a tiny float64 problem."""
    from jax.test_util import check_grads

    with enable_x64(True):
        inputs = upcast(
            make_inputs(CASES[1].__class__(b=1, t=5, h=2, k=3, v=2, chunk=2), jnp.float32, seed=3)
        )
        names = rule.diff_args

        def f(*args):
            out, state = rule(inputs, impl, 2, **dict(zip(names, args, strict=True)))
            return jnp.sum(jnp.sin(out)) + jnp.sum(state**2)

        check_grads(
            f, tuple(inputs[n] for n in names), order=1, modes=("rev",), atol=1e-6, rtol=1e-6
        )


@pytest.mark.parametrize("rule", PARITY_RULES, ids=lambda r: r.name)
def test_float64_inputs_compute_in_float64(rule):
    with enable_x64(True):
        inputs = upcast(make_inputs(CASES[1], jnp.float32))
        expected_out, expected_state = rule.oracle(inputs)
        for impl in rule.impls:
            out, state = rule(inputs, impl, 16)
            assert out.dtype == jnp.float64 and state.dtype == jnp.float64
            assert_close(out, expected_out, err_msg=impl.value)
            assert_close(state, expected_state, err_msg=impl.value)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_sum_rule_quadratic_form_matches_oracle(case):
    """The masked quadratic form of linear attention: a second oracle that never steps a state."""
    from fwjax.ops.impl import prepare_inputs
    from fwjax.ops.sum_rule.reference import sum_rule_quadratic

    inputs = make_inputs(case, jnp.float32)
    p = prepare_inputs(inputs["q"], inputs["k"], inputs["v"], {}, inputs["s0"])
    out, state = sum_rule_quadratic(p.q, p.k, p.v, p.initial_state, inputs["scale"])
    expected_out, expected_state = SUM.oracle(inputs)
    assert_close(out, expected_out)
    assert_close(state, expected_state)


# --- edge cases: empty sequences, non-finite inputs -------------------------------------------


@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: i.value)
@pytest.mark.parametrize("rule", PARITY_RULES, ids=lambda r: r.name)
def test_empty_sequence_returns_the_initial_state_with_gradients(rule, impl):
    inputs = make_inputs(Case(b=2, t=3, h=2, k=4, v=3, chunk=4), jnp.float32)
    empty = {
        n: (x[:, :0] if n in ("q", "k", "v", "beta", "alpha") else x) for n, x in inputs.items()
    }
    out, state = rule(empty, impl, 4)
    assert out.shape == (2, 0, 2, 3) and out.dtype == jnp.float32
    np.testing.assert_array_equal(state, inputs["s0"])
    out, state = rule({**empty, "s0": None}, impl, 4)
    np.testing.assert_array_equal(state, np.zeros((2, 2, 4, 3)))
    d_state = jnp.asarray(np.random.default_rng(0).normal(size=state.shape), jnp.float32)
    grads = _vjp(rule, empty, impl, 4, (jnp.zeros_like(out), d_state))
    np.testing.assert_array_equal(grads["s0"], d_state)
    for name in rule.diff_args[:-1]:
        assert grads[name].shape == empty[name].shape, name


@pytest.mark.parametrize(
    ("rule", "impl", "where"),
    [
        pytest.param(rule, impl, where, id=f"{rule.name}-{impl.value}-{where}")
        for rule in PARITY_RULES
        for impl in IMPLS
        for where in ("q", "k", "v", "beta", "alpha")
        if (where != "beta" or rule.has_beta) and (where != "alpha" or rule.has_alpha)
    ],
)
def test_a_nan_leaves_earlier_outputs_exact_as_in_the_recurrence(rule, impl, where):
    """A NaN at step t (in the middle of a chunk) must not reach outputs before t."""
    case = Case(b=1, t=40, h=2, k=4, v=3, chunk=16)
    inputs = make_inputs(case, jnp.float32)
    t = 21  # chunk 2 of 3 (at C=16) starts at step 16
    x = inputs[where]
    poisoned = {**inputs, where: x.at[(0, t, 1, *[0] * (x.ndim - 3))].set(jnp.nan)}
    clean_out, _ = rule(inputs, impl, case.chunk)
    out, state = rule(poisoned, impl, case.chunk)
    ref_out, ref_state = rule(poisoned, Impl.RECURRENT, case.chunk)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref_out))
    # The sum rule's recurrence poisons only the state's row of a NaN key entry; the chunkwise
    # forms poison the whole columns that the step writes.
    np.testing.assert_array_equal(np.isnan(state).any(-2), np.isnan(ref_state).any(-2))
    assert np.isnan(out[0, t, 1]).any()
    assert np.isfinite(out[0, :t]).all()
    np.testing.assert_allclose(out[0, :t, 1], clean_out[0, :t, 1], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out[:, :, 0], clean_out[:, :, 0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("rule", PARITY_RULES, ids=lambda r: r.name)
def test_scale_none_is_the_inverse_square_root_of_the_key_dimension(rule):
    inputs = make_inputs(CASES[1], jnp.float32)
    out, _ = rule({**inputs, "scale": None}, Impl.CHUNKED, 16)
    expected, _ = rule({**inputs, "scale": CASES[1].k ** -0.5}, Impl.CHUNKED, 16)
    np.testing.assert_array_equal(out, expected)


def test_decode_steps_take_scale_none():
    from fwjax.ops import delta_rule_step, gated_delta_rule_step, sum_rule_step

    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.normal(size=(2, 3, 5)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)
    beta = alpha = jnp.full((2, 3), 0.5)
    s = jnp.asarray(rng.normal(size=(2, 3, 5, 4)), jnp.float32)
    for step, args in [
        (delta_rule_step, (q, k, v, beta, s)),
        (sum_rule_step, (q, k, v, s)),
        (gated_delta_rule_step, (q, k, v, beta, alpha, s)),
    ]:
        out, _ = step(*args, scale=None)
        expected, _ = step(*args, scale=5**-0.5)
        np.testing.assert_array_equal(out, expected)
