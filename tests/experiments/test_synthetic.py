"""The synthetic retrieval protocol (fwjax.train.retrieval) and its grid runner
(experiments.synthetic): the direct readout equals the generic model, the blocked triangular
solve and its gradient, the stopping rule, and a tiny grid run end to end with resumption."""

import csv
import dataclasses
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

from experiments import synthetic
from fwjax.cli import load_train_config
from fwjax.data.retrieval import RetrievalSetting, RetrievalTask, retrieval_loss
from fwjax.nn import AttentionKind, FastWeightConfig, RetrievalConfig, RetrievalModel
from fwjax.ops import FeatureMap, FeatureMapKind, Normalization, UpdateRule, feature_maps
from fwjax.ops.linalg import solve_unit_lower
from fwjax.train.retrieval import (
    Init,
    Readout,
    RetrievalProtocol,
    StopReason,
    direct_predictions,
    official_init,
    predictions,
    retrieval_train_config,
    run_retrieval,
    train_retrieval,
)
from tests.tolerances import assert_close

REPO = Path(__file__).resolve().parents[2]
OFFICIAL = dict(d_embed=23, use_bias=True)  # the official code's wide embedding, biases
CASES = [
    # (setting, feature map, update rule, normalisation, embedding); None map = softmax.
    (1, FeatureMap(FeatureMapKind.DPFP, nu=2), UpdateRule.SUM, Normalization.ATTENTION, OFFICIAL),
    (
        2,
        FeatureMap(FeatureMapKind.FAVOR_PLUS, num_features=8),
        UpdateRule.DELTA,
        Normalization.SUM,
        {},
    ),
    pytest.param(
        2,
        FeatureMap(FeatureMapKind.ELU_P1),
        UpdateRule.DELTA,
        Normalization.ATTENTION,
        OFFICIAL,
        marks=pytest.mark.slow,  # not used by the grids
    ),
    # Softmax, with the options the official model lacks: an untied, factorised query table.
    (2, None, UpdateRule.SUM, None, dict(OFFICIAL, tie_queries=False, embed_factor=7)),
]


def _model(n, fm, rule, norm, d_key=16, embedding=None):
    embedding = embedding or {}
    if fm is None:
        cfg = RetrievalConfig(n, n, d_key=d_key, attention=AttentionKind.SOFTMAX, **embedding)
    else:
        fw = FastWeightConfig(feature_map=fm, normalization=norm, update_rule=rule)
        cfg = RetrievalConfig(n, n, d_key=d_key, fast_weight=fw, **embedding)
    model = RetrievalModel(cfg, rngs=nnx.Rngs(0))
    official_init(model, jax.random.key(1))
    return model


@pytest.mark.parametrize("setting, fm, rule, norm, embedding", CASES)
def test_direct_readout_matches_generic_model(setting, fm, rule, norm, embedding):
    n = 11
    batch = RetrievalTask(RetrievalSetting(setting), n).batch(3, 0, 3, eval=True)
    model = _model(n, fm, rule, norm, embedding=embedding)
    if embedding:  # the biases are initialised (non-zero) and take part in the gradient check
        assert float(jnp.max(jnp.abs(model.key_proj.bias[...]))) > 0
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, readout):
        pred = predictions(nnx.merge(graphdef, params, rest), batch, readout)
        return retrieval_loss(pred, batch["targets"], batch["mask"]), pred

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (l_gen, y_gen), g_gen = grad(params, Readout.GENERIC)
    (l_dir, y_dir), g_dir = grad(params, Readout.DIRECT)
    assert y_dir.shape == (3, n, n)
    assert float(jnp.max(jnp.abs(y_gen))) > 1e-3  # a non-trivial comparison
    assert_close(y_dir, y_gen)
    assert_close(l_dir, l_gen)
    for a, b in zip(jax.tree.leaves(g_dir), jax.tree.leaves(g_gen), strict=True):
        assert_close(a, b)


