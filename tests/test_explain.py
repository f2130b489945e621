"""fwjax.explain: the notebook helpers agree with the ops they explain."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fwjax import explain
from fwjax.nn import FastWeightConfig, ModelConfig, TransformerLM
from fwjax.ops import (
    FeatureMap,
    FeatureMapKind,
    Normalization,
    UpdateRule,
    delta_rule,
    feature_maps,
    sum_rule,
)


def _head(seed, t=12, d=6, dv=5):
    kq, kk, kv, kb = jax.random.split(jax.random.key(seed), 4)
    q = feature_maps.sum_norm(feature_maps.dpfp(jax.random.normal(kq, (t, d))))
    k = feature_maps.sum_norm(feature_maps.dpfp(jax.random.normal(kk, (t, d))))
    v = jax.random.normal(kv, (t, dv))
    beta = jax.nn.sigmoid(jax.random.normal(kb, (t,)))
    return q, k, v, beta


def _batched(*xs):
    return tuple(x[None, :, None] for x in xs)


def test_linear_attention_matrix_equals_the_sum_rule():
    q, k, v, _ = _head(0)
    out, state = sum_rule(*_batched(q, k, v))
    a = explain.linear_attention_matrix(q, k)
    assert np.allclose(np.triu(np.asarray(a), 1), 0)
    np.testing.assert_allclose(a @ v, out[0, :, 0], rtol=1e-5, atol=1e-6)
    snaps = explain.fast_weight_snapshots(k, v)
    np.testing.assert_allclose(snaps[-1], state[0, 0], rtol=1e-5, atol=1e-6)
    # o_t = S_tᵀ q_t: every snapshot is the memory read at step t.
    np.testing.assert_allclose(
        jnp.einsum("tkv,tk->tv", snaps, q), out[0, :, 0], rtol=1e-5, atol=1e-6
    )


def test_delta_rule_attention_matrix_equals_the_delta_rule():
    q, k, v, beta = _head(1)
    out, state = delta_rule(*_batched(q, k, v), beta[None, :, None])
    a = explain.delta_rule_attention_matrix(q, k, beta)
    assert np.allclose(np.triu(np.asarray(a), 1), 0)
    np.testing.assert_allclose(a @ v, out[0, :, 0], rtol=1e-4, atol=1e-6)
    snaps = explain.fast_weight_snapshots(k, v, beta)
    np.testing.assert_allclose(snaps[-1], state[0, 0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        jnp.einsum("tkv,tk->tv", snaps, q), out[0, :, 0], rtol=1e-4, atol=1e-6
    )
    # It is not linear attention: the delta rule subtracts what similar keys stored.
    assert not np.allclose(a, explain.linear_attention_matrix(q, k), atol=1e-3)


def test_snapshots_from_an_initial_state():
    _, k, v, beta = _head(2)
    s0 = jax.random.normal(jax.random.key(3), (k.shape[1], v.shape[1]))
    _, state = delta_rule(*_batched(k, k, v), beta[None, :, None], s0[None, None])
    snaps = explain.fast_weight_snapshots(k, v, beta, initial_state=s0)
    np.testing.assert_allclose(snaps[-1], state[0, 0], rtol=1e-4, atol=1e-5)


def test_associative_sequence_sizes_are_positive_ints():
    with pytest.raises(ValueError, match="key_dim=0 must be a positive int"):
        explain.associative_sequence(0, num_writes=4, num_keys=4, key_dim=0, value_dim=2)
    with pytest.raises(ValueError, match=r"num_writes=2\.0 must be a positive int"):
        explain.associative_sequence(0, num_writes=2.0, num_keys=4, key_dim=4, value_dim=2)


def test_recall_sum_vs_delta():
    d = 16
    # Orthonormal keys written once: both rules recall exactly.
    once = explain.associative_sequence(0, num_writes=d, num_keys=d, key_dim=d, value_dim=8)
    assert once["queries"].shape == (d, d)
    assert explain.recall_error(once, UpdateRule.SUM) < 1e-5
    assert explain.recall_error(once, UpdateRule.DELTA) < 1e-5
    # Repeated keys: the sum rule mixes old and new values, the delta rule (β = 1) replaces.
    rep = explain.associative_sequence(1, num_writes=3 * 8, num_keys=8, key_dim=d, value_dim=8)
    assert len(rep["queries"]) < len(rep["keys"])
    assert explain.recall_error(rep, UpdateRule.SUM) > 0.5
    assert explain.recall_error(rep, UpdateRule.DELTA) < 1e-5
    # Past capacity (more keys than dimensions): neither recalls exactly.
    over = explain.associative_sequence(2, num_writes=4 * d, num_keys=4 * d, key_dim=d, value_dim=8)
    assert explain.recall_error(over, UpdateRule.SUM) > 0.5
    assert explain.recall_error(over, UpdateRule.DELTA) > 0.1


def test_associative_sequence_targets_are_last_writes():
    seq = explain.associative_sequence(5, num_writes=30, num_keys=6, key_dim=4, value_dim=3)
    for q, target in zip(seq["queries"], seq["targets"], strict=True):
        written = [t for t, k in enumerate(seq["keys"]) if np.allclose(k, q)]
        np.testing.assert_array_equal(seq["values"][written[-1]], target)
    with pytest.raises(ValueError, match="num_keys"):
        explain.associative_sequence(0, num_writes=3, num_keys=0, key_dim=4, value_dim=3)


# Slow (17 s): a notebook helper; the notebooks run in CI.
@pytest.mark.slow
def test_feature_kernel():
    x = jax.random.normal(jax.random.key(0), (5, 4))
    y = jax.random.normal(jax.random.key(1), (3, 4))
    fm = FeatureMap(FeatureMapKind.DPFP, nu=2)
    got = explain.feature_kernel(fm, x, y, normalization=Normalization.SUM)
    want = feature_maps.sum_norm(fm(x)) @ feature_maps.sum_norm(fm(y)).T
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # FAVOR+ estimates exp(x·y) without bias: many features get close.
    favor = FeatureMap(FeatureMapKind.FAVOR_PLUS, num_features=4096)
    r = feature_maps.draw_favor_projection(jax.random.key(2), 4, 4096)
    xu = 0.7 * x / jnp.linalg.norm(x, axis=1, keepdims=True)  # |x·y| <= 0.49
    yu = 0.7 * y / jnp.linalg.norm(y, axis=1, keepdims=True)
    est = explain.feature_kernel(favor, xu, yu, projection=r)
    np.testing.assert_allclose(est, jnp.exp(xu @ yu.T), rtol=0.1)
    with pytest.raises(ValueError, match="normalization"):
        explain.feature_kernel(fm, x, y, normalization=Normalization.ATTENTION)


@pytest.mark.slow  # also exercised by notebook 02 in CI's notebook run
def test_capacity_sweep_one_point():
    points = []
    protocol = {"eval_every": 5, "log_every": 5, "steps_per_call": 5, "steps": 5, "batch_size": 4}
    protocol["retrieval.eval_sequences"] = 2
    fms = {"dpfp1": FeatureMap(FeatureMapKind.DPFP, nu=1)}
    result = explain.capacity_sweep(fms, [6], protocol, d_key=4, log=points.append)
    assert result == points
    (p,) = result
    assert (p.name, p.num_keys, p.d_dot, p.steps) == ("dpfp1", 6, 8, 5)
    assert math.isfinite(p.final_eval_loss) and p.final_eval_loss > 0


def _tiny_lm():
    cfg = ModelConfig(
        d_model=16, num_layers=1, num_heads=2, d_ff=32, fast_weight=FastWeightConfig()
    )
    return TransformerLM(cfg, rngs=nnx.Rngs(0))


@pytest.mark.slow  # also exercised by notebook 03 in CI's notebook run
def test_per_position_loss_carry_vs_reset():
    model = _tiny_lm()
    tokens = np.random.default_rng(0).integers(0, 256, (2, 25))
    x, y = tokens[:, :-1], tokens[:, 1:]
    carried = explain.per_position_loss(model, x, y, segment_len=8, carry=True)
    reset = explain.per_position_loss(model, x, y, segment_len=8, carry=False)
    whole = explain.per_position_loss(model, x, y, segment_len=24, carry=False)
    assert carried.shape == reset.shape == (24,)
    np.testing.assert_allclose(carried, whole, rtol=1e-4, atol=1e-5)  # carrying = one pass
    np.testing.assert_allclose(carried[:8], reset[:8], rtol=1e-5)
    assert not np.allclose(carried[8:], reset[8:], atol=1e-4)  # reset forgets the past
    # Reset segments are independent: segment 2 alone gives the same losses.
    alone = explain.per_position_loss(model, x[:, 8:16], y[:, 8:16], segment_len=8, carry=False)
    np.testing.assert_allclose(reset[8:16], alone, rtol=1e-5)
    with pytest.raises(ValueError, match="divide"):
        explain.per_position_loss(model, x, y, segment_len=7, carry=True)
