"""Mixed precision: parameters stored in bfloat16 train through float32 master weights kept by
the optimizer (sharded like the parameters), and resume exactly from a checkpoint."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fwjax.cli import load_train_config
from fwjax.train import Run, train
from fwjax.train.optim import MasterWeightsState, apply_updates, with_master_weights
from tests.train.test_train import TINY_LM, _train_losses

BF16 = ["lm.model.param_dtype=bfloat16", "lm.model.dtype=bfloat16"]
# A schedule that does not depend on the total steps, so a run extended from 2 to 4 steps is
# the 4-step run.
CONSTANT_LR = ['optimizer.schedule="constant"', "optimizer.warmup_steps=0"]


def test_updates_below_a_bfloat16_ulp_accumulate_in_the_master_weights():
    params = {"w": jnp.ones((3,), jnp.bfloat16)}
    grads = {"w": jnp.full((3,), 1e-4, jnp.bfloat16)}
    for tx, expected in ((optax.sgd(1.0), 1.0), (with_master_weights(optax.sgd(1.0)), 0.99)):
        p, state = params, tx.init(params)
        for _ in range(100):
            updates, state = tx.update(grads, state, p)
            p = apply_updates(p, updates, state)
        assert p["w"].dtype == jnp.bfloat16
        # Plain bfloat16 SGD: 1 − 1e-4 rounds back to 1; the master weights reach 0.99.
        np.testing.assert_allclose(np.asarray(p["w"], np.float32), expected, atol=4e-3)
    assert isinstance(state, MasterWeightsState) and state.master["w"].dtype == jnp.float32


def test_float32_parameters_keep_the_plain_optimizer_state():
    tx = with_master_weights(optax.adam(1e-3))
    state = tx.init({"w": jnp.ones((2,))})
    assert not isinstance(state, MasterWeightsState)
    assert jax.tree.structure(state) == jax.tree.structure(
        optax.adam(1e-3).init({"w": jnp.ones(2)})
    )


MESH = ["mesh.data=4", "mesh.model=2", "mesh.fsdp=true"]


@pytest.mark.slow  # a sharded 8-device training run (~30 s); the wrapper's tests above stay
def test_bfloat16_parameters_train_sharded_with_float32_master_weights(tmp_path):
    """8 devices, FSDP × tensor parallel: the master weights are sharded as the parameters and
    the parameters are their rounding after training steps."""
    overrides = [*TINY_LM, *BF16, *MESH, "eval_every=100", *CONSTANT_LR, "steps=2"]
    summary = train(load_train_config("lm_tiny", overrides), tmp_path)
    assert np.isfinite(summary["train"]["loss"])
    run = Run(load_train_config("lm_tiny", overrides), tmp_path)
    run.checkpointer.close()
    state = run.state.opt_state
    assert isinstance(state, MasterWeightsState)
    params = jax.tree_util.tree_leaves_with_path(run.state.params)
    master = jax.tree.leaves(state.master)
    assert len(params) == len(master)
    for (path, p), m in zip(params, master, strict=True):
        assert p.dtype == jnp.bfloat16 and m.dtype == jnp.float32, jax.tree_util.keystr(path)
        assert p.sharding.spec == m.sharding.spec, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(p), np.asarray(m.astype(jnp.bfloat16)))


@pytest.mark.slow  # three sharded training runs (~25 s)
def test_a_bfloat16_run_with_master_weights_resumes_exactly(tmp_path):
    overrides = [*TINY_LM, *BF16, *MESH, "eval_every=100", *CONSTANT_LR]
    train(load_train_config("lm_tiny", [*overrides, "steps=4"]), tmp_path / "whole")
    train(load_train_config("lm_tiny", [*overrides, "steps=2"]), tmp_path / "split")
    resumed = train(load_train_config("lm_tiny", [*overrides, "steps=4"]), tmp_path / "split")
    assert resumed["resumed_from"] == 2
    np.testing.assert_array_equal(
        _train_losses(tmp_path / "whole"), _train_losses(tmp_path / "split")
    )
