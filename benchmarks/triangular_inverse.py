"""Benchmark of the matmul-only unit lower-triangular inverse: block size of the forward
substitution vs chunk size, jitted forward + gradient (what the chunked delta rule pays).

    python benchmarks/triangular_inverse.py [--batch 256] [--repeats 20]
"""

import argparse
import time

import jax
import jax.numpy as jnp

from fwjax.ops.linalg import unit_lower_triangular_inverse


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"backend={jax.default_backend()} batch={args.batch}")
    print(f"{'C':>4} {'block':>5} {'compile+1 (s)':>14} {'fwd+grad (ms)':>14} {'max |XL - I|':>13}")
    for c in (16, 32, 64):
        a = jnp.tril(0.2 * jax.random.normal(jax.random.key(0), (args.batch, c, c)), -1)
        for block in (1, 4, 8, 16):

            def loss(a, block=block):
                return jnp.sum(jnp.sin(unit_lower_triangular_inverse(a, block_size=block)))

            grad = jax.jit(jax.grad(loss))
            t0 = time.perf_counter()
            grad(a).block_until_ready()
            compile_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                grad(a).block_until_ready()
            run_ms = (time.perf_counter() - t0) / args.repeats * 1e3
            x = unit_lower_triangular_inverse(a, block_size=block)
            err = float(jnp.max(jnp.abs(x @ (jnp.eye(c) + a) - jnp.eye(c))))
            print(f"{c:>4} {block:>5} {compile_s:>14.2f} {run_ms:>14.2f} {err:>13.1e}")


if __name__ == "__main__":
    main()
