"""The small-LM recipe options of :class:`~fwjax.nn.ModelConfig`: positions (learned,
sinusoidal, rotary, none), embedding init and scale, GELU, residual init scaling, and
generation past the positions a model holds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fwjax.nn import (
    PAPER_RECIPE,
    Activation,
    ModelConfig,
    NormPosition,
    Positional,
    TransformerLM,
    generate,
    rotary_embedding,
)

SMALL = dict(vocab_size=19, d_model=16, num_layers=2, num_heads=2, d_ff=24, max_len=32)


def _lm(seed=0, **kw):
    model = TransformerLM(ModelConfig(**{**SMALL, **kw}), rngs=nnx.Rngs(seed))
    model.eval()
    return model


def _tokens(t=13, b=2, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, SMALL["vocab_size"], (b, t)))


def test_defaults_are_the_gpt2_recipe_and_the_paper_recipe_is_explicit():
    cfg = ModelConfig()
    assert cfg.norm_position is NormPosition.PRE and cfg.positional is Positional.LEARNED
    assert (cfg.embed_init_std, cfg.embed_scale, cfg.dropout) == (0.02, False, 0.0)
    assert cfg.activation is Activation.GELU and cfg.scale_residual_init
    paper = ModelConfig(**PAPER_RECIPE)
    assert paper.norm_position is NormPosition.POST and paper.positional is Positional.SINUSOIDAL
    assert (paper.embed_init_std, paper.embed_scale, paper.dropout) == (1.0, True, 0.1)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, Positional.SINUSOIDAL), (False, Positional.NONE), ("rotary", Positional.ROTARY)],
)
def test_positional_accepts_the_old_booleans(value, expected):
    assert ModelConfig(positional=value).positional is expected


def test_bad_recipe_values_name_themselves():
    with pytest.raises(ValueError, match="embed_init_std=0"):
        ModelConfig(embed_init_std=0)
    with pytest.raises(ValueError, match="'sideways'"):
        ModelConfig(positional="sideways")
    with pytest.raises(ValueError, match="'tanh'"):
        ModelConfig(activation="tanh")


def test_rotary_needs_an_even_head_dimension():
    with pytest.raises(ValueError, match="even head dimension; got 3"):
        _lm(d_model=6, num_heads=2, positional="rotary", layer_kinds=("softmax", "softmax"))


def test_embedding_init_std_and_residual_scaling():
    a = _lm(scale_residual_init=False)
    b = _lm(scale_residual_init=True)
    assert abs(float(jnp.std(b.embed.embedding[...])) - 0.02) < 0.004
    ratio = 1 / np.sqrt(2 * SMALL["num_layers"])
    for name in ("attention", "ff"):
        pa = getattr(a.blocks[0], name)
        pb = getattr(b.blocks[0], name)
        wa = (pa.out if name == "attention" else pa.down).kernel[...]
        wb = (pb.out if name == "attention" else pb.down).kernel[...]
        np.testing.assert_allclose(wb, wa * ratio, rtol=1e-6, atol=1e-8)
    # Projections that read the residual stream keep their scale.
    np.testing.assert_array_equal(a.blocks[0].ff.up.kernel[...], b.blocks[0].ff.up.kernel[...])


def test_embed_scale_multiplies_by_sqrt_d():
    tokens = _tokens()
    plain = _lm(positional="none", embed_scale=False, num_layers=1)
    scaled = _lm(positional="none", embed_scale=True, num_layers=1)
    # Same parameters; only the input scale differs, so the outputs must differ.
    assert not np.allclose(plain(tokens)[0], scaled(tokens)[0])
    _, state = nnx.split(plain)
    nnx.update(scaled, state)
    scaled.embed.embedding[...] = plain.embed.embedding[...] / np.sqrt(SMALL["d_model"])
    np.testing.assert_allclose(plain(tokens)[0], scaled(tokens)[0], rtol=1e-5, atol=1e-5)


def test_activation_changes_the_feed_forward():
    tokens = _tokens()
    assert not np.allclose(_lm(activation="relu")(tokens)[0], _lm(activation="gelu")(tokens)[0])


@pytest.mark.parametrize(
    "kw",
    [
        dict(positional="learned"),
        dict(positional="rotary", layer_kinds=("softmax", "softmax")),
        dict(positional="rotary", layer_kinds=("fast_weight", "softmax")),
        dict(PAPER_RECIPE, dropout=0.0),
        dict(positional="learned", layer_kinds=("softmax", "fast_weight")),
    ],
    ids=["learned", "rotary", "rotary_hybrid", "paper", "learned_hybrid"],
)
def test_decoding_token_by_token_equals_the_parallel_forward(kw):
    model = _lm(**kw)
    tokens = _tokens()
    whole, _ = model(tokens)
    state, steps = model.init_state(tokens.shape[0]), []
    for t in range(tokens.shape[1]):
        logits, state = model(tokens[:, t : t + 1], state)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), whole, rtol=1e-4, atol=1e-4)


def test_learned_positions_matter_and_are_trained_parameters():
    model = _lm(positional="learned")
    tokens = jnp.full((1, 8), 3)
    logits, _ = model(tokens)
    assert not np.allclose(logits[0, 0], logits[0, -1])  # same token, other position
    params = nnx.state(model, nnx.Param)
    assert params["position_embed"]["embedding"][...].shape == (SMALL["max_len"], 16)


def test_rotary_scores_depend_only_on_the_offset():
    key_q, key_k = jax.random.split(jax.random.key(0))
    q = jax.random.normal(key_q, (1, 1, 1, 8))
    k = jax.random.normal(key_k, (1, 1, 1, 8))

    def score(pq, pk):
        rq = rotary_embedding(q, jnp.array([pq]))
        rk = rotary_embedding(k, jnp.array([pk]))
        return float(jnp.sum(rq * rk))

    assert score(5, 2) == pytest.approx(score(13, 10), rel=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 4), rel=1e-3)
    np.testing.assert_allclose(rotary_embedding(q, jnp.array([0])), q)  # position 0: identity
    norms = jnp.linalg.norm(rotary_embedding(q, jnp.array([7])))
    np.testing.assert_allclose(norms, jnp.linalg.norm(q), rtol=1e-6)  # a rotation


@pytest.mark.parametrize(
    "kw",
    [dict(positional="learned"), dict(positional="rotary", layer_kinds=("softmax", "softmax"))],
    ids=["learned", "softmax"],
)
def test_generate_crops_the_context_past_max_len(kw):
    model = _lm(**{**kw, "max_len": 12})
    prompt = _tokens(t=5, b=1)
    key = jax.random.key(0)
    short = generate(model, prompt, 7, key=key, temperature=0.0)  # fits: carried state
    long = generate(model, prompt, 20, key=key, temperature=0.0)  # past max_len: cropped
    assert long.shape == (1, 25)
    np.testing.assert_array_equal(long[:, :12], short)
    # The last token is the greedy choice given only the 12 tokens before it.
    context = long[:, -13:-1]
    logits, _ = model(context)
    assert int(long[0, -1]) == int(jnp.argmax(logits[0, -1]))


def test_generate_rejects_negative_lengths():
    with pytest.raises(ValueError, match="max_new_tokens=-1"):
        generate(_lm(), _tokens(t=3, b=1), -1, key=jax.random.key(0))
