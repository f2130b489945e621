"""The recurrent and self-referential fast weight programmer layers in a language model: a
window split in two with the state carried gives the whole window's logits, and gradients reach
the layers' own slow weights; the Delta RNN / LSTM's chunkwise feed-forward part equals its
reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fwjax.nn import FastWeightConfig, ModelConfig, TransformerLM

SIZES = dict(vocab_size=11, d_model=16, num_layers=2, num_heads=2, d_ff=16)


@pytest.mark.parametrize(
    ("kind", "weight", "shape"),
    [
        ("recurrent_delta", "r_q", (2, 8, 8)),
        ("srwm", "w_b", (2, 8, 4)),
        ("delta_rnn", "proj.kernel", (16, 2 * (5 * 8 + 2))),
        ("delta_lstm", "proj.kernel", (16, 3 * 2 * (5 * 8 + 2))),
    ],
)
def test_a_language_model_carries_the_layer_state(kind, weight, shape):
    config = ModelConfig(**SIZES, layer_kinds=(kind,) * 2, positional="none")
    model = TransformerLM(config, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 11)
    call = nnx.jit(lambda m, tokens, state: m(tokens, state))
    whole, _ = call(model, tokens, model.init_state(2))
    first, state = call(model, tokens[:, :4], model.init_state(2))
    second, _ = call(model, tokens[:, 4:], state)
    np.testing.assert_allclose(jnp.concatenate([first, second], 1), whole, rtol=2e-5, atol=2e-5)
    grads = nnx.jit(nnx.grad(lambda m: jnp.mean(m(tokens)[0] ** 2)))(model)
    g = functools.reduce(
        lambda node, key: node[key], weight.split("."), grads["blocks"][0]["attention"]
    )
    g = g[...]
    assert g.shape == shape and float(jnp.abs(g).sum()) > 0


# The Delta LSTM: its three gates' Delta Nets run as 3·H heads of one call (the Delta RNN's one
# gate is the same code with G = 1).
@pytest.mark.parametrize("kind", ["delta_lstm"])
def test_the_chunked_feed_forward_part_equals_the_reference(kind):
    tokens = jax.random.randint(jax.random.key(1), (2, 13), 0, 11)
    logits = {}
    for impl in ("reference", "chunked"):
        fw = FastWeightConfig(impl=impl, chunk_size=4)
        config = ModelConfig(**SIZES, layer_kinds=(kind,) * 2, positional="none", fast_weight=fw)
        logits[impl], _ = TransformerLM(config, rngs=nnx.Rngs(0))(tokens)
    np.testing.assert_allclose(logits["chunked"], logits["reference"], rtol=2e-5, atol=2e-5)
