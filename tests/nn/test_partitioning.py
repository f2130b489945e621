"""fwjax layers inside a host Flax model: the host's own logical axis rules compose with fwjax's
(``nnx.logical_axis_rules`` + ``nnx.get_named_sharding`` over 8 faked CPU devices), and building a
layer has no sharding side effects."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from fwjax.nn import FastWeightAttention, FastWeightConfig, FeedForward, logical_axis_rules
from fwjax.nn.partitioning import AXIS_NAMES


class Host(nnx.Module):
    """A user's model: its own projection with its own logical names around fwjax layers."""

    def __init__(self, rngs: nnx.Rngs):
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("features", "hidden"))
        self.proj = nnx.Linear(8, 16, use_bias=False, kernel_init=init, rngs=rngs)
        self.mixer = FastWeightAttention(FastWeightConfig(), 16, 4, rngs=rngs)
        self.ff = FeedForward(16, 32, 0.0, dtype=jnp.float32, rngs=rngs)

    def __call__(self, x):
        h = self.proj(x)
        y, _ = self.mixer(h)
        return self.ff(h + y)


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py fakes 8 CPU devices)")
    axis_types = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh((2, 4), ("fsdp", "tp"), axis_types=axis_types, devices=jax.devices()[:8])


def _specs(shardings):
    return {
        "/".join(map(str, path)): s.spec for path, s in nnx.to_flat_state(nnx.state(shardings))
    }


def test_a_host_models_rules_compose_with_fwjax_rules(mesh):
    rules = (("features", None), ("hidden", "fsdp"), *logical_axis_rules("tp"))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        host = Host(nnx.Rngs(0))
        shardings = nnx.get_named_sharding(nnx.state(host), mesh)
    specs = _specs(shardings)
    assert specs["proj/kernel"] == P(None, "fsdp")  # the host's names, by the host's rules
    assert specs["mixer/qkvb/kernel"] == P(None, "tp")  # fwjax's names: heads over `tp`
    assert specs["mixer/out/kernel"] == P("tp", None)
    assert specs["ff/up/kernel"] == P(None, "tp") and specs["ff/down/kernel"] == P("tp", None)
    assert specs["ff/up/bias"] == P()  # unannotated: replicated

    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6, 8)), jnp.float32)
    expected = host(x)
    graphdef, state = nnx.split(host)
    state = jax.device_put(state, nnx.state(shardings))
    qkvb = state["mixer"]["qkvb"]["kernel"][...]
    assert qkvb.sharding.spec == P(None, "tp") and len(qkvb.addressable_shards) == 8
    assert qkvb.addressable_shards[0].data.shape == (16, 52 // 4)  # 3·16 + 4 gates, over tp=4
    out = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_the_embed_axis_can_be_split_too(mesh):
    rules = (("features", None), ("hidden", "fsdp"), *logical_axis_rules("tp", embed_axis="fsdp"))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        specs = _specs(nnx.get_named_sharding(nnx.state(Host(nnx.Rngs(0))), mesh))
    assert specs["mixer/qkvb/kernel"] == P("fsdp", "tp")
    assert specs["ff/down/kernel"] == P("tp", "fsdp")


def test_building_a_layer_has_no_sharding_side_effects(mesh):
    rules = logical_axis_rules("tp")
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        layer = FastWeightAttention(FastWeightConfig(), 16, 4, rngs=nnx.Rngs(0))
    kernel = layer.qkvb.kernel
    is_spec = lambda x: isinstance(x, P)
    [names] = jax.tree.leaves(nnx.get_partition_spec(nnx.state(layer.qkvb)), is_leaf=is_spec)
    assert names == P("embed", "heads")  # the logical names, kept as metadata
    assert kernel[...].sharding.is_fully_replicated  # not split by its names when built
    assert not _context_rules()  # the rules context ended with the block
    # The same layer builds without any mesh or rules.
    plain = FastWeightAttention(FastWeightConfig(), 16, 4, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(plain.qkvb.kernel[...], kernel[...])


def test_default_rules_name_every_fwjax_axis():
    rules = dict(logical_axis_rules("model"))
    assert set(rules) == set(AXIS_NAMES)
    expected = {"embed": None, "heads": "model", "mlp": "model", "vocab": "model", "layers": None}
    assert rules == expected
    assert set(dict(logical_axis_rules(None)).values()) == {None}


def _context_rules():
    from flax.core import spmd

    return spmd.get_logical_axis_rules()
