"""Chunked delta rule on this backend: phase 1 inside the chunk scan ("fused") vs for all chunks
up front ("two-phase"), at C = 16/32/64, next to RECURRENT; jitted fwd and fwd+bwd, in ms.
``--segments P``: also the two-phase schedule with its chunk scans split into P parallel
segments (``state_segments``), at C = 32.

    python -m benchmarks.chunk_schedule [--segments 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks import common
from fwjax.ops import Impl, delta_rule
from fwjax.ops.common import from_chunks, to_chunks
from fwjax.ops.delta_rule.chunked import delta_chunks


def bench(fn, repeats=5):
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def time_op(op, args, do) -> str:
    """``"fwd ms / fwd+bwd ms"`` of the jitted ``op(*args)`` and its VJP with cotangent ``do``."""
    fwd = jax.jit(op)
    fwd_bwd = jax.jit(lambda *a: jax.vjp(op, *a)[1](do))
    return f"{bench(lambda: fwd(*args)):.1f} / {bench(lambda: fwd_bwd(*args)):.1f}"


def chunked_op(b, h, t, chunk, fused, segments=1):
    def op(q, k, v, beta):
        s0 = jnp.zeros((b, h, common.D, common.D), jnp.float32)
        chunks = (to_chunks(x, chunk) for x in (q, k, v, beta))
        o, _ = delta_chunks(*chunks, s0, fused, segments)
        return from_chunks(o, t)

    return op


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--segments", type=int, nargs="*", default=[])
    args = parser.parse_args(argv)
    print(f"backend={jax.default_backend()}")
    variants = ["recurrent"] + [f"{s}{c}" for c in (16, 32, 64) for s in ("fused", "two-phase")]
    variants += [f"two-phase32-P{p}" for p in args.segments]
    print("| B | H | T | " + " | ".join(f"{v} fwd / fwd+bwd" for v in variants) + " |")
    for b, h, t in ((8, 8, 256), (8, 8, 1024), (1, 4, 256), (1, 4, 1024)):
        q, k, v, beta, do = (jnp.asarray(x) for x in common.make_inputs(b, t, h))
        cells = []
        for name in variants:
            if name == "recurrent":
                op = lambda q, k, v, beta: delta_rule(q, k, v, beta, impl=Impl.RECURRENT)[0]
            elif "-P" in name:
                op = chunked_op(b, h, t, 32, False, int(name.rsplit("-P", 1)[1]))
            else:
                op = chunked_op(b, h, t, int(name[-2:]), name.startswith("fused"))
            cells.append(time_op(op, (q, k, v, beta), do))
        print(f"| {b} | {h} | {t} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
