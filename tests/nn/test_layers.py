"""NNX layers and models: shapes, state API (decode == parallel, carry == concatenation),
parameter counts, every φ × rule × normalisation, dtype policy, config validation."""

import importlib
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from fwjax.nn import (
    PAPER_RECIPE,
    AttentionKind,
    FastWeightAttention,
    FastWeightConfig,
    FavorProjection,
    ModelConfig,
    NormPosition,
    RetrievalConfig,
    RetrievalModel,
    TransformerLM,
    generate,
    redraw_favor_projections,
)
from fwjax.ops import FeatureMap, FeatureMapKind, Impl, Normalization, UpdateRule
from tests.tolerances import assert_close

FEATURE_MAPS = (
    FeatureMap(FeatureMapKind.ELU_P1),
    FeatureMap(FeatureMapKind.DPFP, nu=2),
    FeatureMap(FeatureMapKind.FAVOR_PLUS, num_features=8),
)


def _lm(**kw):
    cfg = ModelConfig(vocab_size=17, d_model=16, num_layers=2, num_heads=2, d_ff=24, **kw)
    return TransformerLM(cfg, rngs=nnx.Rngs(0))


def _tokens(b=2, t=11, vocab=17, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, size=(b, t)), jnp.int32)


def test_given_a_fast_weight_layer_when_called_then_shapes_follow_the_legend():
    layer = FastWeightAttention(FastWeightConfig(), d_model=12, num_heads=3, rngs=nnx.Rngs(0))
    y, state = layer(jnp.ones((2, 5, 12)))
    assert y.shape == (2, 5, 12)
    assert state.memory.fast_weights.shape == (2, 3, 4, 4)
    assert state.memory.fast_weights.dtype == jnp.float32


def test_given_an_lm_when_called_then_logits_are_float32_per_token():
    model = _lm()
    logits, state = model(_tokens())
    assert logits.shape == (2, 11, 17) and logits.dtype == jnp.float32
    assert int(state.position) == 11


LM_VARIANTS = {
    "delta_sum_norm": {},
    "linear_attention": dict(
        fast_weight=FastWeightConfig(
            update_rule=UpdateRule.SUM, normalization=Normalization.ATTENTION
        )
    ),
    "deltanet_extras": dict(
        fast_weight=FastWeightConfig(
            feature_map=FeatureMap(FeatureMapKind.IDENTITY),
            normalization=Normalization.NONE,
            short_conv=True,
            silu_l2_qk=True,
            output_norm=True,
        ),
        norm_position=NormPosition.PRE,
    ),
    "favor_chunked": dict(
        fast_weight=FastWeightConfig(
            feature_map=FeatureMap(FeatureMapKind.FAVOR_PLUS, num_features=8),
            impl=Impl.CHUNKED,
            chunk_size=4,
        )
    ),
    "gated_delta_l2": dict(
        fast_weight=FastWeightConfig(
            feature_map=FeatureMap(FeatureMapKind.IDENTITY),
            normalization=Normalization.L2,
            update_rule=UpdateRule.GATED_DELTA,
            impl=Impl.CHUNKED,
            chunk_size=4,
        )
    ),
    "hybrid_softmax_positional": dict(
        layer_kinds=(AttentionKind.FAST_WEIGHT, AttentionKind.SOFTMAX), positional=True, max_len=32
    ),
}


@pytest.mark.parametrize("variant", LM_VARIANTS, ids=str)
def test_decoding_one_token_at_a_time_reproduces_the_parallel_forward(variant):
    model = _lm(**LM_VARIANTS[variant])
    tokens = _tokens()
    parallel, _ = model(tokens, model.init_state(2))
    step = nnx.jit(lambda m, tok, s: m(tok, s))
    state, outs = model.init_state(2), []
    for t in range(tokens.shape[1]):
        logits, state = step(model, tokens[:, t : t + 1], state)
        outs.append(logits)
    assert_close(jnp.concatenate(outs, axis=1), parallel)


@pytest.mark.parametrize("variant", [v for v in LM_VARIANTS if "softmax" not in v], ids=str)
def test_two_segments_with_carried_state_equal_their_concatenation(variant):
    model = _lm(**LM_VARIANTS[variant])
    tokens = _tokens(t=13)
    whole, _ = model(tokens)
    first, state = model(tokens[:, :6])
    second, _ = model(tokens[:, 6:], state)
    assert_close(jnp.concatenate([first, second], axis=1), whole)


