"""The benchmark's own pieces: its float64 reference, and a smoke run of the driver."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import common
from benchmarks.reference_np import delta_rule_head
from fwjax.ops import Impl, delta_rule
from tests.jax_compat import enable_x64

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_numpy_reference_matches_jax_autodiff():
    q, k, v, beta, do = common.make_inputs(1, 23, 1, seed=3)
    ref = delta_rule_head(q[0, :, 0], k[0, :, 0], v[0, :, 0], beta[0, :, 0], do[0, :, 0])
    with enable_x64(True):
        args = [jnp.asarray(x, jnp.float64) for x in (q, k, v, beta)]
        o, pullback = jax.vjp(lambda *a: delta_rule(*a, impl=Impl.REFERENCE)[0], *args)
        grads = pullback(jnp.asarray(do, jnp.float64))
        for name, x in zip(("o", "dq", "dk", "dv", "dbeta"), (o, *grads), strict=True):
            np.testing.assert_allclose(np.asarray(x)[0, :, 0], ref[name], atol=1e-12)


def test_flop_and_byte_models():
    cfg = common.Config("fwjax_chunked", 2, 3, 128, "fwdbwd", 32)
    assert common.model_flops(cfg) == 3 * 6 * 64 * 64 * 2 * 3 * 128
    assert common.algorithm_flops(cfg) > common.model_flops(cfg)
    assert common.io_bytes(cfg) == 4 * 2 * 128 * 3 * (64 * 3 + 1) * 2 + 4 * 2 * 128 * 3 * 64 * 2


# Slow (33 s): the driver's smoke run; -m slow, or `python -m benchmarks.run --quick`.
@pytest.mark.slow
def test_driver_quick_mode_runs_every_fwjax_path(tmp_path):
    out = tmp_path / "quick.jsonl"
    env = dict(os.environ, FWJAX_BENCH_CACHE=str(tmp_path / "cache"), PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--no-torch", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    impls = {r["impl"] for r in records}
    assert {"fwjax_recurrent", "fwjax_chunked", "fwjax_naive", "fwjax_auto"} <= impls
    for r in records:
        assert r["max_rel_err"] < 1e-5, r
        assert r["seconds"] > 0 and r["peak_bytes"] > 0, r
    assert "tokens/s" in proc.stdout


def test_retrieval_points_are_the_synthetic_grids_points():
    """benchmarks.retrieval_points builds, from the library alone, the model and task of
    experiments.synthetic's grid points (the benchmarks' points and a few more)."""
    from benchmarks import feature_maps, retrieval_points, retrieval_step
    from experiments.synthetic import GridPoint

    extra = ((1, "favor128", "sum", 20), (2, "dpfp3", "delta", 40), (1, "softmax", "sum", 20))
    for spec in {*feature_maps.POINTS, *retrieval_step.POINTS, *extra}:
        name, config, task = retrieval_points.point(*spec)
        grid = GridPoint(*spec)
        assert (name, config, task) == (grid.name, grid.model_config(), grid.task()), spec
    with pytest.raises(ValueError, match="dpfpN or favorM"):
        retrieval_points.feature_map("dpfp0")
    with pytest.raises(ValueError, match="softmax takes"):
        retrieval_points.point(1, "softmax", "delta", 20)


@pytest.mark.slow  # ≈ 13 s; the points themselves are checked against the grid above
def test_retrieval_gradient_problem_is_the_training_loss():
    from benchmarks import retrieval_points

    _, config, task = retrieval_points.point(2, "dpfp1", "delta", 4)
    loss, params = retrieval_points.gradient_problem(config, task, batch_size=2)
    value, grads = jax.value_and_grad(loss)(params)
    assert np.isfinite(float(value)) and float(value) > 0
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and max(norms) > 0