def test_direct_predictions_of_a_delta_memory_by_hand():
    """The same key written twice (values 1 then 3) with β = ½, read with that key.

    With ``W_k`` blind to the value and ``W_q = W_k``'s key part, ``q̂ = k̂``; with ``c = k̂·k̂``:
    ``u1 = β e1``, ``u2 = β (e3 − c u1)``, ``ŷ = Sᵀq̂ = c (u1 + u2)``.
    """
    model = _model(4, FeatureMap(FeatureMapKind.DPFP, nu=1), UpdateRule.DELTA, Normalization.SUM)
    model.beta_proj.kernel[...] = jnp.zeros_like(model.beta_proj.kernel[...])  # β = σ(0) = ½
    w_key = model.key_proj.kernel[...][4:]
    model.key_proj.kernel[...] = model.key_proj.kernel[...].at[:4].set(0.0)
    model.query_proj.kernel[...] = w_key
    y = direct_predictions(model, jnp.array([[2, 2]]), jnp.array([[1, 3]]), jnp.array([[2]]))
    k_hat = feature_maps.sum_norm(feature_maps.dpfp(model.embed(jnp.array(2)) @ w_key, 1))
    c, e = jnp.dot(k_hat, k_hat), jnp.eye(4)
    u1 = 0.5 * e[1]
    u2 = 0.5 * (e[3] - c * u1)
    assert_close(y[0, 0], c * (u1 + u2))


@pytest.mark.parametrize(
    "n, block",
    # (37, 8): padding and several blocks, in the default suite; the others are slow (~12 s each).
    [
        (37, 8),
        pytest.param(16, 16, marks=pytest.mark.slow),
        pytest.param(5, 64, marks=pytest.mark.slow),
    ],
)
def test_solve_unit_lower_and_its_gradient(n, block):
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(2, n, n)) * 0.3, jnp.float32)
    s = jnp.asarray(rng.normal(size=(2, 3, n)), jnp.float32)
    inv = jnp.linalg.inv(jnp.eye(n) + jnp.tril(a, -1))
    assert_close(solve_unit_lower(s, a, block_size=block), s @ inv)

    w = jnp.asarray(rng.normal(size=(2, 3, n)), jnp.float32)
    ours = jax.grad(lambda s, a: jnp.sum(w * solve_unit_lower(s, a, block_size=block)), (0, 1))
    ref = jax.grad(
        lambda s, a: jnp.sum(w * (s @ jnp.linalg.inv(jnp.eye(n) + jnp.tril(a, -1)))), (0, 1)
    )
    for x, y in zip(ours(s, a), ref(s, a), strict=True):
        assert_close(x, y)


def _tiny_protocol(**fields):
    """Overrides of the paper's protocol: 10 steps of 4 sequences, evaluations every 5 steps on
    2 sequences."""
    tiny = {"steps": 10, "batch_size": 4, "retrieval.eval_sequences": 2}
    tiny |= dict.fromkeys(("eval_every", "log_every", "steps_per_call"), 5)
    return tiny | fields


@pytest.mark.slow  # ≈ 10 s; patience through a resume: the interrupted-point test below
def test_stopping_rule_patience():
    """A learning rate too small to move any float32 parameter: the fixed evaluation set gives
    the same loss every time, so patience=1 stops after the second evaluation. The deprecated
    ``train_retrieval`` warns and gives the same result."""
    task = RetrievalTask(RetrievalSetting.CAPACITY, 4)
    cfg = synthetic.GridPoint(1, "dpfp1", "sum", 4).model_config()
    fields = _tiny_protocol(**{"optimizer.learning_rate": 1e-30, "early_stopping.patience": 1})
    fields["early_stopping.target"] = 0.0
    stuck = run_retrieval(retrieval_train_config(task, cfg, fields))
    assert stuck.stop_reason is StopReason.PATIENCE
    assert stuck.history[0][1] == stuck.history[1][1] == stuck.final_eval_loss
    assert stuck.steps == 10
    logged = []
    with pytest.warns(DeprecationWarning, match="retrieval_train_config"):
        protocol = RetrievalProtocol(
            eval_every=5, max_steps=10, eval_sequences=2, batch_size=4, target_loss=0.0,
            patience=1, learning_rate=1e-30,
        )  # fmt: skip
    with pytest.warns(DeprecationWarning, match="run_retrieval"):
        again = train_retrieval(task, cfg, protocol, log=lambda *a: logged.append(a))
    assert again.history == stuck.history == tuple(logged)


