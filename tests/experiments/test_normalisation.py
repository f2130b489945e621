"""The normalisation study's replay (experiments.normalisation): it must be the memory the
model writes, checked against fwjax.diagnostics.memory_trace and the model's direct readout."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import normalisation as nm
from fwjax import diagnostics
from fwjax.data.retrieval import RetrievalSetting, RetrievalTask, retrieval_loss
from fwjax.nn.config import FastWeightConfig
from fwjax.nn.retrieval import RetrievalConfig, RetrievalModel
from fwjax.train.retrieval import direct_predictions, memory_writes


def test_previous_values():
    keys = np.array([[0, 1, 0, 0, 2, 1]])
    values = np.array([[5, 6, 7, 8, 9, 4]])
    np.testing.assert_array_equal(nm.previous_values(keys, values), [[-1, -1, 5, 7, -1, 6]])


@pytest.mark.parametrize("attention", [False, True])
@pytest.mark.parametrize("delta", [False, True])
def test_replay_matches_memory_trace(delta, attention):
    rng = np.random.default_rng(0)
    b, t, k, v = 2, 9, 5, 3
    fk = jnp.asarray(rng.uniform(0.0, 1.0, (b, t, k)), jnp.float32)
    vals = jnp.asarray(rng.normal(size=(b, t, v)), jnp.float32)
    beta = jnp.asarray(rng.uniform(0.1, 0.9, (b, t)), jnp.float32)
    v_bar, read, norm, s, z = nm.replay(
        fk, vals, beta if delta else -jnp.ones((b, t)), jnp.asarray(attention)
    )
    trace, s_ref = diagnostics.memory_trace(
        fk[:, :, None], vals[:, :, None], beta[:, :, None] if delta else None,
        attention_normalized=attention,
    )  # fmt: skip
    np.testing.assert_allclose(s, s_ref[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norm, trace.state_norm[..., 0], rtol=1e-5)
    err = jnp.linalg.norm(vals - v_bar, axis=-1)
    np.testing.assert_allclose(err, trace.retrieval_error[..., 0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(z, jnp.sum(fk, axis=1), rtol=1e-5)
    # the read after the last write, by hand
    d = jnp.einsum("bk,bk->b", z, fk[:, -1]) if attention else jnp.ones(b)
    np.testing.assert_allclose(
        read[:, -1], jnp.einsum("bk,bkv->bv", fk[:, -1], s) / d[:, None], rtol=1e-5
    )


@pytest.mark.parametrize(
    "label", [pytest.param("sum_attention", marks=pytest.mark.slow), "delta_sum"]
)
def test_analysis_loss_equals_the_models_readout(label):
    rule, norm = nm.CONFIGS[label]
    n = 4
    fw = FastWeightConfig(feature_map=nm.FEATURE_MAP, normalization=norm, update_rule=rule)
    task = RetrievalTask(RetrievalSetting.UPDATE, n)
    # Any parameters do: a freshly initialised model, its β pushed away from 1/2.
    model = RetrievalModel(RetrievalConfig(n, n, d_key=8, fast_weight=fw), rngs=nnx.Rngs(0))
    model.beta_proj.kernel[...] = 3.0 * model.beta_proj.kernel[...]
    out = nm.analyse_memory(model, task, seed=3)
    batch = task.batch(3, 10_000, nm.EVAL_SEQUENCES, eval=True)
    y = direct_predictions(model, batch["keys"], batch["values"], batch["queries"])
    expected = float(retrieval_loss(y, batch["targets"], batch["mask"]))
    assert out["loss"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert out["length"] == 2 * n and out["overwrites"] > 0
    assert -1.0 <= out["removal_cosine"] <= 1.0
    longer = nm.analyse_memory(model, dataclasses.replace(task, sequence_length=16), 3)
    assert longer["length"] == 16 and len(longer["state_norm_trace"]) == 16
    fk, beta, fq = memory_writes(model, batch["keys"], batch["values"], batch["queries"])
    assert fk.shape == (nm.EVAL_SEQUENCES, 2 * n, 2 * 8) and fq.shape[-1] == fk.shape[-1]
    assert (beta is None) == (label == "sum_attention")


def test_sequence_length_validation():
    assert RetrievalTask(RetrievalSetting.UPDATE, 5, sequence_length=40).length == 40
    with pytest.raises(ValueError, match="setting 1 writes every key once"):
        RetrievalTask(RetrievalSetting.CAPACITY, 5, sequence_length=10)
    with pytest.raises(ValueError, match="sequence_length"):
        RetrievalTask(RetrievalSetting.UPDATE, 5, sequence_length=0)
