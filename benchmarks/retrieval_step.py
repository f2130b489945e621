"""The synthetic retrieval experiments' training gradient on XLA:CPU (one core), each change of
``fwjax.train.retrieval`` / ``fwjax.ops.readout`` against the form it replaced, side by side in
one process, alternating, with the largest gradient difference between the two forms:

* ``projections``: memory keys ``W_v[v_t] + (E W_e)[k_t]`` from two row gathers of projected
  tables vs the per-position product ``W_v[v_t] + embed(k_t) @ W_e``;
* ``delta readout``: the delta rule's read weights by back substitution with one ``K``-vector
  per query (``fwjax.ops.readout.delta_read_weights``) vs forming
  ``A = tril(diag(β) K̂K̂ᵀ, −1)`` and the blocked solve ``fwjax.ops.linalg.solve_unit_lower``;
* ``readout VJP``: that back substitution's hand-written VJP (a forward scan rebuilding the
  carried vector) vs autodiff through its scan.

    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \\
        taskset -c 0 python -m benchmarks.retrieval_step [--repeats 10] [--change "readout VJP"]

Each point is a grid point of ``experiments/synthetic.py`` (setting, feature map, rule, N), batch
32, one query per sequence, the closed-form readout (``Readout.DIRECT``).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.retrieval_points import gradient_problem, point
from benchmarks.swap import compare_swapped
from fwjax.ops import readout
from fwjax.ops.linalg import solve_unit_lower
from fwjax.train import retrieval

POINTS = (
    (1, "softmax", "sum", 600),
    (1, "linear", "sum", 600),
    (1, "dpfp1", "sum", 400),
    (1, "dpfp3", "sum", 300),
    (2, "favor64", "delta", 160),
    (2, "dpfp2", "delta", 200),
    (1, "linear", "delta", 600),
    (1, "dpfp1", "delta", 600),
    (1, "dpfp3", "delta", 600),
)


def per_position_projections(model, keys, values):
    """The former ``_token_projections``: ``W_v[v_t] + embed(k_t) @ W_e`` for every position."""
    num_values = model.config.num_values
    emb = model.embed(keys)
    wk, wb = model.key_proj.kernel[...], model.beta_proj.kernel[...]
    k = wk[:num_values][values] + emb @ wk[num_values:]
    beta_logit = (wb[:num_values][values] + emb @ wb[num_values:])[..., 0]
    return k, beta_logit


def solve_read_weights(fq, fk, beta):
    """The former delta readout: ``r = (s (I + A)⁻¹) ⊙ β`` through the ``L × L`` matrix ``A``."""
    s = jnp.einsum("bqk,blk->bql", fq, fk)
    a = beta[:, :, None] * jnp.einsum("blk,bmk->blm", fk, fk)
    return solve_unit_lower(s, a) * beta[:, None, :]


# (name, module, attribute, the former form), the current form being the attribute itself.
CHANGES = (
    ("projections", retrieval, "_token_projections", per_position_projections),
    ("delta readout", readout, "delta_read_weights", solve_read_weights),
    ("readout VJP", readout, "delta_read_weights", readout.delta_read_weights_autodiff),
)


def _compare(config, task, module, attribute, former, repeats, rounds):
    """Best times (ms) of the former and the current form, and the max gradient difference."""
    loss, params = gradient_problem(config, task)
    forms = (former, getattr(module, attribute))
    return compare_swapped(
        module, attribute, forms, lambda: jax.grad(loss), (params,), repeats, rounds
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two forms")
    parser.add_argument(
        "--change", action="append", choices=[c[0] for c in CHANGES], help="only these changes"
    )
    args = parser.parse_args()
    print(f"backend={jax.default_backend()} batch=32 repeats={args.repeats} rounds={args.rounds}")
    header = ("change", "point", "former (ms)", "current (ms)", "speed-up", "max |Δg|")
    print("{:<14} {:<24} {:>12} {:>12} {:>9} {:>9}".format(*header))
    for name, module, attribute, former in CHANGES:
        if args.change and name not in args.change:
            continue
        for setting, fm, rule, n in POINTS:
            if name != "projections" and rule != "delta":
                continue
            label, config, task = point(setting, fm, rule, n)
            old, new, diff = _compare(
                config, task, module, attribute, former, args.repeats, args.rounds
            )
            row = f"{name:<14} {label:<24} {old:>12.1f} {new:>12.1f} {old / new:>8.1f}x"
            print(f"{row} {diff:>9.1e}", flush=True)


if __name__ == "__main__":
    main()
