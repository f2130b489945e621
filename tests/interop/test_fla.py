"""fla DeltaNet layers converted to FastWeightAttention (:mod:`fwjax.interop.fla`).

The comparison runs flash-linear-attention's own ``fla.layers.DeltaNet`` (PyTorch, float32,
its Triton kernels in Triton's CPU interpreter) in a subprocess (``fla_reference.py``), then
the converted fwjax layer on the same inputs. It needs the ``bench`` extra (torch, fla) and
takes ~30 s on 2 cores (importing fla and interpreting its kernels), so it is marked slow.
The refusals need neither torch nor fla.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fwjax.interop import fla as fx
from fwjax.nn import FastWeightAttention, FastWeightConfig
from fwjax.ops import Normalization, UpdateRule

REFERENCE = Path(__file__).with_name("fla_reference.py")
CASES = ("default", "gated")


@pytest.fixture(scope="module")
def fla_outputs(tmp_path_factory):
    """fla's weights, inputs, outputs and versions, computed once in a subprocess."""
    for name in ("torch", "fla", "triton"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed (pip install -e '.[bench]')")
    out = tmp_path_factory.mktemp("fla") / "reference.npz"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    proc = subprocess.run(
        [sys.executable, str(REFERENCE), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = np.load(out)
    return {k: data[k] for k in data.files}


def _case(data: dict, case: str):
    prefix = f"{case}/sd/"
    state_dict = {k[len(prefix) :]: v for k, v in data.items() if k.startswith(prefix)}
    options = fx.DeltaNetOptions(**json.loads(str(data[f"{case}/options"])))
    return state_dict, options, data[f"{case}/x"], data[f"{case}/y"]


@pytest.mark.slow
def test_fla_ran_its_fused_recurrent_kernel_in_float32(fla_outputs):
    meta = json.loads(str(fla_outputs["meta"]))
    assert meta["calls"] == {"fused_recurrent_delta_rule": len(CASES)}, meta
    for case in CASES:
        assert fla_outputs[f"{case}/y"].dtype == np.float32
        assert np.abs(fla_outputs[f"{case}/y"]).max() > 0.5  # not a vanishing output


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["recurrent", "chunked"])
@pytest.mark.parametrize("case", CASES)
def test_the_converted_layer_reproduces_fla_deltanet(fla_outputs, case, impl):
    state_dict, options, x, expected = _case(fla_outputs, case)
    layer = fx.from_fla_deltanet(state_dict, options, impl=impl)
    cfg = layer.config
    assert (cfg.normalization, cfg.update_rule) == (Normalization.L2, UpdateRule.DELTA)
    assert cfg.output_gate == (case == "gated") and cfg.norm_eps == options.norm_eps
    y, _ = layer(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_prefixed_model_state_dict_decodes_step_by_step_to_flas_output(fla_outputs):
    state_dict, options, x, expected = _case(fla_outputs, "default")
    prefixed = {f"model.layers.0.attn.{k}": v for k, v in state_dict.items()}
    prefixed["model.embeddings.weight"] = np.zeros((3, 3), np.float32)  # another module's
    layer = fx.from_fla_deltanet(prefixed, options, prefix="model.layers.0.attn.")
    step = nnx.jit(lambda m, xt, s: m(xt, s))
    state, ys = layer.init_state(x.shape[0]), []
    for t in range(x.shape[1]):
        y, state = step(layer, jnp.asarray(x[:, t : t + 1]), state)
        ys.append(y)
    np.testing.assert_allclose(np.concatenate(ys, axis=1), expected, rtol=1e-4, atol=1e-5)


# --- refusals (no torch needed) ----------------------------------------------------------------


def _weights(d=8, h=2, j=4, **changes) -> dict[str, np.ndarray]:
    """A DeltaNet state dict of the right shapes (values irrelevant to the checks)."""
    w = {f"{n}_proj.weight": np.zeros((d, d), np.float32) for n in "qkvo"}
    w["b_proj.weight"] = np.zeros((h, d), np.float32)
    w |= {f"{n}_conv1d.weight": np.zeros((d, 1, j), np.float32) for n in "qkv"}
    w["o_norm.weight"] = np.ones(d // h, np.float32)
    for k, v in changes.items():
        if v is None:
            w.pop(k)
        else:
            w[k] = v
    return w


def test_a_well_formed_state_dict_converts_with_fla_shapes():
    layer = fx.from_fla_deltanet(_weights(d=8, h=2, j=3))
    assert (layer.num_heads, layer.head_dim, layer.config.conv_size) == (2, 4, 3)
    assert layer.qkvb.kernel[...].shape == (8, 3 * 8 + 2)
    y, _ = layer(jnp.ones((1, 5, 8)))
    assert y.shape == (1, 5, 8) and bool(jnp.all(jnp.isfinite(y)))
    assert jax.tree.leaves(nnx.state(layer, nnx.Param))  # parameters were set


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"q_conv1d.weight": None}, "use_short_conv=False is not supported"),
        ({"q_conv1d.bias": np.zeros(8, np.float32)}, "conv_bias=True is not supported"),
        ({"b_proj.weight": None}, "use_beta=False"),
        ({"k_proj.weight": np.zeros((16, 8), np.float32)}, "expand_k = expand_v = 1"),
        ({"o_norm.weight": np.ones(3, np.float32)}, "o_norm width 3 != hidden_size=8"),
        ({"o_proj.weight": None}, "missing ['o_proj.weight']"),
        ({"extra.weight": np.zeros(1, np.float32)}, "unexpected fla DeltaNet weights"),
    ],
    ids=["no_conv", "conv_bias", "no_beta", "expand_k", "norm_width", "missing", "unexpected"],
)
def test_unsupported_layers_are_refused_naming_the_reason(changes, needle):
    with pytest.raises(ValueError) as info:
        fx.from_fla_deltanet(_weights(**changes))
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (dict(qk_norm="sum"), "qk_norm='sum'"),
        (dict(qk_activation="relu"), "qk_activation='relu'"),
        (dict(norm_eps=0.0), "norm_eps=0.0 must be > 0"),
    ],
)
def test_unsupported_options_are_refused(options, needle):
    with pytest.raises(ValueError) as info:
        fx.DeltaNetOptions(**options)
    assert needle in str(info.value)


