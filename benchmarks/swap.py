"""Side-by-side timing of two forms of one function, swapped in at trace time (for the
benchmarks that compare a change with the form it replaced, in one process)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def time_ms(fn, args, repeats: int) -> float:
    """Mean milliseconds of ``fn(*args)`` over ``repeats`` calls after one warm-up call."""
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t0) / repeats * 1e3


def compare_swapped(module, attribute: str, forms, make_fn, args, repeats: int, rounds: int):
    """Times ``jax.jit(make_fn())(*args)`` with ``module.attribute`` set to each of the two
    ``forms`` in turn, alternating ``rounds`` times; the attribute is restored afterwards.

    Returns:
      ``(best ms with forms[0], best ms with forms[1], max |difference| of the outputs)``.
    """
    original = getattr(module, attribute)
    best, outs = [float("inf")] * 2, [None] * 2
    try:
        for _ in range(rounds):
            for i, form in enumerate(forms):
                setattr(module, attribute, form)  # read when make_fn's function is traced
                fn = jax.jit(make_fn())
                best[i] = min(best[i], time_ms(fn, args, repeats))
                outs[i] = fn(*args)
    finally:
        setattr(module, attribute, original)
    diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(*(jax.tree.leaves(o) for o in outs), strict=True)
    )
    return best[0], best[1], diff
