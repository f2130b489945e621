"""``FastWeightConfig.pallas``: the Pallas options of a layer reach its op."""

import jax.numpy as jnp
import pytest
from flax import nnx

from fwjax.nn import FastWeightAttention, FastWeightConfig
from fwjax.ops import Impl
from fwjax.ops.pallas import PallasBackward, PallasOptions


def test_a_mapping_becomes_pallas_options_and_other_types_are_refused():
    cfg = FastWeightConfig(impl="pallas", pallas={"backward": "xla", "value_block": 16})
    assert cfg.pallas == PallasOptions(backward=PallasBackward.XLA, value_block=16)
    assert FastWeightConfig().pallas is None
    with pytest.raises(TypeError, match="pallas=3 must be a PallasOptions"):
        FastWeightConfig(pallas=3)
    with pytest.raises(ValueError, match="chunk_size=0 must be a positive int or None"):
        FastWeightConfig(chunk_size=0)


def test_the_layer_passes_its_pallas_options_to_the_op():
    x = jnp.linspace(-1.0, 1.0, 2 * 5 * 8).reshape(2, 5, 8)

    def layer(**kw):
        cfg = FastWeightConfig(chunk_size=16, **kw)
        return FastWeightAttention(cfg, d_model=8, num_heads=2, rngs=nnx.Rngs(0))

    with pytest.raises(ValueError, match="value_block=24 must"):
        layer(impl=Impl.PALLAS, pallas=PallasOptions(value_block=24))(x)
    y, _ = layer(impl=Impl.PALLAS, pallas=PallasOptions(backward=PallasBackward.XLA))(x)
    want, _ = layer(impl=Impl.CHUNKED)(x)
    assert jnp.allclose(y, want, atol=1e-5)
