"""Options for training at scale: layers as one ``lax.scan`` (``scan_layers``) and
rematerialisation policies (``remat``) change neither outputs nor gradients nor the carried
state, and rematerialisation saves memory in the compiled training step."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fwjax.nn import (
    AttentionKind,
    FastWeightConfig,
    ModelConfig,
    Remat,
    TransformerLM,
    generate,
)
from fwjax.nn.transformer import stack_block_states
from fwjax.ops import FeatureMap, FeatureMapKind, UpdateRule

KINDS = {
    "delta": dict(layer_kinds=("fast_weight",) * 2),
    "gated_conv": dict(
        layer_kinds=("fast_weight",) * 2,
        fast_weight=FastWeightConfig(update_rule=UpdateRule.GATED_DELTA, short_conv=True),
    ),
    "softmax": dict(layer_kinds=("softmax",) * 2),
}
SMALL = dict(vocab_size=23, d_model=16, num_layers=2, num_heads=2, d_ff=24, dropout=0.1)


def _tokens(b=2, t=11, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, SMALL["vocab_size"])


def _loss_and_grads(model, tokens, state=None):
    @nnx.jit
    def step(model, tokens, state):
        def loss(model):
            logits, new_state = model(tokens, state)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), new_state

        (value, new_state), grads = nnx.value_and_grad(loss, has_aux=True)(model)
        if not model.config.scan_layers:  # compare with scanned layers' stacked gradients
            grads = nnx.to_pure_dict(grads)
            grads["blocks"] = stack_block_states(nnx.State(b) for b in grads["blocks"].values())
        else:
            grads = nnx.to_pure_dict(grads)
        return value, grads, new_state

    first = step(model, tokens, state)
    second = step(model, tokens, state)  # dropout's RNG streams advanced by the first call
    return first, second


def _twins(config, **options):
    """An unrolled model and one with ``options`` holding the same parameters and RNG streams."""
    unrolled = TransformerLM(config, rngs=nnx.Rngs(0))
    other = TransformerLM(dataclasses.replace(config, **options), rngs=nnx.Rngs(0))
    state, pure = nnx.state(other), nnx.to_pure_dict(nnx.state(unrolled))
    if other.config.scan_layers:
        pure["blocks"] = stack_block_states(unrolled.blocks)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(other, state)
    return unrolled, other


@pytest.mark.parametrize(
    "kind, scan, remat",
    [
        ("delta", True, Remat.FAST_WEIGHT),
        # ≈ 15 s each; scanned softmax layers also decode in the default suite (below)
        pytest.param("gated_conv", True, Remat.NONE, marks=pytest.mark.slow),
        pytest.param("softmax", True, Remat.FULL, marks=pytest.mark.slow),
        pytest.param("delta", False, Remat.DOTS, marks=pytest.mark.slow),
        pytest.param("gated_conv", False, Remat.FAST_WEIGHT, marks=pytest.mark.slow),
        pytest.param("softmax", False, Remat.FAST_WEIGHT, marks=pytest.mark.slow),
    ],
)
def test_scanned_and_rematerialised_layers_equal_the_unrolled_model(kind, scan, remat):
    """Same loss, gradients and final fast weights (float32 rounding), the same dropout masks,
    and dropout's RNG streams advance between calls as in the unrolled model."""
    config = ModelConfig(**SMALL, **KINDS[kind])
    unrolled, other = _twins(config, scan_layers=scan, remat=remat)
    tokens = _tokens()
    ref_first, ref_second = _loss_and_grads(unrolled, tokens)
    first, second = _loss_and_grads(other, tokens)
    for ours, ref in ((first, ref_first), (second, ref_second)):
        np.testing.assert_allclose(ours[0], ref[0], rtol=1e-6, atol=1e-6)
        for a, b in zip(jax.tree.leaves(ours[1:]), jax.tree.leaves(ref[1:]), strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    assert float(ref_first[0]) != float(ref_second[0])  # the masks did change


def test_scanned_layers_carry_state_and_stack_their_parameters():
    """Two segments with carried fast weights (and the position counter) through scanned
    layers equal the unrolled model's; the state keeps one entry per layer; each parameter of
    the scanned blocks is one array with a leading layer axis, never sharded."""
    config = ModelConfig(**{**SMALL, "dropout": 0.0}, positional="none")
    tokens = _tokens(t=14)
    outs = []
    for model in _twins(config, scan_layers=True):
        logits1, state = model(tokens[:, :9])
        logits2, state = model(tokens[:, 9:], state)
        outs.append((logits1, logits2, state))
    (a1, a2, sa), (b1, b2, sb) = outs
    assert len(sb.layers) == config.num_layers and int(sb.position) == 14
    for x, y in zip(jax.tree.leaves((a1, a2, sa)), jax.tree.leaves((b1, b2, sb)), strict=True):
        np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6)
    scanned = TransformerLM(dataclasses.replace(config, scan_layers=True), rngs=nnx.Rngs(0))
    kernel = scanned.blocks.ff.up.kernel
    assert kernel.shape == (config.num_layers, config.d_model, config.d_ff)
    assert kernel.get_metadata()["out_sharding"] == ("layers", "embed", "mlp")


