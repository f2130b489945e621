"""The composition entry point: φ, normalisation and rule, against literal float64 loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fwjax.ops import (
    FastWeightState,
    FeatureMap,
    FeatureMapKind,
    Impl,
    Normalization,
    UpdateRule,
    fast_weight_attention,
    fast_weight_read,
    feature_maps,
    init_fast_weight_state,
)
from tests.oracle import attention_normalized_np, delta_rule_np, sum_rule_np
from tests.tolerances import assert_close

B, T, H, D, V = 2, 19, 2, 4, 3


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    q, k = (jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.normal(size=(B, T, H, V)), jnp.float32)
    beta = jnp.asarray(rng.uniform(0.1, 0.9, size=(B, T, H)), jnp.float32)
    return q, k, v, beta


def _expected(q, k, v, beta, fm, norm, rule, projection, scale, eps):
    stab_q = norm is not Normalization.NONE
    fq = np.asarray(fm(q, projection, stabilize=stab_q), np.float64)
    fk = np.asarray(fm(k, projection, stabilize=norm.cancels_key_scale), np.float64)
    if norm in (Normalization.SUM, Normalization.SUM_ATTENTION):
        fq, fk = fq / fq.sum(-1, keepdims=True), fk / fk.sum(-1, keepdims=True)
    if norm is Normalization.L2:
        fq = fq / np.sqrt((fq**2).sum(-1, keepdims=True) + 1e-6)
        fk = fk / np.sqrt((fk**2).sum(-1, keepdims=True) + 1e-6)
    if norm is Normalization.CENTERED_L2:
        fq, fk = (x - x.mean(-1, keepdims=True) for x in (fq, fk))
        fq = fq / np.sqrt((fq**2).sum(-1, keepdims=True) + 1e-6)
        fk = fk / np.sqrt((fk**2).sum(-1, keepdims=True) + 1e-6)
    kdim = fq.shape[-1]
    s0 = np.zeros((B, H, kdim, V))
    if norm.uses_normalizer:
        out, _, _ = attention_normalized_np(
            fq, fk, v, beta, s0, np.zeros((B, H, kdim)), scale, eps, delta=rule is UpdateRule.DELTA
        )
        return out
    if rule is UpdateRule.DELTA:
        return delta_rule_np(fq, fk, v, beta, s0, scale)[0]
    return sum_rule_np(fq, fk, v, s0, scale)[0]


FEATURE_MAPS = (
    FeatureMap(FeatureMapKind.ELU_P1),
    FeatureMap(FeatureMapKind.DPFP, nu=2),
    FeatureMap(FeatureMapKind.FAVOR_PLUS, num_features=6),
)


# Impl parity is the parity suite's job; here CHUNKED covers every combination and RECURRENT the
# attention-normalised ones (their rescaled keys and β are the delicate part).
COMBINATIONS = [
    (fm, norm, rule, impl)
    for fm in FEATURE_MAPS
    for norm in Normalization
    for rule in (UpdateRule.SUM, UpdateRule.DELTA)  # GATED_DELTA: test_gated_composition
    for impl in (Impl.CHUNKED, Impl.RECURRENT)
    if impl is Impl.CHUNKED or norm.uses_normalizer
    # CENTERED_L2 differs from L2 only in the normalisation: one feature map suffices
    if norm is not Normalization.CENTERED_L2 or fm.kind is FeatureMapKind.DPFP
]


@pytest.mark.parametrize(
    ("fm", "norm", "rule", "impl"),
    COMBINATIONS,
    ids=lambda x: getattr(x, "value", getattr(getattr(x, "kind", None), "value", None)),
)
def test_matches_literal_equations(fm, norm, rule, impl):
    q, k, v, beta = _inputs()
    projection = (
        feature_maps.draw_favor_projection(jax.random.key(0), D, fm.num_features)
        if fm.needs_projection
        else None
    )
    beta_arg = beta if rule is UpdateRule.DELTA else None
    out, state = fast_weight_attention(
        q,
        k,
        v,
        beta_arg,
        feature_map=fm,
        normalization=norm,
        update_rule=rule,
        projection=projection,
        scale=0.5,
        impl=impl,
        chunk_size=8,
    )
    expected = _expected(q, k, v, beta, fm, norm, rule, projection, 0.5, 1e-5)
    assert_close(out, expected)
    assert state.fast_weights.shape == (B, H, fm.output_dim(D), V)
    assert (state.normalizer is not None) == norm.uses_normalizer


@pytest.mark.parametrize("rule", [UpdateRule.SUM, UpdateRule.DELTA], ids=lambda r: r.value)
@pytest.mark.parametrize(
    "norm", [Normalization.ATTENTION, Normalization.SUM], ids=lambda n: n.value
)
def test_state_carry_and_decode_equal_the_whole_sequence(norm, rule):
    q, k, v, beta = _inputs(1)
    kw = dict(
        feature_map=FeatureMap(FeatureMapKind.DPFP, nu=1),
        normalization=norm,
        update_rule=rule,
        impl=Impl.CHUNKED,
        chunk_size=4,
    )
    b = (lambda sl: beta[:, sl]) if rule is UpdateRule.DELTA else (lambda sl: None)
    whole, state = fast_weight_attention(q, k, v, b(slice(None)), **kw)
    # Two segments with the carried state.
    first, s1 = fast_weight_attention(q[:, :7], k[:, :7], v[:, :7], b(slice(0, 7)), **kw)
    second, s2 = fast_weight_attention(
        q[:, 7:], k[:, 7:], v[:, 7:], b(slice(7, None)), state=s1, **kw
    )
    assert_close(jnp.concatenate([first, second], 1), whole)
    assert_close(s2.fast_weights, state.fast_weights)
    # One token at a time, from an explicitly initialised empty state.
    s = init_fast_weight_state(B, H, 2 * D, V, norm)
    outs = []
    for t in range(T):
        o, s = fast_weight_attention(
            q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], b(slice(t, t + 1)), state=s, **kw
        )
        outs.append(o)
    assert_close(jnp.concatenate(outs, 1), whole)
    assert isinstance(s, FastWeightState)
    if norm.uses_normalizer:
        assert_close(s.normalizer, state.normalizer)


# Slow (21 s): every map x rule x normalisation is trained in tests/nn (finite gradients).
@pytest.mark.slow
def test_gradients_are_finite_through_every_normalization():
    q, k, v, beta = _inputs(2)
    for norm in Normalization:

        def loss(q, k, v, beta, norm=norm):
            out, _ = fast_weight_attention(
                q,
                k,
                v,
                beta,
                feature_map=FeatureMap("dpfp"),
                normalization=norm,
                impl=Impl.CHUNKED,
                chunk_size=8,
            )
            return jnp.sum(out**2)

        grads = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, beta)
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads), norm


def test_rule_and_beta_must_agree():
    q, k, v, beta = _inputs()
    with pytest.raises(ValueError, match="needs beta"):
        fast_weight_attention(q, k, v, None, update_rule=UpdateRule.DELTA)
    with pytest.raises(ValueError, match="takes no beta"):
        fast_weight_attention(q, k, v, beta, update_rule=UpdateRule.SUM)


@pytest.mark.parametrize("norm", [Normalization.L2, Normalization.SUM], ids=lambda n: n.value)
def test_gated_composition_matches_the_literal_equations(norm):
    from tests.oracle import gated_delta_rule_np

    q, k, v, beta = _inputs(2)
    alpha = jnp.asarray(np.random.default_rng(3).uniform(0.6, 1.0, size=(B, T, H)), jnp.float32)
    fm = FeatureMap(FeatureMapKind.DPFP, nu=1)
    out, state = fast_weight_attention(
        q, k, v, beta, feature_map=fm, normalization=norm, update_rule="gated_delta",
        alpha=alpha, scale=0.5, impl=Impl.CHUNKED, chunk_size=8,
    )  # fmt: skip
    fq, fk = (np.asarray(norm.normalize_features(fm(x)), np.float64) for x in (q, k))
    s0 = np.zeros((B, H, fm.output_dim(D), V))
    expected_out, expected_state = gated_delta_rule_np(fq, fk, v, beta, alpha, s0, 0.5)
    assert_close(out, expected_out)
    assert_close(state.fast_weights, expected_state)
    with pytest.raises(ValueError, match="needed by GATED_DELTA only"):
        fast_weight_attention(q, k, v, beta, update_rule="gated_delta")
    with pytest.raises(ValueError, match="no attention normalisation"):
        fast_weight_attention(
            q, k, v, beta, alpha=alpha, update_rule="gated_delta",
            normalization=Normalization.ATTENTION,
        )  # fmt: skip


@pytest.mark.parametrize("impl", [Impl.RECURRENT, Impl.CHUNKED], ids=lambda i: i.value)
@pytest.mark.parametrize("norm", list(Normalization), ids=lambda n: n.value)
def test_an_empty_sequence_keeps_the_state(norm, impl):
    b, h, d = 2, 2, 4
    x = jnp.ones((b, 3, h, d))
    beta = jnp.full((b, 3, h), 0.5)
    fm = FeatureMap(FeatureMapKind.ELU_P1)
    rules = [UpdateRule.SUM, UpdateRule.DELTA]
    if not norm.uses_normalizer:
        rules.append(UpdateRule.GATED_DELTA)
    for rule in rules:
        kw = dict(feature_map=fm, normalization=norm, update_rule=rule, impl=impl)
        gates = {"alpha": beta} if rule is UpdateRule.GATED_DELTA else {}
        b_ = None if rule is UpdateRule.SUM else beta
        _, state = fast_weight_attention(x, x, x, b_, **kw, **gates)
        empty = {n: g[:, :0] for n, g in gates.items()}
        e = x[:, :0]
        y, same = fast_weight_attention(
            e, e, e, None if b_ is None else b_[:, :0], state=state, **kw, **empty
        )
        assert y.shape == (b, 0, h, d), rule
        for a, c in zip(jax.tree.leaves(same), jax.tree.leaves(state), strict=True):
            np.testing.assert_array_equal(a, c)
    read = fast_weight_read(x, state, feature_map=fm, normalization=norm, scale=None)
    expected = fast_weight_read(x, state, feature_map=fm, normalization=norm, scale=d**-0.5)
    np.testing.assert_array_equal(read, expected)


def test_pallas_options_reach_the_rule():
    """``pallas=`` is passed to the rule: a value tile that does not divide the padded value
    dimension is refused, and the XLA-backward option gives CHUNKED's outputs."""
    from fwjax.ops.pallas import PallasBackward, PallasOptions

    q, k, v, beta = _inputs()
    kw = {"impl": Impl.PALLAS, "chunk_size": 16}
    with pytest.raises(ValueError, match="value_block=24 must"):
        fast_weight_attention(q, k, v, beta, pallas=PallasOptions(value_block=24), **kw)
    options = PallasOptions(backward=PallasBackward.XLA)
    y, _ = fast_weight_attention(q, k, v, beta, pallas=options, **kw)
    want, _ = fast_weight_attention(q, k, v, beta, impl=Impl.CHUNKED, chunk_size=16)
    assert_close(y, want)
