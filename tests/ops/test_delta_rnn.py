"""The Delta RNN and Delta LSTM: REFERENCE and RECURRENT against a float64 NumPy loop (outputs,
state), RECURRENT's VJP against the float64 REFERENCE VJP (every input and the state),
finite differences, split-and-carry and decoding equal the whole sequence; no chunkwise form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fwjax.ops import Impl
from fwjax.ops.delta_rnn import (
    DeltaLSTMState,
    DeltaRNNState,
    delta_lstm,
    delta_lstm_step,
    delta_rnn,
    delta_rnn_step,
)
from tests.jax_compat import enable_x64
from tests.tolerances import assert_close

B, T, H, D = 2, 9, 2, 4


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _oracle(op, xs, state):
    """The equations of :mod:`fwjax.ops.delta_rnn`, one head and step at a time, float64."""
    z, k, v, beta = (np.asarray(xs[n], np.float64) for n in ("z", "k", "v", "beta"))
    lstm = op is delta_lstm
    if not lstm:  # one gate
        z, k, v, beta = (x[:, :, None] for x in (z, k, v, beta))
    r_all = np.asarray(state.fast_weights, np.float64).copy()
    if not lstm:
        r_all = r_all[:, None]
    h_all = np.asarray(state.output, np.float64).copy()
    c_all = np.asarray(state.cell, np.float64).copy() if lstm else np.zeros_like(h_all)
    out = np.zeros((B, T, H, D))
    for b in range(B):
        for h in range(H):
            r, y, c = r_all[b, :, h], h_all[b, h], c_all[b, h]
            for t in range(T):
                a = _softmax(y)
                p = []
                for g in range(r.shape[0]):
                    key = k[b, t, g, h]
                    r[g] = r[g] + beta[b, t, g, h] * np.outer(key, v[b, t, g, h] - r[g].T @ key)
                    p.append(z[b, t, g, h] + r[g].T @ a)
                if lstm:
                    i, u, o = _sigmoid(p[0]), p[1], _sigmoid(p[2])
                    c = i * u + (1 - i) * c
                    y = o * c
                else:
                    y = p[0]
                out[b, t, h] = y
            r_all[b, :, h], h_all[b, h], c_all[b, h] = r, y, c
    final = (r_all if lstm else r_all[:, 0], h_all) + ((c_all,) if lstm else ())
    return out, final


OPS = {
    "rnn": (delta_rnn, delta_rnn_step, DeltaRNNState, ()),
    "lstm": (delta_lstm, delta_lstm_step, DeltaLSTMState, (3,)),
}


def _inputs(name, seed=0, dtype=jnp.float32):
    _, _, state_type, g = OPS[name]
    rng = np.random.default_rng(seed)
    arr = lambda *shape, s=1.0: jnp.asarray(s * rng.normal(size=shape), dtype)
    keys = jax.nn.softmax(arr(B, T, *g, H, D, s=2.0), axis=-1)  # as the layers' keys
    xs = dict(
        z=arr(B, T, *g, H, D),
        k=keys,
        v=arr(B, T, *g, H, D),
        beta=jax.nn.sigmoid(arr(B, T, *g, H)),
    )
    state = state_type(arr(B, *g, H, D, D, s=0.3), *(arr(B, H, D) for _ in state_type._fields[1:]))
    return xs, state


@pytest.mark.parametrize("impl", [Impl.REFERENCE, Impl.RECURRENT], ids=lambda i: i.value)
@pytest.mark.parametrize("name", OPS)
def test_forms_match_the_oracle(name, impl):
    op = OPS[name][0]
    xs, state = _inputs(name)
    out, new = op(**xs, state=state, impl=impl)
    expected_out, expected_state = _oracle(op, xs, state)
    assert_close(out, expected_out)
    for a, e in zip(new, expected_state, strict=True):
        assert_close(a, e)


@pytest.mark.parametrize("name", OPS)
def test_recurrent_vjp_matches_the_float64_reference(name):
    op, _, state_type, _ = OPS[name]
    xs, state = _inputs(name, 1)
    rng = np.random.default_rng(2)
    cot = (
        rng.normal(size=(B, T, H, D)),
        state_type(*(rng.normal(size=s.shape) for s in state)),
    )

    def grads(xs, state, impl, cot):
        f = lambda xs, state: op(**xs, state=state, impl=impl)
        return jax.jit(lambda *a: jax.vjp(f, *a)[1](cot))(xs, state)

    actual = grads(xs, state, Impl.RECURRENT, jax.tree.map(jnp.float32, cot))
    with enable_x64(True):
        up = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)
        expected = grads(up(xs), up(state), Impl.REFERENCE, up(cot))
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert_close(a, np.asarray(e))


@pytest.mark.parametrize("name", OPS)
def test_check_grads_float64(name):
    from jax.test_util import check_grads

    op = OPS[name][0]
    with enable_x64(True):
        xs, state = _inputs(name, 3, jnp.float64)
        xs = {n: x[:1, :4] for n, x in xs.items()}
        state = type(state)(*(s[:1] for s in state))

        def f(xs, state):
            out, new = op(**xs, state=state, impl="recurrent")
            return jnp.sum(jnp.sin(out)) + sum(jnp.sum(s**2) for s in new)

        check_grads(f, (xs, state), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", OPS)
def test_split_and_carry_and_decoding_equal_the_whole_sequence(name):
    op, step, _, _ = OPS[name]
    xs, state = _inputs(name, 4)
    whole, final = op(**xs, state=state)
    _, mid = op(**{n: x[:, :5] for n, x in xs.items()}, state=state)
    second, end = op(**{n: x[:, 5:] for n, x in xs.items()}, state=mid)
    assert_close(second, whole[:, 5:])
    for a, e in zip(end, final, strict=True):
        assert_close(a, e)
    s = state
    for t in range(T):
        h_t, s = step(*(xs[n][:, t] for n in ("z", "k", "v", "beta")), s)
        assert_close(h_t, whole[:, t])
    for a, e in zip(s, final, strict=True):
        assert_close(a, e)


@pytest.mark.parametrize("name", OPS)
def test_zero_write_strengths_leave_the_fast_weights_unchanged(name):
    op = OPS[name][0]
    xs, state = _inputs(name, 5)
    _, new = op(**{**xs, "beta": jnp.zeros_like(xs["beta"])}, state=state)
    assert_close(new.fast_weights, state.fast_weights)


@pytest.mark.parametrize("impl", [Impl.CHUNKED, Impl.PALLAS], ids=lambda i: i.value)
@pytest.mark.parametrize("name", OPS)
def test_there_is_no_chunkwise_form(name, impl):
    xs, _ = _inputs(name)
    with pytest.raises(ValueError, match="no chunkwise form"):
        OPS[name][0](**xs, impl=impl)


def test_shapes_are_validated():
    xs, _ = _inputs("rnn")
    with pytest.raises(ValueError, match=r"\[B, T, 3, H, D\]"):
        delta_lstm(**xs)
    with pytest.raises(ValueError, match="beta"):
        delta_rnn(**{**xs, "beta": xs["beta"][..., None]})
