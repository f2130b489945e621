"""Safetensors weights (:mod:`fwjax.io`): round trips, refusals that name the tensors, and the
params-only export of a training workdir (``fwjax export``)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import fwjax
from fwjax import io
from fwjax.nn import FastWeightConfig, ModelConfig, TransformerLM
from fwjax.ops import FeatureMap, FeatureMapKind

FAVOR = FastWeightConfig(feature_map=FeatureMap(FeatureMapKind.FAVOR_PLUS, num_features=8))
CONFIG = ModelConfig(vocab_size=17, d_model=16, num_heads=2, d_ff=32, fast_weight=FAVOR)
TOKENS = (jnp.arange(8)[None] * 7) % 17


def _lm(seed: int) -> TransformerLM:
    return TransformerLM(CONFIG, rngs=nnx.Rngs(seed))


def test_a_model_round_trips_with_its_non_trainable_arrays_and_metadata(tmp_path):
    source, target = _lm(0), _lm(1)
    before = np.asarray(target(TOKENS)[0])
    path = io.save_params(tmp_path / "lm.safetensors", source, config=CONFIG)
    tensors, metadata = io.read_params(path)
    assert "blocks/0/attention/qkvb/kernel" in tensors and "embed/embedding" in tensors
    kinds = json.loads(metadata["variables"])
    assert kinds["blocks/0/attention/projection"] == "FavorProjection"
    assert kinds["head/kernel"] == "Param"
    assert metadata["format"] == io.FORMAT and metadata["fwjax_version"] == fwjax.__version__
    assert json.loads(metadata["config"])["fast_weight"]["feature_map"]["kind"] == "favor_plus"
    assert io.load_params(path, target) == metadata
    expected = np.asarray(source(TOKENS)[0])
    assert not np.allclose(before, expected)  # the two initialisations differ
    np.testing.assert_array_equal(np.asarray(target(TOKENS)[0]), expected)
    for name, array in load_file(str(path)).items():  # plain safetensors, no fwjax needed
        np.testing.assert_array_equal(array, tensors[name])


def test_a_params_only_state_loads_and_other_variables_keep_their_values(tmp_path):
    source, target = _lm(0), _lm(1)
    projection = np.asarray(target.blocks[0].attention.projection[...])
    path = io.save_params(tmp_path / "p.safetensors", nnx.state(source, nnx.Param))
    assert not any(name.endswith("projection") for name in io.read_params(path)[0])
    io.load_params(path, target)
    np.testing.assert_array_equal(target.blocks[0].attention.projection[...], projection)
    np.testing.assert_array_equal(target.head.kernel[...], source.head.kernel[...])


def test_dtypes_are_preserved_and_a_difference_is_refused_unless_cast(tmp_path):
    bf16 = nnx.Linear(4, 3, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    path = io.save_params(tmp_path / "bf16.safetensors", bf16)
    stored = io.read_params(path)[0]
    assert {a.dtype for a in stored.values()} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_array_equal(stored["kernel"], np.asarray(bf16.kernel[...]))
    fp32 = nnx.Linear(4, 3, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="'bias': stored dtype bfloat16 != model's float32"):
        io.load_params(path, fp32)
    io.load_params(path, fp32, cast=True)
    assert fp32.kernel[...].dtype == jnp.float32
    np.testing.assert_array_equal(fp32.kernel[...], bf16.kernel[...].astype(jnp.float32))


def _linear(width: int) -> nnx.Linear:
    return nnx.Linear(4, width, use_bias=False, rngs=nnx.Rngs(0))


def test_a_file_that_does_not_fit_is_refused_naming_the_tensors(tmp_path):
    path = io.save_params(tmp_path / "a.safetensors", nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
    narrow = io.save_params(tmp_path / "n.safetensors", nnx.state(_linear(3), nnx.Param))
    with pytest.raises(ValueError, match=r"'kernel': stored shape \(4, 3\) != model's \(4, 5\)"):
        io.load_params(narrow, _linear(5))
    no_bias = nnx.Linear(4, 3, use_bias=False, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"unexpected \['bias'\], missing \[\]"):
        io.load_params(path, no_bias)
    kernel_only = io.save_params(tmp_path / "k.safetensors", nnx.state(no_bias))
    with pytest.raises(ValueError, match=r"unexpected \[\], missing \['bias'\]"):
        io.load_params(kernel_only, nnx.Linear(4, 3, rngs=nnx.Rngs(0)))


def test_reserved_metadata_keys_and_non_string_values_are_refused(tmp_path):
    linear = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="'format' is reserved"):
        io.save_params(tmp_path / "x.safetensors", linear, metadata={"format": "mine"})
    with pytest.raises(TypeError, match=r"metadata\['step'\]=3 must be a string"):
        io.save_params(tmp_path / "x.safetensors", linear, metadata={"step": 3})


# --- fwjax export ------------------------------------------------------------------------------


def test_export_writes_the_latest_checkpoints_model_and_config(tmp_path, capsys):
    from fwjax.cli import _restored_run, main
    from fwjax.train import Run

    workdir, out = tmp_path / "run", tmp_path / "out" / "model.safetensors"
    sets = ["retrieval.num_keys=8", "retrieval.d_key=16", "batch_size=8", "steps=3"]
    sets += ["eval_every=3", "log_every=1", "progress_bar=false"]
    train = ["train", "--config", "retrieval_delta", "--workdir", str(workdir)]
    assert main([*train, *(f"--set={s}" for s in sets)]) == 0
    capsys.readouterr()
    assert main(["export", "--workdir", str(workdir), str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    tensors, metadata = io.read_params(out)
    assert printed == {"out": str(out), "step": 3, "tensors": len(tensors)}
    assert json.loads(metadata["config"]) == json.loads((workdir / "config.json").read_text())
    run = Run.restore(workdir)
    run.checkpointer.close()
    assert run.restored_step == 3 and not run.config.progress_bar
    with pytest.warns(DeprecationWarning, match="Run.restore"):
        old = _restored_run(str(workdir))  # the former private name still works
    old.checkpointer.close()
    assert old.restored_step == 3
    with pytest.raises(FileNotFoundError, match="training workdir"):
        Run.restore(tmp_path / "out")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((workdir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Run.restore(tmp_path / "empty")
    expected = {k: a for k, (a, _) in io.flatten_variables(run.state.params).items()}
    assert set(tensors) == set(expected) and len(tensors) > 2
    for name, array in expected.items():
        np.testing.assert_array_equal(tensors[name], array, err_msg=name)
    # The export loads into a zero-initialised copy of the run's model and restores it exactly.
    zeros = jax.tree.map(jnp.zeros_like, run.state.params)
    fresh = run.model_def.merge(zeros, run.state.rest, train=False)
    io.load_params(out, fresh)
    loaded = io.flatten_variables(nnx.state(fresh, nnx.Param))
    assert set(loaded) == set(expected)
    for name, (array, kind) in loaded.items():
        assert kind == "Param"
        np.testing.assert_array_equal(array, expected[name], err_msg=name)


def test_export_of_a_folder_without_a_run_is_a_one_line_error(tmp_path, capsys):
    from fwjax.cli import main

    assert main(["export", "--workdir", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fwjax export: error:") and "config.json" in err[0]
