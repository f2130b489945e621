"""The self-referential weight matrix: REFERENCE and RECURRENT against a float64 NumPy loop of
the official kernel's equations, RECURRENT's VJP against the float64 REFERENCE and finite
differences, split-and-carry and decoding; no chunkwise form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fwjax.ops import Impl
from fwjax.ops.srwm import SRWMState, srwm, srwm_step
from tests.jax_compat import enable_x64
from tests.tolerances import assert_close

B, T, H, D = 2, 9, 2, 4


def _inputs(seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(B, T, H, D)), dtype)
    parts = [rng.normal(size=(B, H, D, n)) / np.sqrt(D) for n in (D, D, D, 4)]
    return x, SRWMState(*(jnp.asarray(p, dtype) for p in parts))


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def _oracle(x, state):
    x = np.asarray(x, np.float64)
    parts = [np.asarray(p, np.float64).copy() for p in state]
    ys = np.zeros((B, T, H, D))
    for b in range(B):
        for h in range(H):
            w = [p[b, h] for p in parts]
            for t in range(T):
                xt = x[b, t, h]
                ys[b, t, h] = xt @ w[0]
                q, k = _softmax(xt @ w[1]), _softmax(xt @ w[2])
                lr = 1 / (1 + np.exp(-(xt @ w[3])))
                w = [wi + lr[i] * np.outer(k, q @ wi - k @ wi) for i, wi in enumerate(w)]
            for p, wi in zip(parts, w, strict=True):
                p[b, h] = wi
    return ys, parts


@pytest.mark.parametrize("impl", [Impl.REFERENCE, Impl.RECURRENT], ids=lambda i: i.value)
def test_forms_match_the_oracle(impl):
    x, state = _inputs()
    ys, final = srwm(x, state, impl)
    expected, parts = _oracle(x, state)
    assert_close(ys, expected)
    for a, e in zip(final, parts, strict=True):
        assert_close(a, e)


def test_recurrent_vjp_matches_the_float64_reference_and_finite_differences():
    from jax.test_util import check_grads

    x, state = _inputs(1)
    rng = np.random.default_rng(2)
    cot = (rng.normal(size=x.shape), SRWMState(*(rng.normal(size=p.shape) for p in state)))

    def grads(x, state, impl, cot):
        return jax.jit(lambda *a: jax.vjp(lambda x, s: srwm(x, s, impl), *a)[1](cot))(x, state)

    got = grads(x, state, Impl.RECURRENT, jax.tree.map(jnp.float32, cot))
    with enable_x64(True):
        up = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)
        expected = grads(up(x), up(state), Impl.REFERENCE, up(cot))
        small = up((x[:1, :4], SRWMState(*(p[:1] for p in state))))

        def f(x, s):
            ys, final = srwm(x, s, "recurrent")
            return jnp.sum(jnp.sin(ys)) + sum(jnp.sum(p**2) for p in final)

        check_grads(f, small, order=1, modes=("rev",), atol=1e-6, rtol=1e-6)
    for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        assert_close(a, np.asarray(e))


def test_split_and_carry_and_decoding_equal_the_whole_sequence():
    x, state = _inputs(3)
    ys, final = srwm(x, state)
    first, mid = srwm(x[:, :4], state)
    second, end = srwm(x[:, 4:], mid)
    assert_close(jnp.concatenate([first, second], axis=1), ys)
    for a, b in zip(end, final, strict=True):
        assert_close(a, b)
    s = state
    for t in range(T):
        y, s = srwm_step(x[:, t], s)
        assert_close(y, ys[:, t])


def test_there_is_no_chunkwise_form():
    x, state = _inputs()
    with pytest.raises(ValueError, match="no chunkwise form"):
        srwm(x, state, "chunked")
