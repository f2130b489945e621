"""Drift of the delta rule's chunk-state chain in one matmul per chunk against two, vs float64.

The chunked delta rule's sequential part is the chain ``S ← S + Kᵀ (U − W S)`` (two dependent
matmuls per chunk, ``2·C·K·V`` flops). It is affine in ``S``, so it can also run as
``S ← M S + B`` with ``M = I − Kᵀ W`` and ``B = Kᵀ U`` formed in parallel beforehand: one
dependent matmul of ``K·K·V`` flops (half the chain's latency for ``K ≤ 2C``). ``M`` multiplies
the state at every chunk, so its rounding could compound over a long sequence; this script
measures that against the float64 chain on the same inputs.

Inputs: L2-normalised keys, β ∈ (0, 1), ``B1 H2``, ``D 64``, ``C 64``; phase 1 (W, U) in float32
from the inputs (as every form computes it). Precisions: ``float32`` (fp32 operands) and
``bf16 operands`` (the state, ``M``, ``W``, ``K``, ``U`` rounded to bfloat16 as matmul operands,
float32 accumulation and carry: the PALLAS ``INPUT`` policy), each against the float64 chain of
the same (rounded) inputs. Reported: the relative Frobenius error of the state after 1/8, 1/4,
1/2 and all of the sequence.

    python -m benchmarks.chain_drift [--length 32768]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from fwjax.ops.common import mT, to_chunks, wy_terms

try:  # `jax.enable_x64` in current jax, `jax.experimental.enable_x64` at the version floor
    enable_x64 = jax.enable_x64
except AttributeError:
    from jax.experimental import enable_x64  # type: ignore[no-redef]


def _inputs(b, t, h, d, seed=0):
    rng = np.random.default_rng(seed)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    q = unit(rng.normal(size=(b, t, h, d)))
    k = unit(rng.normal(size=(b, t, h, d)))
    v = rng.normal(size=(b, t, h, d))
    beta = rng.uniform(0.05, 0.95, size=(b, t, h))
    return q, k, v, beta


def _dot(a, b, md):
    return jnp.matmul(a.astype(md), b.astype(md), preferred_element_type=jnp.float32)


def chains(k, w, u, md):
    """States after every chunk from both chains: ``(two_matmul, one_matmul)``, each
    ``[N, B, H, K, V]`` (float32 carry; matmul operands in ``md``)."""
    eye = jnp.eye(k.shape[-1], dtype=jnp.float32)
    m = eye - _dot(mT(k), w, md)  # M = I − Kᵀ W, every chunk at once
    b = _dot(mT(k), u, md)  # B = Kᵀ U
    s0 = jnp.zeros((*k.shape[1:3], k.shape[-1], u.shape[-1]), jnp.float32)

    def two(s, x):
        k_c, w_c, u_c = x
        s = s + _dot(mT(k_c), u_c - _dot(w_c, s, md), md)
        return s, s

    def one(s, x):
        m_c, b_c = x
        s = _dot(m_c, s, md) + b_c
        return s, s

    return jax.lax.scan(two, s0, (k, w, u))[1], jax.lax.scan(one, s0, (m, b))[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--dim", type=int, default=64)
    args = parser.parse_args(argv)
    q, k, v, beta = _inputs(1, args.length, 2, args.dim)
    n = -(-args.length // args.chunk)
    marks = [n // 8 - 1, n // 4 - 1, n // 2 - 1, n - 1]
    print(f"T {args.length}, C {args.chunk}, D {args.dim}: relative error of S after chunk")
    print("| precision | chain | " + " | ".join(f"{m + 1}" for m in marks) + " |")
    print("|---|---|" + "---|" * len(marks))
    for label, in_dtype, md in (
        ("float32", jnp.float32, jnp.float32),
        ("bf16 operands", jnp.bfloat16, jnp.bfloat16),
    ):
        # Inputs rounded to the input dtype; the float64 chain of the SAME rounded inputs is the
        # reference, so only the chain's arithmetic is measured.
        rounded = [np.asarray(jnp.asarray(x, jnp.float32).astype(in_dtype), np.float64)
                   for x in (q, k, v, beta)]  # fmt: skip
        with enable_x64(True):
            chunks = (to_chunks(jnp.asarray(x), args.chunk) for x in rounded)
            qc, kc, vc, bc = chunks
            w64, u64, _, _ = wy_terms(qc, kc, vc, bc)
            exact, _ = jax.jit(chains, static_argnums=3)(kc, w64, u64, jnp.float64)
            exact = np.asarray(exact)
        # Phase 1 in float32 from the rounded inputs (as every form computes it).
        qc, kc, vc, bc = (to_chunks(jnp.asarray(x, jnp.float32), args.chunk) for x in rounded)
        w, u, _, _ = wy_terms(qc, kc, vc, bc)
        results = jax.jit(chains, static_argnums=3)(kc, w, u, md)
        for name, states in zip(("two matmuls", "one matmul"), results, strict=True):
            states = np.asarray(states, np.float64)
            errs = [np.linalg.norm(states[m] - exact[m]) / np.linalg.norm(exact[m]) for m in marks]
            print(f"| {label} | {name} | " + " | ".join(f"{e:.1e}" for e in errs) + " |")


if __name__ == "__main__":
    main()
