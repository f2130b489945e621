"""The training loop's parameter shardings come from Flax's logical-axis rules: fwjax's defaults
over the ``model`` mesh axis, overridden by rules of the same names in context."""

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from fwjax.nn import ModelConfig, TransformerLM
from fwjax.train import mesh as mesh_lib
from fwjax.train.config import MeshConfig


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py fakes 8 CPU devices)")
    return mesh_lib.make_mesh(MeshConfig(data=4, model=2), jax.devices()[:8])


def _abstract_params():
    cfg = ModelConfig(vocab_size=32, d_model=16, num_layers=1, num_heads=2, d_ff=32, max_len=8)
    model = nnx.eval_shape(lambda: TransformerLM(cfg, rngs=nnx.Rngs(0)))
    return nnx.state(model, nnx.Param)


def _specs(shardings):
    return {"/".join(map(str, p)): s.spec for p, s in nnx.to_flat_state(shardings)}


def test_default_rules_split_heads_mlp_and_vocab_over_model(mesh):
    specs = _specs(mesh_lib.state_shardings(mesh, _abstract_params()))
    assert specs["embed/embedding"] == P("model", None)  # (vocab, embed)
    assert specs["blocks/0/attention/qkvb/kernel"] == P(None, "model")
    assert specs["blocks/0/ff/down/kernel"] == P("model", None)
    assert specs["head/kernel"] == P(None, "model")
    assert specs["position_embed/embedding"] == P(None, None)
    assert specs["blocks/0/norm1/scale"] == P()


def test_rules_in_context_override_the_defaults_of_their_names(mesh):
    with nnx.logical_axis_rules((("embed", "data"), ("vocab", None))):
        specs = _specs(mesh_lib.state_shardings(mesh, _abstract_params()))
        assert dict(mesh_lib.active_rules())["embed"] == "data"
    assert specs["embed/embedding"] == P(None, "data")
    assert specs["blocks/0/attention/qkvb/kernel"] == P("data", "model")  # heads: the default
    assert specs["head/kernel"] == P("data", None)
    assert dict(mesh_lib.active_rules())["embed"] is None  # outside the context: defaults
