"""DeltaProduct (N delta steps per token) and negative eigenvalues (β up to 2): every Impl
against float64 oracles, outputs, final state and VJPs; N = 1 is the delta rule; decoding
step by step equals the parallel forward; a packed row equals its documents; β = 2 reflects.
The delta and gated delta rules with β ∈ (1, 2) run in the shared parity suite
(``DELTA_NEG`` / ``GATED_NEG`` in tests/ops/rules.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fwjax.ops import Impl, delta_rule
from fwjax.ops.delta_product import delta_product, delta_product_step
from tests.jax_compat import enable_x64
from tests.ops.rules import IMPLS, state_tolerance, upcast
from tests.tolerances import assert_close

B, T, N, H, K, V = 2, 13, 3, 2, 5, 4
CHUNK = 8  # interleaved steps: 39, not a multiple of the chunk


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _inputs(seed=0, beta_max=2.0):
    rng = np.random.default_rng(seed)
    return dict(
        q=jnp.asarray(_unit(rng.normal(size=(B, T, H, K))), jnp.float32),
        k=jnp.asarray(_unit(rng.normal(size=(B, T, N, H, K))), jnp.float32),
        v=jnp.asarray(rng.normal(size=(B, T, N, H, V)), jnp.float32),
        beta=jnp.asarray(rng.uniform(0.05, beta_max - 0.05, size=(B, T, N, H)), jnp.float32),
        s0=jnp.asarray(0.5 * rng.normal(size=(B, H, K, V)), jnp.float32),
    )


def _oracle(x, scale=0.7):
    q, k, v, beta, s0 = (np.asarray(x[n], np.float64) for n in ("q", "k", "v", "beta", "s0"))
    out = np.zeros((B, T, H, V))
    s = s0.copy()
    for b in range(B):
        for h in range(H):
            w = s[b, h]
            for t in range(T):
                for j in range(N):
                    kt = k[b, t, j, h]
                    w = w + beta[b, t, j, h] * np.outer(kt, v[b, t, j, h] - w.T @ kt)
                out[b, t, h] = scale * (w.T @ q[b, t, h])
            s[b, h] = w
    return out, s


def _run(x, impl, **kw):
    return delta_product(x["q"], x["k"], x["v"], x["beta"], x["s0"], 0.7, impl, CHUNK, **kw)


@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: i.value)
def test_every_impl_matches_the_oracle(impl):
    x = _inputs()
    out, state = _run(x, impl)
    expected_out, expected_state = _oracle(x)
    assert_close(out, expected_out, err_msg="output")
    assert_close(state, expected_state, state_tolerance(impl, jnp.float32, state.dtype))


def _vjp(x, impl, cotangents):
    names = ("q", "k", "v", "beta", "s0")

    @jax.jit
    def vjp(primals, cot):
        f = lambda *a: delta_product(*a, 0.7, impl, CHUNK)
        return jax.vjp(f, *primals)[1](cot)

    return dict(zip(names, vjp(tuple(x[n] for n in names), cotangents), strict=True))


@pytest.mark.parametrize(
    "impl", [i for i in IMPLS if i is not Impl.REFERENCE], ids=lambda i: i.value
)
def test_vjps_match_the_float64_reference(impl):
    x = _inputs(1)
    rng = np.random.default_rng(2)
    d_out, d_state = rng.normal(size=(B, T, H, V)), rng.normal(size=(B, H, K, V))
    grads = _vjp(x, impl, (jnp.asarray(d_out, jnp.float32), jnp.asarray(d_state, jnp.float32)))
    with enable_x64(True):
        expected = _vjp(upcast(x), Impl.REFERENCE, (jnp.asarray(d_out), jnp.asarray(d_state)))
        expected = {n: np.asarray(g) for n, g in expected.items()}
    for name, g in grads.items():
        assert_close(g, expected[name], state_tolerance(impl, jnp.float32, g.dtype), f"d{name}")


def test_one_step_per_token_is_the_delta_rule():
    x = _inputs(beta_max=1.0)
    one = {**x, "k": x["k"][:, :, :1], "v": x["v"][:, :, :1], "beta": x["beta"][:, :, :1]}
    for impl in (Impl.REFERENCE, Impl.CHUNKED):
        out, state = _run(one, impl)
        expected = delta_rule(
            x["q"],
            one["k"][:, :, 0],
            one["v"][:, :, 0],
            one["beta"][:, :, 0],
            x["s0"],
            0.7,
            impl=impl,
        )
        assert_close(out, expected[0])
        assert_close(state, expected[1])


def test_decoding_token_by_token_equals_the_parallel_forward():
    x = _inputs(3)
    out, state = _run(x, Impl.CHUNKED)
    s = x["s0"]
    for t in range(T):
        o, s = delta_product_step(x["q"][:, t], x["k"][:, t], x["v"][:, t], x["beta"][:, t], s, 0.7)
        assert_close(o, out[:, t])
    assert_close(s, state)


def test_a_packed_row_equals_its_documents():
    x = _inputs(4)
    ids = jnp.asarray([[0] * 5 + [1] * 8, [2] * 13])
    out, state = _run(x, Impl.CHUNKED, segment_ids=ids)
    ref_out, ref_state = _run(x, Impl.REFERENCE, segment_ids=ids)
    assert_close(out, ref_out)
    assert_close(state, ref_state)
    second = {n: (a[:1, 5:] if n != "s0" else jnp.zeros_like(a[:1])) for n, a in x.items()}
    alone, _ = delta_product(second["q"], second["k"], second["v"], second["beta"], None, 0.7)
    assert_close(out[:1, 5:], alone)


@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: i.value)
def test_beta_two_with_zero_values_is_a_reflection(impl):
    """With unit keys, v = 0 and β = 2 each step is S ← (I − 2 k kᵀ) S: the norm is kept.

    On CPU (interpret mode) every Impl keeps it to 5e-7. Compiled PALLAS kernels are held to
    2e-2: their float32 dots may run on tensor cores at reduced precision (TF32 on GPU); that
    bound is not measured on a device yet."""
    x = _inputs(5)
    x = {**x, "v": jnp.zeros_like(x["v"]), "beta": jnp.full_like(x["beta"], 2.0)}
    _, state = _run(x, impl)
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(state), axis=(-2, -1)),
        np.linalg.norm(np.asarray(x["s0"]), axis=(-2, -1)),
        rtol=2e-2 if impl is Impl.PALLAS and jax.default_backend() != "cpu" else 1e-5,
    )


def test_a_deltaproduct_layer_carries_its_state_and_packs_documents():
    """``householder_steps = 2`` with ``beta_range = 2`` in a language model: a window split
    in two with the state carried gives the whole window's logits, and a packed row its
    documents' logits."""
    from flax import nnx

    from fwjax.nn import FastWeightConfig, ModelConfig, TransformerLM
    from fwjax.ops import FeatureMap, FeatureMapKind, Normalization

    fw = FastWeightConfig(
        feature_map=FeatureMap(FeatureMapKind.IDENTITY),
        normalization=Normalization.L2,
        beta_range=2.0,
        householder_steps=2,
        short_conv=True,
    )
    sizes = dict(vocab_size=11, d_model=16, num_layers=1, num_heads=2, d_ff=16)
    kinds = ("fast_weight",)
    config = ModelConfig(**sizes, layer_kinds=kinds, fast_weight=fw, positional="none")
    model = TransformerLM(config, rngs=nnx.Rngs(0))
    assert model.blocks[0].attention.qkvb.kernel[...].shape == (16, 5 * 16 + 2 * 2)
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 11)
    call = nnx.jit(lambda m, tokens, state, ids: m(tokens, state, segment_ids=ids))
    whole, _ = call(model, tokens, model.init_state(2), None)
    first, state = call(model, tokens[:, :4], model.init_state(2), None)
    second, _ = call(model, tokens[:, 4:], state, None)
    np.testing.assert_allclose(jnp.concatenate([first, second], 1), whole, rtol=2e-5, atol=2e-5)
    ids = jnp.asarray([[0] * 4 + [1] * 5] * 2)
    packed, _ = call(model, tokens, None, ids)
    alone, _ = call(model, tokens[:, 4:], None, None)
    np.testing.assert_allclose(packed[:, 4:], alone, rtol=2e-5, atol=2e-5)


def test_householder_steps_need_the_plain_delta_rule():
    from fwjax.nn import FastWeightConfig

    with pytest.raises(ValueError, match="householder_steps=2 needs update_rule=DELTA"):
        FastWeightConfig(householder_steps=2, normalization="attention")
    with pytest.raises(ValueError, match=r"beta_range=2\.5 must be in"):
        FastWeightConfig(beta_range=2.5)