def test_gated_layer_has_a_decay_gate_per_head():
    cfg = FastWeightConfig(normalization=Normalization.L2, update_rule=UpdateRule.GATED_DELTA)
    layer = FastWeightAttention(cfg, d_model=8, num_heads=2, rngs=nnx.Rngs(0))
    assert layer.qkvb.kernel.shape == (8, 3 * 8 + 2 * 2)  # q, k, v, then β and α logits
    assert layer.gate_bias.shape == (2,)
    with pytest.raises(ValueError, match="GATED_DELTA has no attention normalisation"):
        FastWeightConfig(normalization=Normalization.ATTENTION, update_rule="gated_delta")


def test_parameter_count_formula():
    v, d, layers, heads, ff = 17, 16, 2, 2, 24
    model = _lm()
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    attention = d * (3 * d + heads) + d * d  # qkvβ projection + output projection, no biases
    block = attention + (d * ff + ff + ff * d + d) + 2 * 2 * d  # feed-forward + 2 LayerNorms
    embeddings = v * d + 2048 * d  # tokens + learned positions (max_len 2048, the default)
    final_norm = 2 * d  # pre-LN (the default) ends with a LayerNorm
    assert n_params == embeddings + layers * block + final_norm + d * v  # + untied head
    paper = _lm(**dict(PAPER_RECIPE, dropout=0.0))  # post-LN, sinusoidal positions
    assert sum(x.size for x in jax.tree.leaves(nnx.state(paper, nnx.Param))) == (
        v * d + layers * block + d * v
    )
    tied = _lm(tie_embeddings=True)
    assert sum(x.size for x in jax.tree.leaves(nnx.state(tied, nnx.Param))) == n_params - d * v


@pytest.mark.parametrize(
    ("fm", "norm", "rule"),
    # The gated rule is covered by LM_VARIANTS (decode, carry) and its own op tests.
    list(itertools.product(FEATURE_MAPS, Normalization, (UpdateRule.SUM, UpdateRule.DELTA))),
    ids=lambda x: getattr(x, "value", getattr(getattr(x, "kind", None), "value", None)),
)
def test_every_feature_map_rule_and_normalization_trains_without_nan(fm, norm, rule):
    cfg = FastWeightConfig(feature_map=fm, normalization=norm, update_rule=rule)
    layer = FastWeightAttention(cfg, d_model=8, num_heads=2, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 8)), jnp.float32)

    def loss(layer):
        y, _ = layer(x)
        return jnp.mean(y**2)

    value, grads = nnx.value_and_grad(loss)(layer)
    assert np.isfinite(float(value))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_dtype_policy_bf16_compute_fp32_params_and_state():
    model = _lm(dtype="bfloat16")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    logits, state = model(_tokens())
    assert logits.dtype == jnp.float32
    assert state.layers[0].memory.fast_weights.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize(
    "dtype, param_dtype", [("float32", "bfloat16"), ("bfloat16", "float32")], ids=str
)
def test_parameters_are_stored_in_param_dtype_and_computed_in_dtype(dtype, param_dtype):
    fw = FastWeightConfig(
        feature_map=FeatureMap(FeatureMapKind.IDENTITY),
        normalization=Normalization.L2,
        update_rule=UpdateRule.GATED_DELTA,
        short_conv=True,
        output_norm=True,
    )
    kw = dict(layer_kinds=(AttentionKind.FAST_WEIGHT, AttentionKind.SOFTMAX), max_len=16)

    def build_and_run():  # traced only (jax.eval_shape): dtypes without computing
        model = _lm(fast_weight=fw, dtype=dtype, param_dtype=param_dtype, **kw)
        x = jnp.ones((2, 5, 16), jnp.float32)
        ys = [(b.attention(x)[0], b.ff(x)) for b in model.blocks]
        return nnx.to_pure_dict(nnx.state(model, nnx.Param)), ys, model(_tokens())

    params, ys, (logits, state) = jax.eval_shape(build_and_run)
    flat = traverse_util.flatten_dict(params)
    # Every kind of parameter: projections, embeddings, norms, the conv kernel, the gate bias.
    assert {"kernel", "embedding", "scale", "bias", "conv", "gate_bias"} <= {p[-1] for p in flat}
    assert {v.dtype for v in flat.values()} == {jnp.dtype(param_dtype)}
    # Computed in dtype, whatever the parameters' dtype.
    assert {y.dtype for y in jax.tree.leaves(ys)} == {jnp.dtype(dtype)}
    assert logits.dtype == jnp.float32
    assert state.layers[0].memory.fast_weights.dtype == jnp.float32


