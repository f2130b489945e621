"""The LM recipe in training: random-window sampling, weight decay on matrices only, the
validation of carried memory against learned positions, and the reference configs."""

from __future__ import annotations

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import lm as lm_experiment
from fwjax.cli import config_from_workdir, load_train_config
from fwjax.data import text
from fwjax.nn import ModelConfig, TransformerLM
from fwjax.train import Run
from fwjax.train.config import LMEvalMode, LMTaskConfig, OptimizerConfig
from fwjax.train.config_io import unstructure
from fwjax.train.optim import make_optimizer, matrices_mask
from fwjax.train.tasks import evaluate_lm


def test_random_windows_are_pure_functions_of_seed_and_index():
    tokens = np.arange(1000, dtype=np.int32)
    windows = text.RandomWindows(tokens, batch_size=6, segment_len=16, seed=3)
    a, b = windows.batch(7), windows.batch(7)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    # Each row is a real slice of the text, and targets are the inputs shifted by one.
    np.testing.assert_array_equal(a["inputs"], a["inputs"][:, :1] + np.arange(16))
    np.testing.assert_array_equal(a["targets"], a["inputs"] + 1)
    assert a["reset"].all() and a["inputs"].shape == (6, 16)
    assert not np.array_equal(windows.batch(8)["inputs"], a["inputs"])
    other_seed = text.RandomWindows(tokens, batch_size=6, segment_len=16, seed=4)
    assert not np.array_equal(other_seed.batch(7)["inputs"], a["inputs"])


def test_random_windows_reach_every_offset():
    tokens = np.arange(40, dtype=np.int32)
    windows = text.RandomWindows(tokens, batch_size=64, segment_len=8, seed=0)
    starts = np.concatenate([windows.batch(i)["inputs"][:, 0] for i in range(20)])
    assert starts.min() == 0 and starts.max() == 40 - 8 - 1  # the last full (input, target) pair
    with pytest.raises(ValueError, match="too few for windows of segment_len=64"):
        text.RandomWindows(tokens, 2, 64)


def test_carried_memory_needs_streams_and_positions_that_do_not_run_out():
    with pytest.raises(ValueError, match="carry_state=True needs sampling='streams'"):
        LMTaskConfig(
            model=ModelConfig(positional="none"), sampling="random_windows", carry_state=True
        )
    with pytest.raises(ValueError, match="positional='learned'"):
        LMTaskConfig(model=ModelConfig(positional="learned"), carry_state=True)
    with pytest.raises(ValueError, match="exceeds the learned position table"):
        LMTaskConfig(model=ModelConfig(positional="learned", max_len=32), segment_len=64)
    LMTaskConfig(model=ModelConfig(positional="none"), carry_state=True)  # the paper's protocol


def test_weight_decay_reaches_matrices_only():
    params = {"w": jnp.ones((3, 2)), "bias": jnp.ones((2,)), "scale": jnp.ones((2,))}
    zeros = jax.tree.map(jnp.zeros_like, params)
    for only, decayed_vectors in ((True, False), (False, True)):
        config = OptimizerConfig(
            kind="adamw",
            learning_rate=0.1,
            schedule="constant",
            weight_decay=0.5,
            decay_matrices_only=only,
            clip_norm=None,
        )
        tx = make_optimizer(config, 10)
        updates, _ = tx.update(zeros, tx.init(params), params)
        np.testing.assert_allclose(updates["w"], -0.05 * np.ones((3, 2)), rtol=1e-6)
        expected = -0.05 if decayed_vectors else 0.0
        np.testing.assert_allclose(updates["bias"], expected, rtol=1e-6)
        np.testing.assert_allclose(updates["scale"], expected, rtol=1e-6)


def test_weight_decay_mask_on_a_models_parameters():
    model = TransformerLM(
        ModelConfig(vocab_size=11, d_model=8, num_layers=1, num_heads=2, d_ff=16, max_len=8),
        rngs=nnx.Rngs(0),
    )
    mask = nnx.to_pure_dict(matrices_mask(nnx.state(model, nnx.Param)))
    block = mask["blocks"][0]
    assert mask["embed"]["embedding"] and mask["position_embed"]["embedding"]
    assert mask["head"]["kernel"] and block["ff"]["up"]["kernel"]
    assert block["attention"]["qkvb"]["kernel"] and block["attention"]["out"]["kernel"]
    assert not block["ff"]["up"]["bias"] and not block["norm1"]["scale"]
    assert not block["norm1"]["bias"] and not mask["final_norm"]["scale"]


