"""The normalisation study (experiments.normalisation): its analysis replays the memory the
model writes (fwjax.diagnostics.replay_writes, tested in tests/test_diagnostics.py), checked
against the model's direct readout."""

import dataclasses

import numpy as np
import pytest
from flax import nnx

from experiments import normalisation as nm
from fwjax.data.retrieval import RetrievalSetting, RetrievalTask, retrieval_loss
from fwjax.nn.config import FastWeightConfig
from fwjax.nn.retrieval import RetrievalConfig, RetrievalModel
from fwjax.train.retrieval import direct_predictions, memory_writes


def test_previous_values():
    keys = np.array([[0, 1, 0, 0, 2, 1]])
    values = np.array([[5, 6, 7, 8, 9, 4]])
    np.testing.assert_array_equal(nm.previous_values(keys, values), [[-1, -1, 5, 7, -1, 6]])


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
    with pytest.raises(ValueError, match="sequence_length=0 must be a positive int or None"):
        RetrievalTask(RetrievalSetting.UPDATE, 5, sequence_length=0)
    with pytest.raises(ValueError, match="num_keys=True must be a positive int"):
        RetrievalTask(RetrievalSetting.UPDATE, True)
    with pytest.raises(ValueError, match="eval_max_queries=0 must be a positive int"):
        RetrievalTask(RetrievalSetting.UPDATE, 5, eval_max_queries=0)