def test_parameters_carry_logical_axis_names():
    model = _lm()
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
    names = {n for spec in jax.tree.leaves(specs, is_leaf=is_spec) if is_spec(spec) for n in spec}
    assert {"embed", "heads", "mlp", "vocab"} <= names


def test_favor_projection_is_not_trainable_and_redraws():
    model = _lm(**LM_VARIANTS["favor_chunked"])
    assert not any(x.shape == (8, 8) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    before = [x.copy() for x in jax.tree.leaves(nnx.state(model, FavorProjection))]
    assert len(before) == 2
    redraw_favor_projections(model, jax.random.key(1))
    after = jax.tree.leaves(nnx.state(model, FavorProjection))
    assert all(not np.allclose(a, b) for a, b in zip(after, before, strict=True))


# Slow (25 s): decoding is covered by the step-by-step decode tests and the CLI generate test.
@pytest.mark.slow
def test_greedy_generation_matches_repeated_parallel_forward():
    model = _lm(**LM_VARIANTS["hybrid_softmax_positional"])
    prompt = _tokens(t=4)
    out = generate(model, prompt, 5, key=jax.random.key(0), temperature=0.0)
    assert out.shape == (2, 9)
    seq = prompt
    for _ in range(5):
        logits, _ = model(seq)
        seq = jnp.concatenate([seq, jnp.argmax(logits[:, -1], -1)[:, None].astype(seq.dtype)], 1)
    np.testing.assert_array_equal(out, seq)


def test_generate_compiles_once_per_settings_and_leaves_the_model_mode_alone():
    from fwjax.nn.transformer import _sample

    kw = dict(dropout=0.5, max_len=24)  # settings no other test samples with
    model, prompt, key = _lm(**kw), _tokens(t=3), jax.random.key(0)
    before = _sample._cache_size()
    first = generate(model, prompt, 4, key=key, temperature=0.0)
    assert _sample._cache_size() == before + 1
    assert not model.blocks[0].dropout.deterministic  # still in training mode
    again = generate(model, prompt, 4, key=jax.random.key(1), temperature=0.0)
    other = TransformerLM(model.config, rngs=nnx.Rngs(1))  # same structure, other parameters
    generate(other, _tokens(t=3, seed=1), 4, key=key, temperature=0.0)
    # Flax 0.12.0 (the floor) gives each instance a graphdef of its own: one compilation more.
    own = int(nnx.split(other)[0] != nnx.split(model)[0])
    model.eval()
    in_eval = generate(model, prompt, 4, key=key, temperature=0.0)
    assert model.blocks[0].dropout.deterministic  # still in eval mode
    assert _sample._cache_size() == before + 1 + own  # no recompilation
    # Sampling is in eval mode whatever the model's mode: greedy decoding is deterministic.
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, in_eval)
    generate(model, prompt, 4, key=key, temperature=1.0)  # other sampling settings compile
    assert _sample._cache_size() == before + 2 + own


def test_sampling_with_top_k_only_draws_from_the_top_k():
    model = _lm()
    out = generate(model, _tokens(t=3), 6, key=jax.random.key(0), temperature=1.0, top_k=1)
    greedy = generate(model, _tokens(t=3), 6, key=jax.random.key(1), temperature=0.0)
    np.testing.assert_array_equal(out, greedy)


