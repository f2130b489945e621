"""The synthetic retrieval experiments' training gradient on XLA:CPU (one core): the memory keys
``W_k x_t`` from two row gathers of projected tables (what ``fwjax.train.retrieval`` does) vs the
per-position product ``embed(k_t) @ W_e`` (what it did before), side by side in one process,
alternating, with the largest gradient difference between the two.

    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \\
        taskset -c 0 python -m benchmarks.retrieval_step [--repeats 10]

Each point is a grid point of ``experiments/synthetic.py`` (setting, feature map, rule, N), batch
32, one query per sequence, the closed-form readout (``Readout.DIRECT``).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.synthetic import GridPoint
from fwjax.data.retrieval import retrieval_loss
from fwjax.nn.retrieval import RetrievalModel
from fwjax.train import retrieval

POINTS = (
    (1, "softmax", "sum", 600),
    (1, "linear", "sum", 600),
    (1, "dpfp1", "sum", 400),
    (1, "dpfp3", "sum", 300),
    (2, "favor64", "delta", 160),
    (2, "dpfp2", "delta", 200),
)


def per_position_projections(model, keys, values):
    """The former ``_token_projections``: ``W_v[v_t] + embed(k_t) @ W_e`` for every position."""
    num_values = model.config.num_values
    emb = model.embed(keys)
    wk, wb = model.key_proj.kernel[...], model.beta_proj.kernel[...]
    k = wk[:num_values][values] + emb @ wk[num_values:]
    beta_logit = (wb[:num_values][values] + emb @ wb[num_values:])[..., 0]
    return k, beta_logit


def _time(fn, args, repeats):
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t0) / repeats * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two forms")
    args = parser.parse_args()
    tables = retrieval._token_projections
    forms = {"per-position": per_position_projections, "tables": tables}
    print(f"backend={jax.default_backend()} batch=32 repeats={args.repeats}")
    header = ("point", "per-position (ms)", "tables (ms)", "speed-up", "max |Δg|")
    print("{:<24} {:>18} {:>12} {:>9} {:>9}".format(*header))
    try:
        for setting, fm, rule, n in POINTS:
            point = GridPoint(setting, fm, rule, n)
            model = RetrievalModel(point.model_config(), rngs=nnx.Rngs(params=0))
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            batch = point.task().batch(0, 0, 32)

            def loss(params, batch, graphdef=graphdef, rest=rest):
                m = nnx.merge(graphdef, params, rest)
                pred = retrieval.predictions(m, batch, retrieval.Readout.DIRECT)
                return retrieval_loss(pred, batch["targets"], batch["mask"])

            best, grads = {}, {}
            for _ in range(args.rounds):
                for name, fn in forms.items():
                    retrieval._token_projections = fn  # read at trace time by the readout
                    grad = jax.jit(jax.grad(loss))
                    ms = _time(grad, (params, batch), args.repeats)
                    best[name] = min(best.get(name, ms), ms)
                    grads[name] = grad(params, batch)
            diff = max(
                float(jnp.max(jnp.abs(a - b)))
                for a, b in zip(*(jax.tree.leaves(g) for g in grads.values()), strict=True)
            )
            old, new = best.values()
            print(f"{point.name:<24} {old:>18.1f} {new:>12.1f} {old / new:>8.1f}x {diff:>9.1e}")
    finally:
        retrieval._token_projections = tables


if __name__ == "__main__":
    main()