# Stored points of experiments/results/synthetic (run before the protocol moved into the
# training loop) that the loop reproduces: (setting, feature map, rule, N).
STORED = [
    (1, "softmax", "sum", 20),
    pytest.param(1, "dpfp1", "delta", 40, marks=pytest.mark.slow),  # ≈ 7 s
]

# Runs one grid point and prints its result, in a fresh process: the stored points were computed
# at XLA's default optimisation level, and this process compiles without LLVM's optimisations
# (tests/xla_flags.py), whose rounding is enough for the DPFP delta point's losses to drift by
# 1.5 % over 800 steps.
_RUN_POINT = """
import json, sys
from experiments import synthetic
from fwjax.train.retrieval import run_retrieval
setting, fm, rule, n, steps = json.loads(sys.argv[1])
r = run_retrieval(synthetic.GridPoint(setting, fm, rule, n).train_config({"steps": steps}))
print(json.dumps([r.steps, r.stop_reason.value, r.history]))
"""


@pytest.mark.parametrize("setting, fm, rule, n", STORED)
def test_the_loop_reproduces_stored_points(setting, fm, rule, n):
    point = synthetic.GridPoint(setting, fm, rule, n)
    stored = json.loads(synthetic.point_path(synthetic.RESULTS / "synthetic", point).read_text())
    # One device at the default optimisation level, like the grid's own runs.
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XLA_FLAGS="")
    args = json.dumps([setting, fm, rule, n, stored["max_steps"]])
    proc = subprocess.run(
        [sys.executable, "-c", _RUN_POINT, args], env=env, cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    steps_run, stop_reason, history = json.loads(proc.stdout.splitlines()[-1])
    assert (steps_run, stop_reason) == (stored["steps"], stored["stop_reason"])
    steps, losses = zip(*stored["history"], strict=True)
    assert [h[0] for h in history] == list(steps)
    np.testing.assert_allclose([h[1] for h in history], losses, rtol=1e-5)


def test_the_paper_config_file_is_the_protocol():
    """``fwjax train --config retrieval_paper`` runs the grid's setting-2 DPFP-1 delta point
    (its clip_norm=inf clips nothing: TOML has no None)."""
    point = synthetic.GridPoint(2, "dpfp1", "delta", 20)
    ours = point.train_config()
    config = load_train_config("retrieval_paper")
    assert config.optimizer.clip_norm == float("inf")
    no_clip = dataclasses.replace(config.optimizer, clip_norm=None)
    assert dataclasses.replace(config, optimizer=no_clip) == ours


def test_an_interrupted_point_resumes_where_it_stopped(tmp_path):
    """A point run to step 10 in two calls (the first capped at step 5, as a killed run leaves
    its checkpoint) ends as the uninterrupted run: same evaluations, same patience count."""
    task = RetrievalTask(RetrievalSetting.UPDATE, 4)
    cfg = synthetic.GridPoint(2, "dpfp1", "delta", 4).model_config()
    config = retrieval_train_config(
        task, cfg, _tiny_protocol(**{"early_stopping.target": 0.0, "early_stopping.patience": 2})
    )
    whole = run_retrieval(config, tmp_path / "whole")
    run_retrieval(dataclasses.replace(config, steps=5), tmp_path / "split")
    resumed = run_retrieval(config, tmp_path / "split")
    assert resumed.history == whole.history and resumed.steps == whole.steps == 10
    assert resumed.stop_reason is whole.stop_reason
    # Finished: running it again trains nothing and returns the same result.
    assert run_retrieval(config, tmp_path / "split").history == whole.history


def test_protocol_and_grid_validation():
    task, cfg = RetrievalTask(RetrievalSetting.UPDATE, 4), RetrievalConfig(4, 4, d_key=8)
    with pytest.raises(ValueError, match="patience=0"):
        retrieval_train_config(task, cfg, {"early_stopping.patience": 0})
    with pytest.raises(ValueError, match="num_keys=5"):
        retrieval_train_config(task, RetrievalConfig(5, 5))
    with pytest.raises(ValueError, match="is a 'lm' config, not retrieval"):
        retrieval_train_config(task, cfg, base="lm_tiny")
    with pytest.raises(ValueError, match="softmax"):
        synthetic.GridPoint(1, "softmax", "delta", 20)
    with pytest.raises(ValueError, match="feature_map='dpfp4'"):
        synthetic.GridPoint(1, "dpfp4", "sum", 20)
    assert len(synthetic.grid(1, "full")) == 30 * 12
    assert len(synthetic.grid(2, "full")) == 10 * 5
    assert set(synthetic.grid(2, "quick")) <= set(synthetic.grid(2, "full"))
    with pytest.raises(ValueError, match="embed_std=0"):
        retrieval_train_config(task, cfg, {"retrieval.embed_std": 0})
    with pytest.raises(ValueError, match="needs init="):
        retrieval_train_config(
            task, cfg, {"retrieval.embed_std": 2.0, "retrieval.init": Init.MODEL}
        )


def test_the_deprecated_protocol_is_overrides_of_the_config_file():
    task, cfg = RetrievalTask(RetrievalSetting.UPDATE, 4), RetrievalConfig(4, 4, d_key=8)
    with pytest.warns(DeprecationWarning, match="retrieval_train_config"):
        protocol = RetrievalProtocol(max_steps=300, eval_every=50, learning_rate=3e-4, seed=2)
    fw = dataclasses.replace(cfg.fast_weight, favor_redraw="per_step")
    fields = {"steps": 300, "seed": 2, "optimizer.learning_rate": 3e-4, "optimizer.clip_norm": None}
    fields |= dict.fromkeys(("eval_every", "log_every", "steps_per_call"), 50)
    fields["checkpoint.every_steps"] = 500
    expected = retrieval_train_config(task, dataclasses.replace(cfg, fast_weight=fw), fields)
    assert protocol.train_config(task, cfg) == expected


@pytest.mark.slow  # ≈ 10 s
def test_key_embedding_variants():
    """OFFICIAL: int(2.2·N)-wide embedding with biases; SCALED / WIDE: PAPER's / OFFICIAL's
    model started at the other's pre-φ key scale; UNTIED / FACTORED: PAPER with a query table of
    its own / a factorised table."""
    points = {
        k: synthetic.GridPoint(1, "dpfp2", "sum", 100, embedding=k) for k in synthetic.KeyEmbedding
    }
    paper, official, scaled, wide, wide_no_bias, untied, factored, narrow_factor = points.values()
    narrow = paper.model_config()
    assert (narrow.d_embed, narrow.use_bias) == (64, False)
    assert (official.model_config().d_embed, official.model_config().use_bias) == (220, True)
    assert scaled.model_config() == narrow and wide.model_config() == official.model_config()
    assert paper.embed_std == official.embed_std == 1.0
    assert scaled.embed_std == pytest.approx((220 / 64) ** 0.5)
    assert wide.embed_std == pytest.approx((64 / 220) ** 0.5)
    assert wide_no_bias.model_config().use_bias is False
    assert wide_no_bias.model_config().d_embed == 220
    assert wide_no_bias.embed_std == wide.embed_std
    assert dataclasses.replace(untied.model_config(), tie_queries=True) == narrow
    assert dataclasses.replace(factored.model_config(), embed_factor=None) == narrow
    assert factored.model_config().embed_factor == 220
    assert dataclasses.replace(factored.model_config(), embed_factor=64) == (
        narrow_factor.model_config()
    )
    assert untied.embed_std == factored.embed_std == 1.0
    assert len({p.name for p in points.values()}) == 8
    # official_init's 5-way split keeps split(key, 4)'s keys: bias-free points keep their draws.
    four, five = jax.random.split(jax.random.key(7), 4), jax.random.split(jax.random.key(7), 5)
    np.testing.assert_array_equal(jax.random.key_data(four), jax.random.key_data(five[:4]))
    # Pre-φ query variance: e/(3·d_key) for OFFICIAL and SCALED, 1/3 for PAPER and WIDE.
    large = 220 / 192
    cases = [(paper, 1 / 3), (official, large), (scaled, large), (wide, 1 / 3)]
    cases += [(untied, 1 / 3), (factored, 1 / 3)]
    models = {}
    for point, want in cases:
        model = models[point.embedding] = RetrievalModel(point.model_config(), rngs=nnx.Rngs(0))
        official_init(model, jax.random.key(0), embed_std=point.embed_std)
        queries = model.query_proj(model.query_table()[jnp.arange(100)])
        assert float(jnp.var(queries)) == pytest.approx(want, rel=0.15)
    # UNTIED: the key table keeps PAPER's draw; the query table is another one.
    key_table = models[synthetic.KeyEmbedding.UNTIED].key_table()
    query_table = models[synthetic.KeyEmbedding.UNTIED].query_table()
    np.testing.assert_array_equal(key_table, models[synthetic.KeyEmbedding.PAPER].key_table())
    assert not np.allclose(key_table, query_table)


def test_tiny_grid_end_to_end_and_resume(tmp_path, monkeypatch):
    first = synthetic.GridPoint(2, "dpfp1", "sum", 5)
    # Attention-normalised predictions are convex combinations of one-hot values, so the loss is
    # at most 1: target_loss=1 stops at the first evaluation.
    fields = _tiny_protocol(**{"early_stopping.target": 1.0})
    kw = dict(out_dir=tmp_path / "points", results_dir=tmp_path, log=lambda *a, **k: None)
    records = synthetic.run_grid([first], fields, **kw)
    with (tmp_path / "synthetic_setting2.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert set(synthetic.CSV_COLUMNS) <= set(row)
    assert (row["setting"], row["feature_map"], row["update_rule"]) == ("2", "dpfp1", "sum")
    assert (row["n_keys"], row["d_dot"], row["normalization"]) == ("5", "128", "attention")
    assert (row["steps"], row["stop_reason"]) == ("5", "target")
    assert float(row["learning_rate"]) == synthetic.PAPER_LR
    assert float(row["final_eval_loss"]) == records[0]["final_eval_loss"] <= 1.0
    assert len(records[0]["history"]) == 1
    assert (tmp_path / "synthetic_setting2.png").stat().st_size > 0
    assert "dpfp1 sum" in (tmp_path / "synthetic_setting2.md").read_text()

    # Resuming with one more point: only the unfinished point runs; the finished one is kept.
    second = synthetic.GridPoint(2, "linear", "delta", 5)
    ran = []

    def fake_run_point(point, fields, out_dir):
        ran.append(point)
        record = dict(records[0], feature_map=point.feature_map, update_rule=point.update_rule)
        path = synthetic.point_path(out_dir, point)
        path.write_text(json.dumps(record))
        return record

    monkeypatch.setattr(synthetic, "run_point", fake_run_point)
    again = synthetic.run_grid([first, second], fields, **kw)
    assert ran == [second]
    assert len(again) == 2 and records[0] in again


@pytest.mark.slow  # ≈ 10 s
def test_cli_points_selects_single_grid_points(tmp_path, monkeypatch):
    """``--points`` runs just the named points (here one softmax point, one evaluation) and
    rejects names outside the grid; ``--embedding official`` runs the same point as its own."""
    # main() limits XLA threads through XLA_FLAGS (for subprocesses): restore it afterwards.
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    argv = ["--setting", "1", "--grid", "quick", "--max-steps", "100", "--results", str(tmp_path)]
    with pytest.raises(SystemExit):
        synthetic.main([*argv, "--points", "softmax_sum_n30"])
    with pytest.raises(SystemExit):  # a probe's learning rate, into the grid's results folder
        synthetic.main(["--setting", "1", "--learning-rate", "0.01"])
    synthetic.main([*argv, "--points", "softmax_sum_n20"])
    files = sorted(p.name for p in (tmp_path / "synthetic" / "setting1").glob("*.json"))
    assert files == ["softmax_sum_n20_seed0.json"]
    # The official code's key embedding is a separate point (own file, own table column).
    synthetic.main([*argv, "--points", "softmax_sum_n20", "--embedding", "official"])
    files = sorted(p.name for p in (tmp_path / "synthetic" / "setting1").glob("*.json"))
    assert files == ["softmax_sum_n20_official_seed0.json", "softmax_sum_n20_seed0.json"]
    record = json.loads((tmp_path / "synthetic" / "setting1" / files[0]).read_text())
    assert record["key_embedding"] == "official"
    header = (tmp_path / "synthetic_setting1.md").read_text().splitlines()[2]
    assert "softmax sum official emb." in header and "| softmax sum |" in header
