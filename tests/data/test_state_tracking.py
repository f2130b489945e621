"""The modular-sum state-tracking task: its batches and its place in the recall task config."""

import numpy as np
import pytest

from fwjax.data.recall import MQARTask
from fwjax.data.state_tracking import ModularSumTask
from fwjax.nn import ModelConfig
from fwjax.train.config import RecallTaskConfig
from fwjax.train.recall import recall_train_config, run_recall


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


def test_transfer_evaluates_the_final_model_on_other_lengths():
    task = ModularSumTask(modulus=2, length=8)
    model = ModelConfig(
        vocab_size=2, d_model=8, num_layers=1, num_heads=2, d_ff=8, positional="none"
    )
    fields = {"steps": 3, "batch_size": 4, "recall.eval_sequences": 8, "recall.eval_batch_size": 4}
    longer = ModularSumTask(modulus=2, length=32)
    result = run_recall(recall_train_config(task, model, fields), transfer=(task, longer))
    same, long = result.transfer
    # The trained task itself: the loop's final evaluation, recomputed.
    assert same["accuracy"] == pytest.approx(result.accuracy, abs=1e-6)
    assert same["loss"] == pytest.approx(result.loss, rel=1e-5)
    assert {int(k[3]) for k in long if k.startswith("hop")} == {1, 2, 3, 4}
    assert 0.0 <= long["accuracy"] <= 1.0 and long["loss"] != same["loss"]
