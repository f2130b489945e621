"""Sum rule, PALLAS form: the chunked form (:mod:`fwjax.ops.sum_rule.chunked`) as one Pallas
kernel per direction, with a ``custom_vjp``.

Forward, per chunk (kernel, state tile on chip)::

    states[n] = S     (only when a backward pass will follow)
    O = Q S + (Q Kᵀ ⊙ M) V,   S ← S + Kᵀ V

Backward (``PallasBackward.KERNEL``): a reverse kernel over the chunks with the state cotangent
``G`` on chip (equations in :mod:`fwjax.ops.pallas.chunk_math`); ``PallasBackward.XLA`` runs the
reverse scan of ``Impl.CHUNKED`` on the kernel-saved states instead.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

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
from fwjax.ops.sum_rule.chunked import _sum_chunks_bwd


def _forward_spec(cfg: KernelConfig, sd, save_states: bool) -> ChunkScan:
    md = cfg.matmul_dtype

    def step(x, s):
        o, s_new = cm.sum_forward(x["q"], x["k"], x["v"], s, md, sd)
        return s_new, ({"o": o, "states": s} if save_states else {"o": o})

    outputs = (Operand("o", Kind.SEQ_VALUE, md), Operand("s", Kind.STATE, sd))
    if save_states:
        outputs += (Operand("states", Kind.STATES, sd),)
    return ChunkScan(
        name="sum_rule_fwd",
        inputs=(
            Operand("q", Kind.SEQ_KEY),
            Operand("k", Kind.SEQ_KEY),
            Operand("v", Kind.SEQ_VALUE),
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
        g, dq, dk, dv = cm.sum_backward(x["q"], x["k"], x["v"], x["states"], x["do"], g, md, sd)
        return g, {"dq": dq, "dk": dk, "dv": dv}

    return ChunkScan(
        name="sum_rule_bwd",
        inputs=(
            Operand("q", Kind.SEQ_KEY),
            Operand("k", Kind.SEQ_KEY),
            Operand("v", Kind.SEQ_VALUE),
            Operand("states", Kind.STATES),
            Operand("do", Kind.SEQ_VALUE),
            Operand("ds", Kind.STATE),
        ),
        outputs=(
            Operand("dq", Kind.PARTIAL_KEY, sd),
            Operand("dk", Kind.PARTIAL_KEY, sd),
            Operand("dv", Kind.SEQ_VALUE, sd),
            Operand("ds0", Kind.STATE, sd),
        ),
        step=step,
        reverse=True,
        state_dtype=sd,
    )


def _run_forward(q, k, v, s0, cfg, save_states):
    """Inputs ``[B, H, N, C, .]`` in the state dtype; returns ``(o, S[, states])``."""
    operands = [flat(x).astype(cfg.matmul_dtype) for x in (q, k, v)]
    o, s, *states = run_chunk_scan(
        _forward_spec(cfg, s0.dtype, save_states), *operands, s0, cfg=cfg
    )
    return unflat(o, cfg.tiling.chunk), s, *states


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _sum_pallas(q, k, v, s0, cfg):
    o, s = _run_forward(q, k, v, s0, cfg, save_states=False)
    return o, s


def _sum_pallas_fwd(q, k, v, s0, cfg):
    o, s, states = _run_forward(q, k, v, s0, cfg, save_states=True)
    return (o, s), (q, k, v, states)


def _sum_pallas_bwd(cfg, residuals, cotangents):
    q, k, v, states = residuals
    d_o, d_s = cotangents
    sd = states.dtype
    if cfg.backward is PallasBackward.XLA:
        # The XLA reverse chunk scan of Impl.CHUNKED, on its [N, B, H, ...] layout.
        to_nbh = functools.partial(jnp.moveaxis, source=2, destination=0)
        *seq_grads, d_s0 = _sum_chunks_bwd(
            tuple(to_nbh(x) for x in (q, k, v, states)), (to_nbh(d_o.astype(sd)), d_s)
        )
        return (*(jnp.moveaxis(g, 0, 2) for g in seq_grads), d_s0)

    md, c = cfg.matmul_dtype, cfg.tiling.chunk
    operands = [flat(x).astype(md) for x in (q, k, v)]
    dq, dk, dv, d_s0 = run_chunk_scan(
        _backward_spec(cfg, sd), *operands, states, flat(d_o).astype(md), d_s, cfg=cfg
    )
    dq, dk = (unflat(x.sum(axis=0), c) for x in (dq, dk))  # value-tile partial sums
    return dq, dk, unflat(dv, c), d_s0


_sum_pallas.defvjp(_sum_pallas_fwd, _sum_pallas_bwd)


def sum_rule_pallas(q, k, v, initial_state, scale, chunk_size, options, out_dtype):
    """See :func:`fwjax.ops.sum_rule` (``Impl.PALLAS``) and
    :func:`fwjax.ops.delta_rule.pallas.delta_rule_pallas` for ``options`` and ``out_dtype``."""
    b, t, h, key_dim = q.shape
    value_dim = v.shape[-1]
    sd = initial_state.dtype
    cfg = kernel_config(options, t, key_dim, value_dim, chunk_size, b * h, out_dtype, sd)
    kp, vp = cfg.tiling.key, cfg.tiling.value
    q = scale * q.astype(sd)  # o is linear in q: the scale stays differentiable
    q, k = (to_kernel_layout(x.astype(sd), cfg.tiling, kp) for x in (q, k))
    v = to_kernel_layout(v.astype(sd), cfg.tiling, vp)
    s0 = jnp.pad(initial_state, [(0, 0), (0, 0), (0, kp - key_dim), (0, vp - value_dim)])
    o, s = _sum_pallas(q, k, v, s0, cfg)
    return from_kernel_layout(o, t, value_dim), s[:, :, :key_dim, :value_dim]