def test_a_wrong_prefix_names_the_available_weights():
    with pytest.raises(ValueError, match=r"no weights start with prefix='model\.'"):
        fx.from_fla_deltanet(_weights(), prefix="model.")


# --- the layer options the conversion uses ---------------------------------------------------


def test_the_output_gate_needs_the_norm_and_the_epsilon_must_be_positive():
    with pytest.raises(ValueError, match="output_gate=True needs output_norm=True"):
        FastWeightConfig(output_gate=True)
    with pytest.raises(ValueError, match=r"norm_eps=0\.0 must be > 0"):
        FastWeightConfig(output_norm=True, norm_eps=0.0)
    plain = FastWeightAttention(FastWeightConfig(output_norm=True), 8, 2, rngs=nnx.Rngs(0))
    assert plain.out_gate is None and plain.norm.epsilon == 1e-6  # the defaults are unchanged


def test_a_gated_layer_decodes_step_by_step_to_its_parallel_output():
    config = fx.deltanet_config(fx.DeltaNetShape(8, 2, 3, use_gate=True))
    layer = FastWeightAttention(config, 8, 2, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 7, 8))
    parallel, _ = layer(x)
    ungated_config = dataclasses.replace(config, output_gate=False)
    ungated = FastWeightAttention(ungated_config, 8, 2, rngs=nnx.Rngs(0))
    assert not np.allclose(ungated(x)[0], parallel, atol=1e-3)  # the gate changes the output
    state, ys = layer.init_state(2), []
    for t in range(x.shape[1]):
        y, state = layer(x[:, t : t + 1], state)
        ys.append(y)
    np.testing.assert_allclose(jnp.concatenate(ys, axis=1), parallel, rtol=1e-5, atol=1e-6)


def test_allow_neg_eigval_doubles_beta():
    """fla's ``allow_neg_eigval`` is ``beta_range = 2``: the same layer writes with twice the β."""
    rng = np.random.default_rng(0)
    w = {k: rng.normal(size=v.shape).astype(np.float32) * 0.3 for k, v in _weights().items()}
    plain = fx.from_fla_deltanet(w)
    doubled = fx.from_fla_deltanet(w, fx.DeltaNetOptions(allow_neg_eigval=True))
    assert (plain.config.beta_range, doubled.config.beta_range) == (1.0, 2.0)
    x = jnp.asarray(rng.normal(size=(1, 6, 8)), jnp.float32)
    betas = [layer._prepare(x, None)[3] for layer in (plain, doubled)]
    np.testing.assert_allclose(betas[1], 2 * betas[0], rtol=1e-6)
    assert float(jnp.max(betas[1])) > 1.0
