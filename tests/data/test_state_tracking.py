"""The modular-sum state-tracking task: its batches and its place in the recall task config."""

import numpy as np
import pytest

from fwjax.data.recall import MQARTask
from fwjax.data.state_tracking import ModularSumTask
from fwjax.nn import ModelConfig
from fwjax.train.config import RecallTaskConfig
from fwjax.train.recall import recall_train_config


def test_targets_are_running_sums_modulo_m_and_batches_are_pure():
    task = ModularSumTask(modulus=3, length=8)
    batch = task.batch(seed=1, index=5, batch_size=4)
    np.testing.assert_array_equal(batch["targets"], np.cumsum(batch["tokens"], axis=1) % 3)
    assert batch["mask"].all() and batch["tokens"].max() < 3 == task.vocab_size
    np.testing.assert_array_equal(batch["hops"][0], [1, 1, 2, 2, 3, 3, 4, 4])  # quarters
    again = task.batch(seed=1, index=5, batch_size=4)
    np.testing.assert_array_equal(batch["tokens"], again["tokens"])
    other = task.batch(seed=1, index=5, batch_size=4, eval=True)
    assert not np.array_equal(batch["tokens"], other["tokens"])


def test_the_recall_config_takes_one_task():
    model = ModelConfig(vocab_size=2, d_model=8, num_heads=2, d_ff=8)
    config = recall_train_config(ModularSumTask(), model, {"steps": 3})
    assert config.recall.data() == ModularSumTask() and config.recall.mqar is None
    with pytest.raises(ValueError, match="give one of"):
        RecallTaskConfig(model=model, modular_sum=ModularSumTask(), mqar=MQARTask(num_pairs=2))
    with pytest.raises(ValueError, match="modulus"):
        ModularSumTask(modulus=1)
