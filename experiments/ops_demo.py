"""The main job until the training system lands: a fast weight memory demo on the pure ops.

Writes random key/value associations into a fast weight memory, overwrites some of them (repeated
keys with new values), then queries every key, and reports the retrieval error of the sum rule
and the delta rule against the LATEST value of each key. Also checks that every Impl agrees and
times them on this backend.

    python -m experiments.ops_demo [--keys 24] [--dim 64] [--repeats 0.5] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from fwjax.ops import Impl, delta_rule, feature_maps, sum_rule
from fwjax.ops.impl import resolve_impl


def make_task(n_keys: int, dim: int, repeat_fraction: float, seed: int):
    """Unit-norm, nearly orthogonal keys; a random subset is written twice with a new value."""
    rng = np.random.default_rng(seed)
    keys = feature_maps.l2_norm(jnp.asarray(rng.normal(size=(n_keys, dim)), jnp.float32))
    values = jnp.asarray(rng.normal(size=(n_keys, dim)), jnp.float32)
    n_rep = round(repeat_fraction * n_keys)
    rep = rng.choice(n_keys, size=n_rep, replace=False)
    new_values = jnp.asarray(rng.normal(size=(n_rep, dim)), jnp.float32)
    seq_k = jnp.concatenate([keys, keys[rep]])[None, :, None]  # [1, T, 1, K]
    seq_v = jnp.concatenate([values, new_values])[None, :, None]
    latest = values.at[rep].set(new_values)
    return keys, seq_k, seq_v, latest


def retrieval_error(state, keys, latest):
    """Mean squared error of reading every key ``Sᵀk`` against its latest value."""
    read = jnp.einsum("kv,nk->nv", state[0, 0], keys)
    return float(jnp.mean((read - latest) ** 2))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=24)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=float, default=0.5, help="fraction of keys rewritten")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    print(
        f"fwjax ops demo on backend={jax.default_backend()}, AUTO={resolve_impl(Impl.AUTO).value}"
    )
    keys, seq_k, seq_v, latest = make_task(args.keys, args.dim, args.repeats, args.seed)
    t = seq_k.shape[1]
    beta = jnp.ones((1, t, 1), jnp.float32)
    print(f"{args.keys} keys of dim {args.dim}, {t - args.keys} of them rewritten (T={t})")

    _, s_sum = sum_rule(seq_k, seq_k, seq_v)
    _, s_delta = delta_rule(seq_k, seq_k, seq_v, beta)
    zero_error = float(jnp.mean(latest**2))
    print(f"  retrieval MSE, predicting zeros : {zero_error:.4f}")
    print(f"  retrieval MSE, sum rule         : {retrieval_error(s_sum, keys, latest):.4f}")
    print(f"  retrieval MSE, delta rule (β=1) : {retrieval_error(s_delta, keys, latest):.4f}")

    # Every implementation computes the same memory; time them on a longer random sequence.
    rng = np.random.default_rng(args.seed + 1)
    b, h, d, tt = 4, 4, args.dim, 1024
    q, k = (
        feature_maps.l2_norm(jnp.asarray(rng.normal(size=(b, tt, h, d)), jnp.float32))
        for _ in range(2)
    )
    v = jnp.asarray(rng.normal(size=(b, tt, h, d)), jnp.float32)
    bb = jnp.asarray(rng.uniform(size=(b, tt, h)), jnp.float32)
    ref_out, _ = delta_rule(q, k, v, bb, impl=Impl.REFERENCE)
    print(f"delta rule, B={b} T={tt} H={h} K=V={d}: max |out - REFERENCE| and forward time")
    for impl in (Impl.REFERENCE, Impl.RECURRENT, Impl.CHUNKED):
        fn = jax.jit(lambda q, k, v, bb, impl=impl: delta_rule(q, k, v, bb, impl=impl)[0])
        out = fn(q, k, v, bb).block_until_ready()
        start = time.perf_counter()
        for _ in range(3):
            fn(q, k, v, bb).block_until_ready()
        ms = (time.perf_counter() - start) / 3 * 1e3
        err = float(jnp.max(jnp.abs(out - ref_out)))
        print(f"  {impl.value:10s} max err {err:.1e}   {ms:8.1f} ms")


if __name__ == "__main__":
    main()
