"""Properties every implementation must satisfy, beyond matching the oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fwjax.ops import Impl, delta_rule, delta_rule_step, feature_maps, sum_rule, sum_rule_step
from tests.ops.rules import DELTA, IMPLS, RULES, SUM, Case, make_inputs
from tests.tolerances import assert_close

CASE = Case(b=2, t=29, h=2, k=6, v=4, chunk=8)


def _slice(inputs, start, stop):
    return {n: (x[:, start:stop] if n in ("q", "k", "v", "beta") else x) for n, x in inputs.items()}


@pytest.mark.parametrize("split", [1, 8, 13])
@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: i.value)
@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_split_and_carry_equals_whole_sequence(rule, impl, split):
    inputs = make_inputs(CASE, jnp.float32)
    out, state = rule(inputs, impl, CASE.chunk)
    out1, state1 = rule(_slice(inputs, 0, split), impl, CASE.chunk)
    out2, state2 = rule(_slice(inputs, split, CASE.t), impl, CASE.chunk, s0=state1)
    assert_close(jnp.concatenate([out1, out2], axis=1), out)
    assert_close(state2, state)


@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: i.value)
def test_zero_beta_leaves_state_unchanged(impl):
    inputs = make_inputs(CASE, jnp.float32)
    inputs["beta"] = jnp.zeros_like(inputs["beta"])
    out, state = DELTA(inputs, impl, CASE.chunk)
    np.testing.assert_array_equal(state, inputs["s0"])
    # Reads then see the initial state only.
    expected = inputs["scale"] * jnp.einsum("bthk,bhkv->bthv", inputs["q"], inputs["s0"])
    assert_close(out, expected)


@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: i.value)
@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_rewriting_a_key(rule, impl):
    """Unit-norm k, β = 1: (k, v1) then (k, v2) retrieves v2 (delta) or v1 + v2 (sum)."""
    rng = np.random.default_rng(0)
    key = rng.normal(size=8)
    key /= np.linalg.norm(key)
    v1, v2 = rng.normal(size=(2, 5))
    k = jnp.asarray(np.stack([key, key])[None, :, None], jnp.float32)  # [1, 2, 1, 8]
    v = jnp.asarray(np.stack([v1, v2])[None, :, None], jnp.float32)
    inputs = {
        "q": k,
        "k": k,
        "v": v,
        "beta": jnp.ones((1, 2, 1), jnp.float32),
        "s0": None,
        "scale": 1.0,
    }
    out, _ = rule(inputs, impl, 2)
    assert_close(out[0, 1, 0], v2 if rule is DELTA else v1 + v2)


@pytest.mark.parametrize("impl", [Impl.RECURRENT, Impl.CHUNKED], ids=lambda i: i.value)
def test_sum_normalized_delta_rule_stays_bounded(impl):
    """10k random delta steps with sum-normalised non-negative keys: ‖S_t‖ does not grow, while
    the sum rule's state grows like √t."""
    rng = np.random.default_rng(0)
    segments, seg_len, kdim, vdim = 10, 1000, 8, 4
    k = feature_maps.sum_norm(
        jnp.asarray(rng.uniform(size=(1, segments * seg_len, 1, kdim)), jnp.float32)
    )
    v = jnp.asarray(rng.normal(size=(1, segments * seg_len, 1, vdim)), jnp.float32)
    beta = jnp.asarray(rng.uniform(size=(1, segments * seg_len, 1)), jnp.float32)
    s_delta = s_sum = None
    delta_norms, sum_norms = [], []
    for i in range(segments):
        sl = slice(i * seg_len, (i + 1) * seg_len)
        _, s_delta = delta_rule(k[:, sl], k[:, sl], v[:, sl], beta[:, sl], s_delta, impl=impl)
        _, s_sum = sum_rule(k[:, sl], k[:, sl], v[:, sl], s_sum, impl=impl)
        delta_norms.append(float(jnp.linalg.norm(s_delta)))
        sum_norms.append(float(jnp.linalg.norm(s_sum)))
    assert np.all(np.isfinite(delta_norms))
    # The delta rule's state is in a stationary regime: the last half is no larger than the first.
    assert max(delta_norms[5:]) <= 1.5 * max(delta_norms[:5]), delta_norms
    assert max(delta_norms) < 10.0, delta_norms
    # Contrast: the sum rule keeps accumulating.
    assert sum_norms[-1] > 2.0 * sum_norms[0], sum_norms


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_decode_step_by_step_equals_parallel(rule):
    inputs = make_inputs(CASE, jnp.float32)
    out, state = rule(inputs, Impl.CHUNKED, CASE.chunk)
    s = inputs["s0"]
    step = jax.jit(delta_rule_step if rule is DELTA else sum_rule_step)
    outs = []
    for t in range(CASE.t):
        args = [inputs[n][:, t] for n in ("q", "k", "v")]
        if rule is DELTA:
            args.append(inputs["beta"][:, t])
        o_t, s = step(*args, s, inputs["scale"])
        outs.append(o_t)
    assert_close(jnp.stack(outs, axis=1), out)
    assert_close(s, state)


