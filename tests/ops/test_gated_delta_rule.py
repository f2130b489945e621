"""Properties of the gated delta rule beyond the parity suite (which covers its forms)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fwjax.ops import Impl, gated_delta_rule, gated_delta_rule_step
from tests.ops.rules import DELTA, GATED, Case, make_inputs
from tests.tolerances import assert_close

CASE = Case(b=2, t=29, h=2, k=6, v=4, chunk=8)
FORMS = GATED.impls


@pytest.mark.parametrize(
    "impl",
    [pytest.param(i, marks=pytest.mark.slow) if i is Impl.PALLAS else i for i in FORMS],
    ids=lambda i: i.value,
)
def test_split_and_carry_equals_whole_sequence(impl):
    inputs = make_inputs(CASE, jnp.float32)
    cut = lambda a, b: {
        n: (x[:, a:b] if n in ("q", "k", "v", "beta", "alpha") else x) for n, x in inputs.items()
    }
    out, state = GATED(inputs, impl, CASE.chunk)
    out1, state1 = GATED(cut(0, 13), impl, CASE.chunk)
    out2, state2 = GATED(cut(13, CASE.t), impl, CASE.chunk, s0=state1)
    assert_close(jnp.concatenate([out1, out2], axis=1), out)
    assert_close(state2, state)


@pytest.mark.parametrize("impl", FORMS, ids=lambda i: i.value)
def test_unit_gate_is_the_delta_rule_and_zero_beta_is_pure_decay(impl):
    inputs = make_inputs(CASE, jnp.float32)
    out, state = GATED(inputs, impl, CASE.chunk, alpha=jnp.ones_like(inputs["alpha"]))
    ref_out, ref_state = DELTA(inputs, Impl.REFERENCE)
    assert_close(out, ref_out)
    assert_close(state, ref_state)
    _, state = GATED(inputs, impl, CASE.chunk, beta=jnp.zeros_like(inputs["beta"]))
    decay = jnp.prod(inputs["alpha"], axis=1)[..., None, None]  # [B, H, 1, 1]
    assert_close(state, decay * inputs["s0"])


def test_decode_step_by_step_equals_parallel():
    inputs = make_inputs(CASE, jnp.float32)
    out, state = GATED(inputs, Impl.CHUNKED, CASE.chunk)
    step = jax.jit(gated_delta_rule_step)
    s, outs = inputs["s0"], []
    for t in range(CASE.t):
        args = [inputs[n][:, t] for n in ("q", "k", "v", "beta", "alpha")]
        o_t, s = step(*args, s, inputs["scale"])
        outs.append(o_t)
    assert_close(jnp.stack(outs, axis=1), out)
    assert_close(s, state)


def test_tiny_gates_neither_overflow_nor_lose_the_last_write():
    """α = 1e-6 wipes the memory each step: the chunked form (in log space) stays finite and
    the state is the last write ``β k vᵀ`` (up to the decayed remainder)."""
    inputs = make_inputs(Case(b=1, t=40, h=1, k=4, v=3, chunk=16), jnp.float32)
    alpha = jnp.full_like(inputs["alpha"], 1e-6)
    for impl in FORMS:
        out, state = GATED(inputs, impl, 16, alpha=alpha)
        assert jnp.all(jnp.isfinite(out)) and jnp.all(jnp.isfinite(state))
        k, v, beta = (inputs[n][0, -1, 0] for n in ("k", "v", "beta"))
        assert_close(state[0, 0], beta * jnp.outer(k, v), err_msg=impl.value)


def test_gates_are_validated():
    inputs = make_inputs(CASE, jnp.float32)
    with pytest.raises(ValueError, match=r"alpha must have shape \[B, T, H\]"):
        gated_delta_rule(*(inputs[n] for n in ("q", "k", "v", "beta")), inputs["alpha"][:, :3])


def test_gradients_flow_to_the_gates():
    inputs = make_inputs(CASE, jnp.float32)

    def loss(alpha, impl):
        out, state = GATED(inputs, impl, CASE.chunk, alpha=alpha)
        return jnp.sum(out**2) + jnp.sum(state**2)

    # PALLAS: its gate gradient is in the parity suite's VJP (it differentiates CHUNKED).
    forms = [impl for impl in FORMS if impl is not Impl.PALLAS]
    grads = {impl: jax.grad(loss)(inputs["alpha"], impl) for impl in forms}
    assert float(jnp.abs(grads[Impl.REFERENCE]).max()) > 0
    for impl in forms:
        assert_close(grads[impl], grads[Impl.REFERENCE], err_msg=impl.value)
    np.testing.assert_equal(np.isfinite(np.asarray(grads[Impl.CHUNKED])).all(), True)


def test_remat_block_changes_memory_not_results():
    """RECURRENT's rematerialisation block is ``remat_block``; ``chunk_size`` does not touch it."""
    inputs = make_inputs(CASE, jnp.float32)
    args = [inputs[n] for n in ("q", "k", "v", "beta", "alpha", "s0", "scale")]
    want, want_state = GATED(inputs, Impl.REFERENCE)
    for block in (1, 5, 64):
        out, state = gated_delta_rule(*args, impl=Impl.RECURRENT, remat_block=block)
        assert_close(out, want, err_msg=f"{block=}")
        assert_close(state, want_state, err_msg=f"{block=}")
    with pytest.raises(ValueError, match="remat_block=0 must be a positive int or None"):
        gated_delta_rule(*args, impl=Impl.RECURRENT, remat_block=0)