@pytest.mark.parametrize("attention", list(AttentionKind), ids=lambda a: a.value)
@pytest.mark.parametrize("rule", [UpdateRule.SUM, UpdateRule.DELTA], ids=lambda r: r.value)
def test_retrieval_model_shapes_and_gradients(attention, rule):
    cfg = RetrievalConfig(
        num_keys=10,
        num_values=10,
        d_key=16,
        attention=attention,
        fast_weight=FastWeightConfig(feature_map=FeatureMap("dpfp"), update_rule=rule),
    )
    model = RetrievalModel(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    keys = jnp.asarray(rng.permutation(10)[None].repeat(3, 0), jnp.int32)
    values = jnp.asarray(rng.integers(0, 10, size=(3, 10)), jnp.int32)

    def loss(model):
        pred = model(keys, values, keys[:, :4])
        target = jax.nn.one_hot(values[:, :4], 10)
        return 0.5 * jnp.mean(jnp.sum((target - pred) ** 2, -1)), pred

    (value, pred), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    assert pred.shape == (3, 4, 10)
    assert np.isfinite(float(value))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("norm", [Normalization.L2, Normalization.ATTENTION])
def test_a_split_state_scan_gives_the_layer_the_same_outputs_and_gradients(norm, monkeypatch):
    """``FastWeightConfig.state_segments`` reaches the delta rule's CHUNKED form (both the
    plain and the attention-normalised delta rule) and changes nothing but rounding."""
    chunked = importlib.import_module("fwjax.ops.delta_rule.chunked")
    split = []
    scan = chunked.segmented_scan
    monkeypatch.setattr(
        chunked,
        "segmented_scan",
        lambda *a, **kw: split.append((a[5], kw.get("reverse", False))) or scan(*a, **kw),
    )
    jax.clear_caches()  # trace the ops again, through the spy
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 29, 8)), jnp.float32)
    results = []
    for segments in (None, 3):
        cfg = FastWeightConfig(
            normalization=norm, impl=Impl.CHUNKED, chunk_size=4, state_segments=segments
        )
        layer = FastWeightAttention(cfg, d_model=8, num_heads=2, rngs=nnx.Rngs(0))
        loss = lambda m: jnp.sum(jnp.sin(m(x)[0]))
        results.append(nnx.value_and_grad(loss)(layer))
    assert {(3, False), (3, True)} <= set(split)  # forward and backward scans, 3 segments
    got, expected = (jax.tree.leaves(r) for r in results)
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert_close(g, e)


def test_config_validation_names_the_values():
    with pytest.raises(ValueError, match="num_heads=3 must divide d_model=16"):
        ModelConfig(d_model=16, num_heads=3)
    with pytest.raises(ValueError, match="layer_kinds has 1 entries"):
        ModelConfig(num_layers=2, layer_kinds=("softmax",))
    with pytest.raises(ValueError, match="dropout"):
        ModelConfig(dropout=1.5)
    with pytest.raises(ValueError, match="param_dtype='int32' must name a floating-point"):
        ModelConfig(param_dtype="int32")
    with pytest.raises(ValueError, match="dtype='bogus'"):
        ModelConfig(dtype="bogus")
    with pytest.raises(ValueError, match="nu"):
        FastWeightConfig(feature_map=FeatureMap(FeatureMapKind.DPFP, nu=0))
    with pytest.raises(ValueError, match="num_features"):
        FastWeightConfig(feature_map=FeatureMap(FeatureMapKind.FAVOR_PLUS, num_features=0))
    with pytest.raises(ValueError, match="'bogus'"):
        FastWeightConfig(normalization="bogus")
    with pytest.raises(ValueError, match="state_segments=0"):
        FastWeightConfig(state_segments=0)
    with pytest.raises(ValueError, match="num_keys=0"):
        RetrievalConfig(num_keys=0, num_values=3)
    with pytest.raises(ValueError, match="d_embed=0"):
        RetrievalConfig(num_keys=3, num_values=3, d_embed=0)
    with pytest.raises(ValueError, match="use_bias='yes'"):
        RetrievalConfig(num_keys=3, num_values=3, use_bias="yes")
    with pytest.raises(ValueError, match="tie_queries=1"):
        RetrievalConfig(num_keys=3, num_values=3, tie_queries=1)
    with pytest.raises(ValueError, match="embed_factor=0"):
        RetrievalConfig(num_keys=3, num_values=3, embed_factor=0)
    assert RetrievalConfig(num_keys=3, num_values=3, d_key=8).d_embed == 8  # None: d_key
    assert ModelConfig(layer_kinds=("softmax", "fast_weight")).layer_kinds[0] is (
        AttentionKind.SOFTMAX
    )


def test_dropout_is_random_in_training_and_off_in_eval():
    model = _lm(dropout=0.5)
    tokens = _tokens()
    a, _ = model(tokens)
    b, _ = model(tokens)
    assert not np.allclose(a, b)
    model.eval()
    c, _ = model(tokens)
    d, _ = model(tokens)
    np.testing.assert_array_equal(c, d)
