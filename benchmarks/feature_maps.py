"""DPFP-ν's hand-written VJP vs autodiff through its definition (``relu``, ``roll``) on XLA:CPU,
side by side in one process, alternating: the feature map's gradient alone on ``[32, 400, 64]``,
then whole training-step gradients of synthetic retrieval grid points (``experiments/synthetic.py``,
batch 32, one query, the closed-form readout).

    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \\
        taskset -c 0 python -m benchmarks.feature_maps [--repeats 10]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.retrieval_points import gradient_problem, point
from benchmarks.swap import compare_swapped
from fwjax.ops import feature_maps

POINTS = (
    (1, "dpfp1", "sum", 400),
    (1, "dpfp3", "sum", 300),
    (1, "dpfp3", "sum", 600),
    (2, "dpfp2", "delta", 200),
)


def dpfp_autodiff(x, nu=1):
    """DPFP's definition, differentiated by JAX (what ``feature_maps.dpfp`` was)."""
    r = jnp.concatenate([jax.nn.relu(x), jax.nn.relu(-x)], axis=-1)
    return jnp.concatenate([r * jnp.roll(r, j, axis=-1) for j in range(1, nu + 1)], axis=-1)


def compare(make_grad, args, repeats, rounds):
    """Best times (ms) with autodiff and with the VJP, and the max gradient difference."""
    forms = (dpfp_autodiff, feature_maps.dpfp)
    return compare_swapped(feature_maps, "dpfp", forms, make_grad, args, repeats, rounds)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two forms")
    args = parser.parse_args()
    print(f"backend={jax.default_backend()} repeats={args.repeats} rounds={args.rounds}")
    header = ("gradient of", "autodiff (ms)", "vjp (ms)", "speed-up", "max |Δg|")
    print("{:<26} {:>13} {:>9} {:>9} {:>9}".format(*header))

    def row(name, old, new, diff):
        print(f"{name:<26} {old:>13.1f} {new:>9.1f} {old / new:>8.1f}x {diff:>9.1e}", flush=True)

    kx, kg = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (32, 400, 64))
    for nu in (1, 2, 3):
        g = jax.random.normal(kg, (32, 400, 128 * nu))

        def make_grad(g=g, nu=nu):
            return jax.grad(lambda x: jnp.sum(feature_maps.dpfp(x, nu) * g))

        row(f"dpfp{nu} alone", *compare(make_grad, (x,), args.repeats, args.rounds))
    for setting, fm, rule, n in POINTS:
        name, config, task = point(setting, fm, rule, n)
        loss, params = gradient_problem(config, task)
        row(name, *compare(lambda loss=loss: jax.grad(loss), (params,), args.repeats, args.rounds))


if __name__ == "__main__":
    main()
