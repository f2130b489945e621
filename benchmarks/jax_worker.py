"""Benchmark worker for the fwjax implementations: runs ONE configuration and prints one JSON line.

python -m benchmarks.jax_worker '<Config JSON>'      # or: python -m benchmarks.jax_worker matmul
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from fwjax.ops import Impl, delta_rule


def naive_delta_rule(q, k, v, beta):
    """Autodiff baseline: a plain per-token ``lax.scan`` with no custom VJP (stores every state)."""

    def step(s, inputs):
        q_t, k_t, v_t, b_t = inputs
        u = b_t[..., None] * (v_t - jnp.einsum("bhk,bhkv->bhv", k_t, s))
        s = s + k_t[..., :, None] * u[..., None, :]
        return s, jnp.einsum("bhk,bhkv->bhv", q_t, s)

    b, _, h, d = q.shape
    s0 = jnp.zeros((b, h, d, v.shape[-1]), q.dtype)
    _, o = jax.lax.scan(step, s0, tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, beta)))
    return jnp.moveaxis(o, 0, 1)


def op_for(cfg: common.Config):
    if cfg.impl == "fwjax_naive":
        return naive_delta_rule
    impl = {
        "fwjax_recurrent": Impl.RECURRENT,
        "fwjax_chunked": Impl.CHUNKED,
        "fwjax_auto": Impl.AUTO,
    }[cfg.impl]
    return lambda q, k, v, beta: delta_rule(q, k, v, beta, impl=impl, chunk_size=cfg.chunk or None)[
        0
    ]


def build(cfg: common.Config):
    op = op_for(cfg)
    if cfg.mode == "fwd":
        return jax.jit(lambda q, k, v, beta, do: (op(q, k, v, beta),))

    def fwd_bwd(q, k, v, beta, do):
        o, pullback = jax.vjp(op, q, k, v, beta)
        return (o, *pullback(do))

    return jax.jit(fwd_bwd)


def run(cfg: common.Config) -> dict:
    seq = jax.ShapeDtypeStruct((cfg.b, cfg.t, cfg.h, common.D), jnp.float32)
    bshape = jax.ShapeDtypeStruct((cfg.b, cfg.t, cfg.h), jnp.float32)
    start = time.perf_counter()
    compiled = build(cfg).lower(seq, seq, seq, bshape, seq).compile()
    compile_s = time.perf_counter() - start

    arrays = [jnp.array(x) for x in common.make_inputs(cfg.b, cfg.t, cfg.h)]
    jax.block_until_ready(arrays)
    gc.collect()
    base = common.reset_peak_rss()
    out = jax.block_until_ready(compiled(*arrays))
    peak = common.peak_rss() - base + 4 * sum(x.size for x in arrays)

    names = ("o",) if cfg.mode == "fwd" else ("o", "dq", "dk", "dv", "dbeta")
    head0 = {n: np.asarray(x[0, :, 0]) for n, x in zip(names, out, strict=True)}
    del out
    times = []
    for _ in range(cfg.repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*arrays))
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)

    from benchmarks.reference_np import reference_for

    ref = reference_for(cfg)
    err = common.max_rel_error(head0, {n: ref[n] for n in names})
    return {"seconds": seconds, "compile_s": compile_s, "peak_bytes": peak, "max_rel_err": err}


def matmul_gflops(n: int = 2048, repeats: int = 10) -> dict:
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    f = jax.jit(lambda a: a @ a)
    jax.block_until_ready(f(a))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(a))
        times.append(time.perf_counter() - start)
    return {"matmul_gflops": 2 * n**3 / statistics.median(times) / 1e9}


def main():
    arg = sys.argv[1]
    result = matmul_gflops() if arg == "matmul" else run(common.Config.from_json(arg))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