def test_scan_layers_validation():
    with pytest.raises(ValueError, match="scan_layers=True needs one attention kind"):
        ModelConfig(**SMALL, layer_kinds=("fast_weight", "softmax"), scan_layers=True)
    with pytest.raises(ValueError, match="FAVOR"):
        favor = FastWeightConfig(feature_map=FeatureMap(FeatureMapKind.FAVOR_PLUS, num_features=8))
        ModelConfig(**SMALL, scan_layers=True, fast_weight=favor)
    with pytest.raises(ValueError, match="diagnostics"):
        ModelConfig(**SMALL, scan_layers=True, fast_weight=FastWeightConfig(diagnostics=True))
    with pytest.raises(ValueError, match="'some'"):
        ModelConfig(**SMALL, remat="some")
    assert ModelConfig(**SMALL, remat="dots").remat is Remat.DOTS


def _residual_bytes(remat: Remat, kind: AttentionKind) -> int:
    """Bytes the gradient keeps from the forward pass for the backward pass (the residuals of
    ``jax.vjp``, shapes only: nothing is computed)."""
    config = ModelConfig(
        vocab_size=64, d_model=32, num_layers=2, num_heads=2, d_ff=128, layer_kinds=(kind,) * 2
    )
    model = TransformerLM(dataclasses.replace(config, remat=remat), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tokens = jnp.zeros((2, 128), jnp.int32)

    def loss(params):
        logits, _ = nnx.merge(graphdef, params, rest)(tokens)
        return jnp.mean(logits**2)

    residuals = jax.eval_shape(lambda p: jax.vjp(loss, p)[1], params)
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(residuals))


@pytest.mark.parametrize("kind", [AttentionKind.FAST_WEIGHT, AttentionKind.SOFTMAX])
def test_rematerialisation_keeps_less_for_the_backward_pass(kind):
    """FULL keeps less than DOTS, DOTS less than NONE; FAST_WEIGHT lies between FULL and NONE
    for fast weight blocks (it keeps the op's residuals) and is FULL for softmax blocks."""
    kept = {remat: _residual_bytes(remat, kind) for remat in Remat}
    assert kept[Remat.FULL] < kept[Remat.DOTS] < kept[Remat.NONE]
    if kind is AttentionKind.FAST_WEIGHT:
        assert kept[Remat.FULL] < kept[Remat.FAST_WEIGHT] < kept[Remat.NONE]
    else:
        assert kept[Remat.FAST_WEIGHT] == kept[Remat.FULL]


@pytest.mark.parametrize("kind", ["fast_weight", "softmax"])
def test_scanned_layers_decode_token_by_token_as_the_parallel_forward(kind):
    """Greedy generation carries the per-layer states (fast weights, KV caches) through the
    scanned layers inside the decoding loop; every sampled token is the parallel forward's
    argmax at its position."""
    config = ModelConfig(**{**SMALL, "dropout": 0.0}, layer_kinds=(kind,) * 2, scan_layers=True)
    model = TransformerLM(config, rngs=nnx.Rngs(0))
    model.eval()
    out = generate(model, _tokens(t=5), 6, key=jax.random.key(0), temperature=0.0)
    logits, _ = model(out[:, :-1])
    np.testing.assert_array_equal(jnp.argmax(logits[:, 4:], -1), out[:, 5:])