@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: i.value)
def test_vmap_over_an_extra_axis(impl):
    inputs = [make_inputs(CASE, jnp.float32, seed=s) for s in range(3)]
    stacked = {n: jnp.stack([x[n] for x in inputs]) for n in ("q", "k", "v", "beta", "s0")}
    f = jax.vmap(lambda q, k, v, b, s0: delta_rule(q, k, v, b, s0, 0.7, impl=impl, chunk_size=8))
    out, state = f(*(stacked[n] for n in ("q", "k", "v", "beta", "s0")))
    for i, x in enumerate(inputs):
        o_i, s_i = DELTA(x, impl, 8)
        assert_close(out[i], o_i)
        assert_close(state[i], s_i)


def test_grad_under_jit_matches_across_impls():
    inputs = make_inputs(CASE, jnp.float32)

    def loss(q, k, v, beta, impl):
        out, state = delta_rule(q, k, v, beta, inputs["s0"], impl=impl, chunk_size=8)
        return jnp.sum(out**2) + jnp.sum(state)

    args = tuple(inputs[n] for n in ("q", "k", "v", "beta"))
    grads = {
        impl: jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)), static_argnums=4)(*args, impl)
        for impl in IMPLS
    }
    for impl in IMPLS:
        for g, g_ref in zip(grads[impl], grads[Impl.REFERENCE], strict=True):
            assert_close(g, g_ref, err_msg=impl.value)


def test_auto_resolves_to_a_concrete_impl():
    inputs = make_inputs(CASE, jnp.float32)
    out, _ = SUM(inputs, Impl.AUTO)
    ref, _ = SUM(inputs, Impl.REFERENCE)
    assert_close(out, ref)


def test_string_impl_is_accepted():
    inputs = make_inputs(CASE, jnp.float32)
    out, _ = DELTA(inputs, "chunked", 8)
    ref, _ = DELTA(inputs, Impl.REFERENCE)
    assert_close(out, ref)


# Slow (13 s): both schedules also match the oracle through the parity suite on their platforms.
@pytest.mark.slow
def test_fused_and_two_phase_chunked_delta_rule_agree():
    """Both schedules of the chunked delta rule (phase 1 inside or before the chunk scan; the
    backend picks one) give the same outputs, state and VJP."""
    from fwjax.ops.common import to_chunks
    from fwjax.ops.delta_rule.chunked import delta_chunks

    inputs = make_inputs(CASE, jnp.float32)
    chunks = (*tuple(to_chunks(inputs[n], 8) for n in ("q", "k", "v", "beta")), inputs["s0"])
    rng = np.random.default_rng(0)
    results = {}
    for fused in (False, True):
        primals, pullback = jax.vjp(lambda *a, fused=fused: delta_chunks(*a, fused), *chunks)
        cotangents = tuple(jnp.asarray(rng.normal(size=x.shape), x.dtype) for x in primals)
        rng = np.random.default_rng(0)  # the same cotangents for both
        results[fused] = (primals, pullback(cotangents))
    for a, b in zip(jax.tree.leaves(results[False]), jax.tree.leaves(results[True]), strict=True):
        assert_close(a, b)
