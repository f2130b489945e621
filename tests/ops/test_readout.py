"""fwjax.ops.readout: the closed-form read-out equals fast_weight_attention's memory
read after all writes (and softmax attention over one-hot values), the back substitution and its
hand-written VJP equal the definition, and bad inputs are named."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fwjax.ops import (
    FeatureMap,
    FeatureMapKind,
    Normalization,
    UpdateRule,
    fast_weight_attention,
    fast_weight_read,
    feature_maps,
    retrieval_readout,
    softmax_attention,
)
from fwjax.ops import readout as readout_lib
from tests.jax_compat import enable_x64
from tests.tolerances import assert_close

B, Q, L, D, V = 2, 3, 9, 6, 5

PARITY_CASES = [
    (FeatureMap(FeatureMapKind.DPFP, nu=1), Normalization.SUM, UpdateRule.DELTA),
    (FeatureMap(FeatureMapKind.DPFP, nu=2), Normalization.ATTENTION, UpdateRule.SUM),
    (FeatureMap(FeatureMapKind.ELU_P1), Normalization.ATTENTION, UpdateRule.DELTA),
    (FeatureMap(FeatureMapKind.FAVOR_PLUS, num_features=8), Normalization.SUM, UpdateRule.DELTA),
    (FeatureMap(FeatureMapKind.ELU_P1), Normalization.NONE, UpdateRule.DELTA),
]


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, Q, D)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
    values = jnp.asarray(rng.integers(0, V, size=(B, L)), jnp.int32)
    beta = jax.nn.sigmoid(jnp.asarray(rng.normal(size=(B, L)), jnp.float32))
    return q, k, values, beta


@pytest.mark.parametrize("fm, norm, rule", PARITY_CASES)
def test_readout_equals_the_memory_read_after_all_writes(fm, norm, rule):
    q, k, values, beta = _inputs()
    projection = None
    if fm.needs_projection:
        projection = feature_maps.draw_favor_projection(jax.random.key(0), D, fm.num_features)
    delta = rule is UpdateRule.DELTA
    opts = dict(feature_map=fm, normalization=norm, projection=projection)
    ours = retrieval_readout(
        q, k, values, beta if delta else None, num_values=V, update_rule=rule, **opts
    )
    one_hot = jax.nn.one_hot(values, V)[:, :, None]  # [B, L, 1, V]
    _, state = fast_weight_attention(
        k[:, :, None], k[:, :, None], one_hot, beta[:, :, None] if delta else None,
        update_rule=rule, **opts,
    )  # fmt: skip
    ref = fast_weight_read(q[:, :, None], state, **opts)[:, :, 0]
    assert ours.shape == (B, Q, V) and float(jnp.max(jnp.abs(ref))) > 1e-3
    assert_close(ours, ref)


def test_softmax_readout_equals_softmax_attention_over_one_hot_values():
    q, k, values, _ = _inputs(1)
    ours = retrieval_readout(q, k, values, num_values=V, feature_map=None)
    one_hot = jax.nn.one_hot(values, V)[:, :, None]  # [B, L, 1, V]
    ref = softmax_attention(q[:, :, None], k[:, :, None], one_hot, causal=False)[:, :, 0]
    assert_close(ours, ref)


def _read_weights_definition(fq, fk, beta):
    """``r = (s (I + A)⁻¹) ⊙ β``, ``s = q̂K̂ᵀ``, ``A = tril(diag(β) K̂K̂ᵀ, −1)``, by a dense inverse."""
    s = jnp.einsum("bqk,blk->bql", fq, fk)
    a = jnp.tril(beta[:, :, None] * jnp.einsum("blk,bmk->blm", fk, fk), -1)
    return s @ jnp.linalg.inv(jnp.eye(fk.shape[1], dtype=fk.dtype) + a) * beta[:, None, :]


# (read weights, β scale, key scale): the hand-written VJP with writes up to β‖k̂‖² = 1.3 (none
# grows u) and, in float64 where rebuilding a grown u is still exact enough, up to 9.0 (19 of 26
# writes with β‖k̂‖² > 2); the autodiff form on the latter.
READ_WEIGHT_CASES = [
    ("delta_read_weights", 1.0, 0.4),
    ("delta_read_weights", 3.0, 0.6),
    ("delta_read_weights_autodiff", 3.0, 0.6),
]


@pytest.mark.parametrize("form, beta_scale, key_scale", READ_WEIGHT_CASES)
def test_delta_read_weights_and_their_vjp_match_the_definition(form, beta_scale, key_scale):
    """The back substitution equals the definition (float64), and so does its VJP (hand-written
    or autodiff) for random cotangents, w.r.t. q̂, k̂ and β."""
    rng = np.random.default_rng(0)
    b, q, length, k = 2, 3, 13, 5
    with enable_x64(True):
        fq = jnp.asarray(rng.normal(size=(b, q, k)))
        fk = jnp.asarray(rng.normal(size=(b, length, k)) * key_scale)
        beta = jnp.asarray(rng.uniform(0.05, 1.0, size=(b, length)) * beta_scale)
        r_bar = jnp.asarray(rng.normal(size=(b, q, length)))
        ours, pullback = jax.vjp(getattr(readout_lib, form), fq, fk, beta)
        ref, ref_pullback = jax.vjp(_read_weights_definition, fq, fk, beta)
        assert_close(ours, ref)
        for x, y in zip(pullback(r_bar), ref_pullback(r_bar), strict=True):
            assert float(jnp.max(jnp.abs(y))) > 1e-3  # a non-trivial comparison
            assert_close(x, y)


def test_delta_read_weights_vjp_float32_for_the_grids_keys():
    """float32, sum-normalised DPFP keys over a long sequence (the grids' contractive writes):
    the hand-written VJP against the float64 definition; and which form each normalisation
    gets (the hand-written one only where every write is a contraction)."""
    rng = np.random.default_rng(1)
    b, q, length, d = 2, 2, 300, 8
    fk = feature_maps.sum_norm(feature_maps.dpfp(jnp.asarray(rng.normal(size=(b, length, d))), 2))
    fq = feature_maps.sum_norm(feature_maps.dpfp(jnp.asarray(rng.normal(size=(b, q, d))), 2))
    beta = jax.nn.sigmoid(jnp.asarray(rng.normal(size=(b, length)), jnp.float32))
    r_bar = jnp.asarray(rng.normal(size=(b, q, length)), jnp.float32)
    args = (fq.astype(jnp.float32), fk.astype(jnp.float32), beta)
    grads = jax.vjp(readout_lib.delta_read_weights, *args)[1](r_bar)
    with enable_x64(True):
        args64 = [jnp.asarray(np.asarray(x), jnp.float64) for x in args]
        ref = jax.vjp(_read_weights_definition, *args64)[1](jnp.asarray(r_bar, jnp.float64))
    for x, y in zip(grads, ref, strict=True):
        assert_close(x, y, dtype=jnp.float32)

    def contractive(kind, norm):
        fm = FeatureMap(kind, num_features=4 if kind is FeatureMapKind.FAVOR_PLUS else None)
        return readout_lib.contractive_writes(fm, norm)

    assert contractive(FeatureMapKind.DPFP, Normalization.SUM)
    assert contractive(FeatureMapKind.FAVOR_PLUS, Normalization.SUM)
    assert contractive(FeatureMapKind.IDENTITY, Normalization.L2)
    assert not contractive(FeatureMapKind.IDENTITY, Normalization.SUM)  # signed: ‖k̂‖ unbounded
    assert not contractive(FeatureMapKind.ELU_P1, Normalization.ATTENTION)  # β' = β·d
    assert not contractive(FeatureMapKind.ELU_P1, Normalization.NONE)


def test_bad_inputs_are_named():
    q, k, values, beta = _inputs()
    fm = FeatureMap(FeatureMapKind.DPFP, nu=1)
    with pytest.raises(ValueError, match="needs beta"):
        retrieval_readout(q, k, values, num_values=V, feature_map=fm)
    with pytest.raises(ValueError, match="beta is used by the delta rule only"):
        retrieval_readout(q, k, values, beta, num_values=V, feature_map=fm, update_rule="sum")
    with pytest.raises(ValueError, match="values must be int"):
        retrieval_readout(q, k, values.astype(jnp.float32), beta, num_values=V, feature_map=fm)
    with pytest.raises(ValueError, match="must match in B and D"):
        retrieval_readout(q[..., :2], k, values, beta, num_values=V, feature_map=fm)
    with pytest.raises(ValueError, match="num_values=0"):
        retrieval_readout(q, k, values, beta, num_values=0, feature_map=fm)
    with pytest.raises(ValueError, match="must be SUM or DELTA"):
        retrieval_readout(
            q, k, values, beta, num_values=V, feature_map=fm, update_rule="gated_delta"
        )
