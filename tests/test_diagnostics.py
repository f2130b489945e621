"""Memory diagnostics: the replay matches the ops, and the statistics mean what they say."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fwjax import diagnostics
from fwjax.nn import FastWeightAttention, FastWeightConfig
from fwjax.ops import (
    FeatureMap,
    Impl,
    Normalization,
    UpdateRule,
    delta_rule,
    fast_weight_attention,
    memory_keys,
    sum_rule,
)
from tests.tolerances import assert_close

B, T, H, D, V = 2, 11, 2, 4, 3


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    q, k = (jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.normal(size=(B, T, H, V)), jnp.float32)
    beta = jnp.asarray(rng.uniform(0.1, 0.9, size=(B, T, H)), jnp.float32)
    alpha = jnp.asarray(rng.uniform(0.6, 1.0, size=(B, T, H)), jnp.float32)
    return q, k, v, beta, alpha


@pytest.mark.parametrize(
    ("rule", "norm"),
    [
        (UpdateRule.SUM, Normalization.SUM),
        (UpdateRule.DELTA, Normalization.SUM),
        (UpdateRule.DELTA, Normalization.ATTENTION),
        (UpdateRule.GATED_DELTA, Normalization.L2),
    ],
    ids=lambda x: x.value,
)
def test_replay_ends_in_the_ops_final_state(rule, norm):
    q, k, v, beta, alpha = _inputs()
    fm = FeatureMap()
    b = None if rule is UpdateRule.SUM else beta
    a = alpha if rule is UpdateRule.GATED_DELTA else None
    _, state = fast_weight_attention(
        q, k, v, b, feature_map=fm, normalization=norm, update_rule=rule, alpha=a,
        impl=Impl.RECURRENT,
    )  # fmt: skip
    trace, final = diagnostics.memory_trace(
        memory_keys(k, fm, norm), v, b, a, attention_normalized=norm.uses_normalizer
    )
    assert_close(final, state.fast_weights)
    assert trace.state_norm.shape == (B, T, H)
    assert_close(trace.state_norm[:, -1], jnp.sqrt(jnp.sum(final**2, axis=(-2, -1))))


def test_retrieval_contrast_of_a_rewritten_key():
    """(k, v1) then (k, v2) with unit k and β = 1: the second write sees v̄ = v1 (delta) or v1
    (sum); after it the delta memory holds v2, the sum memory v1 + v2."""
    rng = np.random.default_rng(1)
    key = rng.normal(size=4)
    key /= np.linalg.norm(key)
    v1, v2 = rng.normal(size=(2, 3))
    k = jnp.asarray(np.stack([key, key])[None, :, None], jnp.float32)
    v = jnp.asarray(np.stack([v1, v2])[None, :, None], jnp.float32)
    beta = jnp.ones((1, 2, 1), jnp.float32)
    for b, stored in ((beta, v2), (None, v1 + v2)):
        trace, final = diagnostics.memory_trace(k, v, b)
        assert_close(trace.retrieval_error[0, :, 0], [np.linalg.norm(v1), np.linalg.norm(v2 - v1)])
        cos = v1 @ v2 / np.linalg.norm(v1) / np.linalg.norm(v2)
        assert_close(trace.retrieval_cosine[0, :, 0], [0.0, cos])
        assert_close(final[0, 0].T @ key, stored)


@pytest.mark.parametrize("attention", [False, True])
@pytest.mark.parametrize("rule", [UpdateRule.SUM, UpdateRule.DELTA], ids=lambda x: x.value)
def test_replay_records_every_state_and_the_read_after_each_write(rule, attention):
    q, k, v, beta, _ = _inputs(4)
    fk = memory_keys(k, FeatureMap(), Normalization.SUM)  # positive keys: z·k > 0
    b = None if rule is UpdateRule.SUM else beta
    rng = np.random.default_rng(5)
    s0 = jnp.asarray(rng.normal(size=(B, H, D, V)), jnp.float32)
    z0 = jnp.asarray(rng.uniform(0.5, 1.0, size=(B, H, D)), jnp.float32)
    r = diagnostics.replay_writes(
        fk, v, b, initial_state=s0, initial_normalizer=z0, attention_normalized=attention,
        read_after=True, keep_states=True,
    )  # fmt: skip
    assert r.states.shape == (B, T, H, D, V)
    if rule is UpdateRule.SUM or not attention:  # the ops' delta rule reads v̄ undivided
        # Every S_t is the ops' memory: the read S_tᵀq_t is the ops' output at step t.
        args = (q, fk, v) if b is None else (q, fk, v, b)
        out, _ = (sum_rule if b is None else delta_rule)(*args, s0, impl=Impl.RECURRENT)
        assert_close(jnp.einsum("bthkv,bthk->bthv", r.states, q), out)
    assert_close(r.final_state, r.states[:, -1])
    z = z0[:, None] + jnp.cumsum(fk, axis=1)  # z_t [B, T, H, K]
    assert_close(r.final_normalizer, z[:, -1])
    # The reads before and after each write, by hand from the recorded states.
    prev = jnp.concatenate([s0[:, None], r.states[:, :-1]], axis=1)
    prev_z = jnp.concatenate([z0[:, None], z[:, :-1]], axis=1)
    for states, zs, got in ((prev, prev_z, r.retrieved), (r.states, z, r.read_after)):
        d = jnp.sum(zs * fk, -1, keepdims=True) if attention else 1.0
        assert_close(got, jnp.einsum("bthkv,bthk->bthv", states, fk) / d)
    assert_close(r.state_norm, jnp.sqrt(jnp.sum(r.states**2, axis=(-2, -1))))
    lean = diagnostics.replay_writes(fk, v, b, initial_state=s0)
    assert lean.read_after is None and lean.states is None


def test_effective_rank():
    rng = np.random.default_rng(2)
    u, w = rng.normal(size=(2, 5))
    rank_one = jnp.asarray(np.outer(u, w), jnp.float32)
    assert_close(diagnostics.effective_rank(rank_one), 1.0)
    assert_close(diagnostics.effective_rank(jnp.eye(4)), 4.0)
    assert float(diagnostics.effective_rank(jnp.zeros((3, 3)))) == 0.0


@pytest.mark.parametrize("enabled", [True, False])
def test_layers_sow_per_head_statistics_only_when_enabled(enabled):
    cfg = FastWeightConfig(update_rule=UpdateRule.DELTA, diagnostics=enabled)
    layer = FastWeightAttention(cfg, d_model=8, num_heads=2, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 8)), jnp.float32)
    layer(x)  # not captured: nothing is computed or stored
    assert not nnx.state(layer, nnx.Intermediate)
    _, sown = nnx.capture(layer, nnx.Intermediate)(x)
    sown = nnx.to_pure_dict(sown)
    if not enabled:
        assert not sown
        return
    (stats,) = sown["memory"]
    assert set(stats) == {
        "state_norm_final", "state_norm_max", "retrieval_error", "retrieval_cosine",
        "effective_rank", "beta_mean", "beta_std",
    }  # fmt: skip
    assert all(v.shape == (2,) and bool(jnp.all(jnp.isfinite(v))) for v in stats.values())
    assert bool(jnp.all((stats["beta_mean"] > 0) & (stats["beta_mean"] < 1)))


def test_carried_memory_norms_of_layer_states():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 6, 8)), jnp.float32)
    states = []
    for norm in (Normalization.ATTENTION, Normalization.ATTENTION):
        cfg = FastWeightConfig(update_rule=UpdateRule.SUM, normalization=norm)
        layer = FastWeightAttention(cfg, d_model=8, num_heads=2, rngs=nnx.Rngs(len(states)))
        states.append(layer(x, layer.init_state(2))[1])
    out = diagnostics.carried_memory_norms(states)
    assert out["state_norm"].shape == out["normalizer_norm"].shape == (2, 2, 2)
    for i, st in enumerate(states):
        s, z = np.asarray(st.memory.fast_weights), np.asarray(st.memory.normalizer)
        assert_close(out["state_norm"][i], np.sqrt((s**2).sum(axis=(-2, -1))))
        assert_close(out["normalizer_norm"][i], np.linalg.norm(z, axis=-1))
    # The key accumulator of 6 positive feature vectors is far from zero; the memory is not.
    assert bool(jnp.all(out["normalizer_norm"] > 0)) and bool(jnp.all(out["state_norm"] > 0))
    # An empty memory without a normaliser: zero norms, no normaliser key.
    cfg = FastWeightConfig(update_rule=UpdateRule.DELTA, normalization=Normalization.L2)
    l2_layer = FastWeightAttention(cfg, d_model=8, num_heads=2, rngs=nnx.Rngs(0))
    empty = l2_layer.init_state(3)
    out = diagnostics.carried_memory_norms([empty, None])
    assert set(out) == {"state_norm"} and out["state_norm"].shape == (1, 3, 2)
    assert float(jnp.max(out["state_norm"])) == 0.0
    with pytest.raises(ValueError, match="normalisers"):
        diagnostics.carried_memory_norms([states[0], l2_layer.init_state(2)])
