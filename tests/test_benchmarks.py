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


def _gpu_space():
    """A profile as a GPU writes it: kernels on a stream line, the same launches again on the
    derived ``XLA Ops`` line, host events on the CPU plane, and a custom device plane."""
    from jax.profiler import ProfileData

    def event(metadata_id, start_us, us):
        return (
            f"events {{ metadata_id: {metadata_id} offset_ps: {start_us * 10**6} "
            f"duration_ps: {us * 10**6} }}"
        )

    # The second kernel starts before the first ends (programmatic dependent launch).
    kernels = (("delta_wy", 1, 0, 30), ("loop_fusion", 2, 28, 5), ("delta_wy", 1, 50, 30))
    stream = " ".join(event(i, start, us) for _, i, start, us in kernels)
    derived = " ".join(event(3, start, us) for _, _, start, us in kernels)
    metadata = " ".join(
        f'event_metadata {{ key: {i} value {{ id: {i} name: "{name}" }} }}'
        for i, name in ((1, "delta_wy"), (2, "loop_fusion"), (3, "custom-call.7"))
    )
    text = f"""
    planes {{ id: 1 name: "/host:CPU"
      lines {{ id: 1 name: "python" {event(1, 0, 500)} }}
      event_metadata {{ key: 1 value {{ id: 1 name: "PjitFunction(fwdbwd)" }} }} }}
    planes {{ id: 2 name: "/device:GPU:0"
      lines {{ id: 1 name: "Stream #13(Compute)" {stream} }}
      lines {{ id: 2 name: "XLA Ops" {derived} }}
      {metadata} }}
    planes {{ id: 3 name: "/device:CUSTOM:MOSAIC"
      lines {{ id: 1 name: "trace" {derived} }}
      {metadata} }}
    """
    return ProfileData.from_serialized_xspace(ProfileData.text_proto_to_serialized_xspace(text))


def test_gpu_profile_counts_each_kernel_launch_once_per_call():
    """The per-kernel times of a GPU profile come from its GPU planes' stream lines, every
    launch in full: the derived ``XLA Ops`` line, the host plane and other device planes would
    count the same time again."""
    from benchmarks.gpu_profile import summarise, xspace_kernels

    kernels = sorted(xspace_kernels(_gpu_space()))
    assert kernels == [("delta_wy", 30000.0), ("delta_wy", 30000.0), ("loop_fusion", 5000.0)]
    profile = summarise([(name, ns, 1) for name, ns in kernels], calls=2, top=1)
    assert profile["device_us_per_call"] == pytest.approx(32.5)
    (top,) = profile["kernels"]
    assert top == {
        "name": "delta_wy",
        "launches_per_call": 1.0,
        "us_per_call": pytest.approx(30.0),
        "share": pytest.approx(60 / 65),
    }
    assert profile["other_us_per_call"] == pytest.approx(2.5)


def test_jax_kernel_times_profiles_a_compiled_call_on_this_machine():
    """On CPU the thunks XLA ran, outermost only: each runs a whole number of times per call,
    and their time does not exceed the wall time."""
    from benchmarks.gpu_profile import format_profile, jax_kernel_times

    x = jnp.ones((64, 64))
    f = jax.jit(lambda x: jax.lax.fori_loop(0, 4, lambda i, y: jnp.tanh(y @ x), x).sum())
    call = lambda: jax.block_until_ready(f(x))
    call()
    profile = jax_kernel_times(call, calls=3)
    assert profile["calls"] == 3 and profile["kernels"]
    assert 0 < profile["device_us_per_call"] <= profile["wall_us_per_call"]
    for kernel in profile["kernels"]:
        assert kernel["us_per_call"] > 0
        assert (3 * kernel["launches_per_call"]).is_integer()
    assert "us/call" in format_profile(profile)


def test_cpu_profile_counts_a_loops_thunks_in_the_loop():
    """Without a device plane, the host's XLA thunks (events with an ``hlo_op`` stat); a thunk
    contained in a loop's event is part of the loop's time, not counted twice (one that only
    overlaps it is counted)."""
    from jax.profiler import ProfileData

    from benchmarks.gpu_profile import xspace_kernels

    def event(metadata_id, start_us, us, hlo=True):
        stat = 'stats { metadata_id: 1 str_value: "x" }' if hlo else ""
        return (
            f"events {{ metadata_id: {metadata_id} offset_ps: {start_us * 10**6} "
            f"duration_ps: {us * 10**6} {stat} }}"
        )

    events = [event(1, 0, 100), event(2, 10, 40), event(2, 60, 30), event(3, 95, 7)]
    text = f"""
    planes {{ id: 1 name: "/host:CPU"
      lines {{ id: 1 name: "tf_XLAPjRtCpuClient" {" ".join(events)} {event(4, 200, 9, False)} }}
      stat_metadata {{ key: 1 value {{ id: 1 name: "hlo_op" }} }}
      event_metadata {{ key: 1 value {{ id: 1 name: "while.3" }} }}
      event_metadata {{ key: 2 value {{ id: 2 name: "dot.1" }} }}
      event_metadata {{ key: 3 value {{ id: 3 name: "reduce.2" }} }}
      event_metadata {{ key: 4 value {{ id: 4 name: "ThreadpoolListener::Record" }} }} }}
    """
    space = ProfileData.from_serialized_xspace(ProfileData.text_proto_to_serialized_xspace(text))
    assert list(xspace_kernels(space)) == [("while.3", 100000.0), ("reduce.2", 7000.0)]


@pytest.mark.parametrize("profiled", [False, True], ids=["timed", "profiled"])
def test_gpu_bench_records_and_prints_a_timed_job(profiled):
    """A worker's timing becomes one record (the job, the times, the rates) that the driver
    prints, with the kernels only when the job was profiled."""
    from benchmarks.gpu_bench import Job, format_result, time_record

    job = Job("fwjax_pallas", 2, 1024, 4, 64, "fwdbwd", 20, False, profiled)
    res = {"compile_s": 3.0, "warmup_calls": 4, "median_s": 2e-3, "p10_s": 1.9e-3, "p90_s": 2.2e-3}
    if profiled:
        kernel = {"name": "delta_rule_wy", "launches_per_call": 1.0, "us_per_call": 150.0}
        res["kernels"] = {
            "calls": 3,
            "device_us_per_call": 1500.0,
            "wall_us_per_call": 1800.0,
            "kernels": [{**kernel, "share": 0.1}],
            "other_us_per_call": 1350.0,
        }
    rec = time_record(job, res)
    assert rec["tokens_per_s"] == pytest.approx(2 * 1024 / 2e-3) and rec["profile"] is profiled
    text = format_result(job.name, json.loads(json.dumps(rec)))
    assert text.startswith("   fwjax_pallas|B2T1024H4D64|fwdbwd: 2.00 ms (1.90–2.20)")
    assert ("delta_rule_wy" in text) is profiled
