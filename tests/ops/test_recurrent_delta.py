"""The Recurrent Delta Net: REFERENCE and RECURRENT against a float64 NumPy loop (outputs,
state) and each other's VJPs (every input, the recurrent weights and the state included);
split-and-carry and decoding equal the whole sequence; no chunkwise form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fwjax.ops import Impl
from fwjax.ops.recurrent_delta import (
    RecurrentDeltaState,
    RecurrentWeights,
    recurrent_delta_rule,
    recurrent_delta_step,
)
from tests.jax_compat import enable_x64
from tests.tolerances import assert_close

B, T, H, D = 2, 11, 2, 4


def _inputs(seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    arr = lambda *shape, s=1.0: jnp.asarray(s * rng.normal(size=shape), dtype)
    xs = dict(qx=arr(B, T, H, D), kx=arr(B, T, H, D), vx=arr(B, T, H, D), bx=arr(B, T, H))
    weights = RecurrentWeights(
        arr(H, D, D, s=0.5), arr(H, D, D, s=0.5), arr(H, D, D, s=0.5), arr(H, D, s=0.5)
    )
    state = RecurrentDeltaState(arr(B, H, D, D, s=0.3), arr(B, H, D, s=0.3))
    return xs, weights, state


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _oracle(xs, weights, state, scale):
    qx, kx, vx, bx = (np.asarray(xs[n], np.float64) for n in ("qx", "kx", "vx", "bx"))
    rq, rk, rv, rb = (np.asarray(w, np.float64) for w in weights)
    out = np.zeros((B, T, H, D))
    w_all, y_all = (np.asarray(s, np.float64).copy() for s in state)
    for b in range(B):
        for h in range(H):
            w, y = w_all[b, h], y_all[b, h]
            for t in range(T):
                r = np.tanh(y)
                q = _softmax(qx[b, t, h] + r @ rq[h])
                k = _softmax(kx[b, t, h] + r @ rk[h])
                v = vx[b, t, h] + r @ rv[h]
                beta = 1 / (1 + np.exp(-(bx[b, t, h] + r @ rb[h])))
                w = w + beta * np.outer(k, v - w.T @ k)
                y = w.T @ q
                out[b, t, h] = scale * y
            w_all[b, h], y_all[b, h] = w, y
    return out, w_all, y_all


@pytest.mark.parametrize("impl", [Impl.REFERENCE, Impl.RECURRENT], ids=lambda i: i.value)
def test_forms_match_the_oracle(impl):
    xs, weights, state = _inputs()
    out, new = recurrent_delta_rule(**xs, weights=weights, state=state, scale=0.5, impl=impl)
    expected_out, w, y = _oracle(xs, weights, state, 0.5)
    assert_close(out, expected_out)
    assert_close(new.fast_weights, w)
    assert_close(new.output, y)


def _grads(xs, weights, state, impl, cot):
    def f(xs, weights, state):
        return recurrent_delta_rule(**xs, weights=weights, state=state, scale=0.5, impl=impl)

    return jax.jit(lambda *a: jax.vjp(f, *a)[1](cot))(xs, weights, state)


def test_recurrent_vjp_matches_the_float64_reference():
    xs, weights, state = _inputs(1)
    rng = np.random.default_rng(2)
    cot = (
        rng.normal(size=(B, T, H, D)),
        RecurrentDeltaState(rng.normal(size=(B, H, D, D)), rng.normal(size=(B, H, D))),
    )
    grads = _grads(xs, weights, state, Impl.RECURRENT, jax.tree.map(jnp.float32, cot))
    with enable_x64(True):
        up = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)
        expected = _grads(up(xs), up(weights), up(state), Impl.REFERENCE, up(cot))
    for a, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        assert_close(a, np.asarray(e))


def test_check_grads_float64():
    from jax.test_util import check_grads

    with enable_x64(True):
        xs, weights, state = _inputs(3, jnp.float64)
        xs = {n: x[:1, :4] for n, x in xs.items()}
        state = RecurrentDeltaState(*(s[:1] for s in state))

        def f(xs, weights, state):
            out, new = recurrent_delta_rule(**xs, weights=weights, state=state, impl="recurrent")
            return jnp.sum(jnp.sin(out)) + jnp.sum(new.fast_weights**2) + jnp.sum(new.output)

        check_grads(f, (xs, weights, state), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_split_and_carry_and_decoding_equal_the_whole_sequence():
    xs, weights, state = _inputs(4)
    whole, final = recurrent_delta_rule(**xs, weights=weights, state=state)
    first, mid = recurrent_delta_rule(
        **{n: x[:, :5] for n, x in xs.items()}, weights=weights, state=state
    )
    second, end = recurrent_delta_rule(
        **{n: x[:, 5:] for n, x in xs.items()}, weights=weights, state=mid
    )
    assert_close(jnp.concatenate([first, second], axis=1), whole)
    assert_close(end.fast_weights, final.fast_weights)
    s = state
    for t in range(T):
        o, s = recurrent_delta_step(*(xs[n][:, t] for n in ("qx", "kx", "vx", "bx")), weights, s)
        assert_close(o, whole[:, t])


@pytest.mark.parametrize("impl", [Impl.CHUNKED, Impl.PALLAS], ids=lambda i: i.value)
def test_there_is_no_chunkwise_form(impl):
    xs, weights, _ = _inputs()
    with pytest.raises(ValueError, match="no chunkwise form"):
        recurrent_delta_rule(**xs, weights=weights, impl=impl)
