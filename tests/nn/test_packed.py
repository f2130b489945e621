"""Packed rows through the layers and the language model: a row of several documents gives the
logits (and gradients) of its documents run alone, in fast weight, softmax and hybrid models,
with a short convolution, attention normalisation, learned positions and scanned layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fwjax.nn import FastWeightConfig, ModelConfig, TransformerLM
from fwjax.nn.attention import causal_depthwise_conv
from fwjax.ops import Normalization, UpdateRule

SMALL = dict(vocab_size=19, d_model=16, num_layers=2, num_heads=2, d_ff=24)
MODELS = {
    "delta_conv_attention_norm": dict(
        layer_kinds=("fast_weight",) * 2,
        fast_weight=FastWeightConfig(normalization=Normalization.ATTENTION, short_conv=True),
        positional="learned",
    ),
    "gated_scanned": dict(
        layer_kinds=("fast_weight",) * 2,
        fast_weight=FastWeightConfig(update_rule=UpdateRule.GATED_DELTA, short_conv=True),
        positional="sinusoidal",
        scan_layers=True,
    ),
    "hybrid_rotary": dict(
        layer_kinds=("fast_weight", "softmax"),
        fast_weight=FastWeightConfig(update_rule=UpdateRule.SUM, normalization="sum"),
        positional="rotary",
    ),
}
LENGTHS = ((4, 1, 7), (12,))  # row 0: three documents; row 1: one


def _packed(lengths=LENGTHS):
    t = sum(lengths[0])
    ids = np.stack([np.repeat(np.arange(len(row)), row) for row in lengths])
    tokens = jax.random.randint(jax.random.key(1), (len(lengths), t), 0, SMALL["vocab_size"])
    return tokens, jnp.asarray(ids, jnp.int32)


# Each document length compiles the model again: the two slowest cases (~20 s each) run with
# -m slow; the conv + attention-normalisation model stays covered by the carried-row test below.
_SLOW = {"gated_scanned", "delta_conv_attention_norm"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[pytest.mark.slow] if n in _SLOW else []) for n in MODELS]
)
def test_a_packed_row_gives_its_documents_logits_and_gradients(name):
    model = TransformerLM(ModelConfig(**SMALL, **MODELS[name]), rngs=nnx.Rngs(0))
    tokens, ids = _packed()

    def packed_loss(model):
        logits, _ = model(tokens, segment_ids=ids)
        return jnp.sum(jax.nn.log_softmax(logits)[..., 0]), logits

    def separate_loss(model):
        total, rows = 0.0, []
        for b, row in enumerate(LENGTHS):
            start, parts = 0, []
            for n in row:
                logits, _ = model(tokens[b : b + 1, start : start + n])
                total = total + jnp.sum(jax.nn.log_softmax(logits)[..., 0])
                parts.append(logits)
                start += n
            rows.append(jnp.concatenate(parts, axis=1))
        return total, jnp.concatenate(rows)

    (_, packed_logits), packed_grads = nnx.jit(nnx.value_and_grad(packed_loss, has_aux=True))(model)
    (_, logits), grads = nnx.jit(nnx.value_and_grad(separate_loss, has_aux=True))(model)
    np.testing.assert_allclose(packed_logits, logits, rtol=2e-5, atol=2e-5)
    for a, b in zip(jax.tree.leaves(packed_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_a_carried_row_continues_its_first_document_only():
    """With a carried state, the row's first document continues it (memory, conv window) and
    later documents start empty: a window split anywhere gives the same logits
    as the whole window (a window that begins at a document start is a carried row to reset:
    the language-model task does it)."""
    config = ModelConfig(**SMALL, **{**MODELS["delta_conv_attention_norm"], "positional": "none"})
    model = TransformerLM(config, rngs=nnx.Rngs(0))
    tokens, ids = _packed()
    call = nnx.jit(lambda m, tokens, state, ids: m(tokens, state, segment_ids=ids))
    whole, _ = call(model, tokens, model.init_state(2), ids)
    cut = 7  # inside document 2, after document 1 (which starts and ends in the first part)
    first, state = call(model, tokens[:, :cut], model.init_state(2), ids[:, :cut])
    second, _ = call(model, tokens[:, cut:], state, ids[:, cut:])
    np.testing.assert_allclose(
        jnp.concatenate([first, second], axis=1), whole, rtol=2e-5, atol=2e-5
    )


def test_causal_conv_never_reads_across_a_document_start():
    x = jnp.arange(1.0, 7.0)[None, :, None]  # [1, 6, 1]
    kernel = jnp.ones((3, 1))
    ids = jnp.asarray([[0, 0, 0, 1, 1, 2]])
    cache = jnp.full((1, 2, 1), 10.0)
    y, new_cache = causal_depthwise_conv(x, kernel, cache, ids)
    np.testing.assert_array_equal(y[0, :, 0], [21, 13, 6, 4, 9, 6])
    np.testing.assert_array_equal(new_cache[0, :, 0], [0, 6])  # only document 2's inputs


def test_base_conv_is_a_gated_short_convolution_with_a_residual():
    """Zoology's BaseConv: ``(conv(u) + bias) ⊙ (W u + b) + u``; with a cache it carries."""
    from fwjax.nn import BaseConv

    layer = BaseConv(6, 3, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 7, 6))
    y, _ = layer(x)
    conv, _ = causal_depthwise_conv(x, layer.kernel[...])
    expected = (conv + layer.bias[...]) * layer.projection(x) + x
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
    first, cache = layer(x[:, :4], layer.init_state(2))
    second, _ = layer(x[:, 4:], cache)
    np.testing.assert_allclose(jnp.concatenate([first, second], 1), y, rtol=1e-6, atol=1e-6)


def test_a_model_without_feed_forward_blocks():
    """``d_ff = 0``: blocks are the token mixer alone (Zoology's recall models)."""
    config = ModelConfig(**{**SMALL, "d_ff": 0}, layer_kinds=("base_conv", "softmax"))
    model = TransformerLM(config, rngs=nnx.Rngs(0))
    assert all(block.ff is None for block in model.blocks)
    logits, _ = model(jnp.zeros((1, 5), jnp.int32))
    assert logits.shape == (1, 5, SMALL["vocab_size"])