def test_stored_configs_from_before_the_recipe_options_rebuild_their_model(tmp_path):
    config = load_train_config("lm_tiny")
    stored = unstructure(config)
    for key in ("embed_init_std", "embed_scale", "activation", "scale_residual_init"):
        del stored["lm"]["model"][key]  # a config.json written before these fields existed
    del stored["optimizer"]["decay_matrices_only"]
    (tmp_path / "config.json").write_text(json.dumps(stored))
    old = config_from_workdir(tmp_path)
    assert old.lm.model.activation.value == "relu" and old.lm.model.embed_scale
    assert old.lm.model.embed_init_std == 1.0 and not old.lm.model.scale_residual_init
    assert not old.optimizer.decay_matrices_only
    assert config.lm.model.activation.value == "gelu"  # new configs keep the new defaults


def test_random_window_training_runs_and_refuses_carried_eval(tmp_path):
    text_path = tmp_path / "text.txt"
    text_path.write_text(text.generated_text(20_000))
    config = load_train_config(
        "shakespeare_char_delta",
        [
            f'lm.text_path="{text_path}"',
            "steps=2",
            "batch_size=4",
            "lm.segment_len=16",
            "lm.eval_stride=8",
            "lm.model.max_len=16",
            "lm.model.d_model=16",
            "lm.model.d_ff=32",
            "lm.model.num_layers=1",
            "lm.model.num_heads=2",
            "eval_batches=1",
        ],
    )
    run = Run(config, tmp_path / "w", devices=jax.devices()[:1])
    batch = run.task.train_batch(0)
    assert batch["reset"].all()  # random windows: nothing carried
    run.state, metrics = run.train_step(run.state, run.batch(0))
    assert np.isfinite(float(metrics["loss"]))
    with pytest.raises(ValueError, match="mode='carried' with positional='learned'"):
        evaluate_lm(run, LMEvalMode.CARRIED)
    with pytest.raises(ValueError, match="segment_len=32 exceeds the learned position table"):
        evaluate_lm(run, LMEvalMode.SEGMENTS, segment_len=32)
    run.checkpointer.close()


def test_recipe_configs_are_up_to_date_and_twins_have_equal_size():
    for budget, b in lm_experiment.BUDGETS.items():
        for variant in lm_experiment.RECIPE_VARIANTS:
            name = f"{b['prefix']}_{variant}"
            path = lm_experiment.CONFIGS / f"{name}.toml"
            assert path.read_text() == lm_experiment.recipe_config(variant, budget), name
            config = load_train_config(name)
            assert config.lm.segment_len == b["segment_len"] and config.steps == b["steps"]
    # The paper-recipe configs are written out explicitly, not left to the defaults.
    for variant in lm_experiment.VARIANTS:
        model = load_train_config(f"tinyshakespeare_{variant}").lm.model
        assert model.norm_position.value == "post" and model.embed_scale
        assert model.embed_init_std == 1.0 and model.activation.value == "relu"


def test_report_has_one_row_per_seed_and_mean_std(tmp_path, monkeypatch):
    monkeypatch.setattr(lm_experiment, "RESULTS", tmp_path)
    monkeypatch.setattr(lm_experiment, "CSV_PATH", tmp_path / "lm_tinyshakespeare.csv")
    for seed, loss in ((0, 1.70), (1, 1.74)):
        record = dict(
            budget="small",
            config="shakespeare_char_softmax",
            model="softmax",
            description="",
            params=100,
            steps=10,
            tokens=7680,
            seed=seed,
            val_loss_nats=loss,
            val_bpc=loss / np.log(2),
            carried_val_bpc=None,
            seconds=1.0,
            eval=dict(sliding=dict(bpc=2.4)),
            curve=dict(train=[[5, 2.0]], eval=[[5, 2.1], [10, loss]]),
        )
        path = lm_experiment.result_path("small", "softmax", seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record))
    lm_experiment.write_report()
    with open(tmp_path / "lm_tinyshakespeare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["seed"] for r in rows] == ["0", "1"]
    required = "model,params,steps,tokens,seed,val_loss_nats,val_bpc,carried_val_bpc,seconds"
    assert set(required.split(",")) <= set(rows[0])
    assert rows[1]["val_loss_nats"] == "1.7400" and rows[1]["carried_val_bpc"] == ""
    table = (tmp_path / "lm_tinyshakespeare.md").read_text()
    assert "| small | softmax | 100 | 7,680 | 2 | 1.720 ± 0.028 |" in table
    assert (tmp_path / "lm_tinyshakespeare.png").stat().st_size > 0
