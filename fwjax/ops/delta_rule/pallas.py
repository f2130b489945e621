"""Delta rule, PALLAS form: the chunked form (:mod:`fwjax.ops.delta_rule.chunked`) with its
sequential phase 2 as a Pallas kernel, and a ``custom_vjp`` (``jax.grad`` cannot differentiate
``pallas_call``).

Forward::

    W, U, P = phase1(Q, K, V, β)            XLA, all chunks at once (embarrassingly parallel)
    for each chunk n (kernel, state tile on chip):
        states[n] = S                        (only when a backward pass will follow)
        Ũ = U − W S,   O = Q S + P Ũ,   S ← S + Kᵀ Ũ

Backward (``PallasBackward.KERNEL``): recompute phase 1 with its VJP, then a reverse kernel over
the chunks with the state cotangent ``G`` on chip (equations in
:mod:`fwjax.ops.pallas.chunk_math`), then the phase-1 VJP in XLA. ``PallasBackward.XLA`` runs
the reverse scan of ``Impl.CHUNKED`` on the kernel-saved states instead.

Memory: like ``Impl.CHUNKED``, the inputs (in the state dtype) and one state per chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fwjax.ops.delta_rule.chunked import _delta_chunks_bwd, _wy_terms
from fwjax.ops.pallas import (
    KernelConfig,
    PallasBackward,
    flat,
    from_kernel_layout,
    kernel_config,
    run_chunk_scan,
    to_kernel_layout,
    unflat,
)
from fwjax.ops.pallas import chunk_math as cm
from fwjax.ops.pallas.scan_spec import ChunkScan, Kind, Operand


def _forward_spec(cfg: KernelConfig, sd, save_states: bool) -> ChunkScan:
    md = cfg.matmul_dtype

    def step(x, s):
        o, s_new = cm.delta_forward(x["q"], x["k"], x["w"], x["u"], x["p"], s, md, sd)
        return s_new, ({"o": o, "states": s} if save_states else {"o": o})

    outputs = (Operand("o", Kind.SEQ_VALUE, md), Operand("s", Kind.STATE, sd))
    if save_states:
        outputs += (Operand("states", Kind.STATES, sd),)
    return ChunkScan(
        name="delta_rule_fwd",
        inputs=(
            Operand("q", Kind.SEQ_KEY),
            Operand("k", Kind.SEQ_KEY),
            Operand("w", Kind.SEQ_KEY),
            Operand("u", Kind.SEQ_VALUE),
            Operand("p", Kind.SEQ_CHUNK),
            Operand("s0", Kind.STATE),
        ),
        outputs=outputs,
        step=step,
        reverse=False,
        state_dtype=sd,
    )


def _backward_spec(cfg: KernelConfig, sd) -> ChunkScan:
    md = cfg.matmul_dtype

    def step(x, g):
        g, dq, dk, dw, du, dp = cm.delta_backward(
            x["q"], x["k"], x["w"], x["u"], x["p"], x["states"], x["do"], g, md, sd
        )
        return g, {"dq": dq, "dk": dk, "dw": dw, "du": du, "dp": dp}

    return ChunkScan(
        name="delta_rule_bwd",
        inputs=(
            Operand("q", Kind.SEQ_KEY),
            Operand("k", Kind.SEQ_KEY),
            Operand("w", Kind.SEQ_KEY),
            Operand("u", Kind.SEQ_VALUE),
            Operand("p", Kind.SEQ_CHUNK),
            Operand("states", Kind.STATES),
            Operand("do", Kind.SEQ_VALUE),
            Operand("ds", Kind.STATE),
        ),
        outputs=(
            Operand("dq", Kind.PARTIAL_KEY, sd),
            Operand("dk", Kind.PARTIAL_KEY, sd),
            Operand("dw", Kind.PARTIAL_KEY, sd),
            Operand("du", Kind.SEQ_VALUE, sd),
            Operand("dp", Kind.PARTIAL_CHUNK, sd),
            Operand("ds0", Kind.STATE, sd),
        ),
        step=step,
        reverse=True,
        state_dtype=sd,
    )


def _run_forward(q, k, v, beta, s0, cfg, save_states):
    """Phase 1 in XLA, phase 2 in the kernel. Inputs ``[B, H, N, C, .]`` in the state dtype."""
    md, c = cfg.matmul_dtype, cfg.tiling.chunk
    w, u, p = _wy_terms(q, k, v, beta)
    operands = [flat(x).astype(md) for x in (q, k, w, u, p)]
    spec = _forward_spec(cfg, s0.dtype, save_states)
    o, s, *states = run_chunk_scan(spec, *operands, s0, cfg=cfg)
    return unflat(o, c), s, *states


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _delta_pallas(q, k, v, beta, s0, cfg):
    o, s = _run_forward(q, k, v, beta, s0, cfg, save_states=False)
    return o, s


def _delta_pallas_fwd(q, k, v, beta, s0, cfg):
    o, s, states = _run_forward(q, k, v, beta, s0, cfg, save_states=True)
    return (o, s), (q, k, v, beta, states)


def _delta_pallas_bwd(cfg, residuals, cotangents):
    q, k, v, beta, states = residuals
    d_o, d_s = cotangents
    sd = states.dtype
    if cfg.backward is PallasBackward.XLA:
        # The XLA reverse chunk scan of Impl.CHUNKED, on its [N, B, H, ...] layout.
        to_nbh = functools.partial(jnp.moveaxis, source=2, destination=0)
        grads = _delta_chunks_bwd(
            False,
            (*(to_nbh(x) for x in (q, k, v, beta, states)),),
            (to_nbh(d_o.astype(sd)), d_s),
        )
        *seq_grads, d_s0 = grads
        return (*(jnp.moveaxis(g, 0, 2) for g in seq_grads), d_s0)

    md, c = cfg.matmul_dtype, cfg.tiling.chunk
    (w, u, p), wy_vjp = jax.vjp(_wy_terms, q, k, v, beta)  # recompute phase 1
    operands = [flat(x).astype(md) for x in (q, k, w, u, p)]
    dq, dk, dw, du, dp, d_s0 = run_chunk_scan(
        _backward_spec(cfg, sd),
        *operands,
        states,
        flat(d_o).astype(md),
        d_s,
        cfg=cfg,
    )
    # Value-tile partial sums, then the VJP of phase 1.
    dq, dk, dw, dp = (unflat(x.sum(axis=0), c) for x in (dq, dk, dw, dp))
    dq_wy, dk_wy, dv, d_beta = wy_vjp((dw, unflat(du, c), dp))
    return dq + dq_wy, dk + dk_wy, dv, d_beta, d_s0


_delta_pallas.defvjp(_delta_pallas_fwd, _delta_pallas_bwd)


def delta_rule_pallas(q, k, v, beta, initial_state, scale, chunk_size, options, out_dtype):
    """See :func:`fwjax.ops.delta_rule` (``Impl.PALLAS``). ``options``: a
    :class:`fwjax.ops.pallas.PallasOptions` or None; ``out_dtype``: the inputs' dtype, which
    the kernels' matmul operands take. Time, keys and values are zero-padded to the backend's
    tile sizes (zero keys, zero values and β = 0 are exact no-ops)."""
    b, t, h, key_dim = q.shape
    value_dim = v.shape[-1]
    sd = initial_state.dtype
    cfg = kernel_config(options, t, key_dim, value_dim, chunk_size, b * h, out_dtype, sd)
    kp, vp = cfg.tiling.key, cfg.tiling.value
    q = scale * q.astype(sd)  # o is linear in q: the scale stays differentiable
    q, k = (to_kernel_layout(x.astype(sd), cfg.tiling, kp) for x in (q, k))
    v = to_kernel_layout(v.astype(sd), cfg.tiling, vp)
    beta = to_kernel_layout(beta.astype(sd), cfg.tiling, None)
    s0 = jnp.pad(initial_state, [(0, 0), (0, 0), (0, kp - key_dim), (0, vp - value_dim)])
    o, s = _delta_pallas(q, k, v, beta, s0, cfg)
    return from_kernel_layout(o, t, value_dim), s[:, :, :key_dim, :value_dim]
