"""The PALLAS form of any chunkwise rule: phase 1 in XLA, the sequential phase 2 as a Pallas
chunk-scan kernel, and a ``custom_vjp`` (``jax.grad`` cannot differentiate ``pallas_call``).

A rule is a :class:`KernelRule`: its phase 1 (XLA, all chunks at once), the per-chunk math of
its kernels (:mod:`fwjax.ops.pallas.chunk_math`) and the XLA reverse chunk scan of its CHUNKED
form. Forward::

    operands = phase1(q, k, v, *gates)       XLA, embarrassingly parallel over chunks
    for each chunk n (kernel, state tile on chip):
        states[n] = S                        (only when a backward pass will follow)
        O, S ← forward(operands[n], S)

Backward (``PallasBackward.KERNEL``, for rules with a backward kernel): a reverse kernel over
the chunks with the state cotangent ``G`` on chip gives the operands' cotangents (partial sums
over value tiles where they contract over the value dimension), then phase 1's VJP in XLA.
``PallasBackward.XLA``, and rules without a backward kernel, run the CHUNKED form's reverse
chunk scan on the kernel-saved states.

Memory: like ``Impl.CHUNKED``, the inputs (in the state dtype) and one state per chunk.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from fwjax.ops.common import packed_chunks_bwd, packed_terms, scaled_inputs
from fwjax.ops.pallas import (
    KernelConfig,
    PallasBackend,
    PallasBackward,
    PallasSchedule,
    flat,
    flat_operand,
    from_kernel_layout,
    kernel_config,
    phased,
    run_chunk_scan,
    to_kernel_layout,
    unflat,
    unflat_operand,
)
from fwjax.ops.pallas import chunk_math as cm
from fwjax.ops.pallas.scan_spec import ChunkScan, Kind, Operand

# The cotangent of an operand of each kind: partial sums over value tiles where the kernel
# contracts over the value dimension (see fwjax.ops.pallas.chunk_math).
_COTANGENT_KIND = {
    Kind.SEQ_KEY: Kind.PARTIAL_KEY,
    Kind.SEQ_CHUNK: Kind.PARTIAL_CHUNK,
    Kind.SEQ_VALUE: Kind.SEQ_VALUE,
    Kind.CHUNK_SCALAR: Kind.PARTIAL_SCALAR,
}


@dataclasses.dataclass(frozen=True)
class KernelRule:
    """A chunkwise rule as the kernels see it (hashable: a static argument).

    Attributes:
      name: kernel name prefix (``{name}_fwd``, ``{name}_bwd`` in profiles).
      phase1: ``(q, k, v, *gates) -> operands``, on the kernel layout ``[B, H, N, C, .]``.
      operands: ``(name, Kind)`` of each phase-1 output, in order.
      forward: ``forward(*operands, s, md, sd) -> (O, S_new)`` for one chunk and value tile.
      backward: ``backward(*operands, s, do, g, md, sd) -> (g_new, *operand cotangents)``, or
        None when the rule has no backward kernel.
      xla_backward: ``((*inputs, states), (dO, dS)) -> (*input cotangents, dS⁰)`` on the
        chunked ``[N, B, H, C, .]`` layout: the CHUNKED form's reverse chunk scan.
      exact_operands: operands passed in the state dtype rather than the matmul dtype: the
        decays, which multiply the state elementwise (a bfloat16 chunk decay of 0.9984 rounds
        to 1.0, and the head stops forgetting).
      phased: the rule has the kernels of ``PallasSchedule.PHASED`` (operands
        ``DELTA_OPERANDS`` or ``DECAY_OPERANDS``; see :mod:`fwjax.ops.pallas.phased`).
    """

    name: str
    phase1: Callable
    operands: tuple[tuple[str, Kind], ...]
    forward: Callable
    backward: Callable | None
    xla_backward: Callable
    exact_operands: frozenset[str] = frozenset()
    phased: bool = False

    def cast_operands(self, operands, md, sd) -> list:
        """The phase-1 operands, flattened to ``[B, H, N·C, .]`` (per-chunk kinds stay
        ``[B, H, N, ., .]``), in the matmul dtype ``md`` (those of ``exact_operands`` in the
        state dtype ``sd``)."""
        return [
            flat_operand(x, kind).astype(self.operand_dtype(n, md, sd))
            for (n, kind), x in zip(self.operands, operands, strict=True)
        ]

    def operand_dtype(self, name, md, sd):
        """The dtype the kernels read operand ``name`` in: ``sd`` for ``exact_operands``,
        else ``md``."""
        return sd if name in self.exact_operands else md


def _forward_spec(rule: KernelRule, cfg: KernelConfig, sd, save_states: bool) -> ChunkScan:
    md = cfg.matmul_dtype
    names = [name for name, _ in rule.operands]

    def step(x, s):
        o, s_new = rule.forward(*(x[n] for n in names), s, md, sd)
        return s_new, ({"o": o, "states": s} if save_states else {"o": o})

    outputs = (Operand("o", Kind.SEQ_VALUE, md), Operand("s", Kind.STATE, sd))
    if save_states:
        outputs += (Operand("states", Kind.STATES, sd),)
    inputs = (*(Operand(n, kind) for n, kind in rule.operands), Operand("s0", Kind.STATE))
    return ChunkScan(f"{rule.name}_fwd", inputs, outputs, step, reverse=False, state_dtype=sd)


def _backward_spec(rule: KernelRule, cfg: KernelConfig, sd) -> ChunkScan:
    md = cfg.matmul_dtype
    names = [name for name, _ in rule.operands]

    def step(x, g):
        g, *grads = rule.backward(*(x[n] for n in names), x["states"], x["do"], g, md, sd)
        return g, {f"d{n}": d for n, d in zip(names, grads, strict=True)}

    extra = (Kind.STATES, "states"), (Kind.SEQ_VALUE, "do"), (Kind.STATE, "ds")
    inputs = (*(Operand(n, kind) for n, kind in rule.operands), *(Operand(n, k) for k, n in extra))
    outputs = (
        *(Operand(f"d{n}", _COTANGENT_KIND[kind], sd) for n, kind in rule.operands),
        Operand("ds0", Kind.STATE, sd),
    )
    return ChunkScan(f"{rule.name}_bwd", inputs, outputs, step, reverse=True, state_dtype=sd)


def _run_forward(rule, cfg, xs, s0, save_states):
    operands = rule.cast_operands(rule.phase1(*xs), cfg.matmul_dtype, s0.dtype)
    spec = _forward_spec(rule, cfg, s0.dtype, save_states)
    o, s, *states = run_chunk_scan(spec, *operands, s0, cfg=cfg)
    return unflat(o, cfg.tiling.chunk), s, *states


def _phased(rule, cfg) -> bool:
    return rule.phased and cfg.schedule is PallasSchedule.PHASED


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _kernel_op(rule, cfg, xs, s0):
    if _phased(rule, cfg):
        o, s, _ = phased.forward(rule, cfg, xs, s0)
        return o, s
    o, s = _run_forward(rule, cfg, xs, s0, save_states=False)
    return o, s


def _kernel_op_fwd(rule, cfg, xs, s0):
    if _phased(rule, cfg):
        o, s, states = phased.forward(rule, cfg, xs, s0)
    else:
        o, s, states = _run_forward(rule, cfg, xs, s0, save_states=True)
    return (o, s), (xs, states)


def _kernel_op_bwd(rule, cfg, residuals, cotangents):
    xs, states = residuals
    d_o, d_s = cotangents
    sd = d_s.dtype  # the state dtype (PHASED saves the states in the matmul dtype)
    if rule.backward is None or cfg.backward is PallasBackward.XLA:
        to_nbh = functools.partial(jnp.moveaxis, source=2, destination=0)
        nbh = tuple(to_nbh(x) for x in (*xs, states.astype(sd)))
        *grads, d_s0 = rule.xla_backward(nbh, (to_nbh(d_o.astype(sd)), d_s))
        return tuple(jnp.moveaxis(g, 0, 2) for g in grads), d_s0
    if _phased(rule, cfg):
        return phased.backward(rule, cfg, xs, states, d_o, d_s)
    md, c = cfg.matmul_dtype, cfg.tiling.chunk
    operands, phase1_vjp = jax.vjp(rule.phase1, *xs)  # recompute phase 1
    spec = _backward_spec(rule, cfg, sd)
    flat_operands = rule.cast_operands(operands, md, sd)
    *grads, d_s0 = run_chunk_scan(spec, *flat_operands, states, flat(d_o).astype(md), d_s, cfg=cfg)
    grads = [
        unflat_operand(g.sum(axis=0) if _COTANGENT_KIND[kind] is not kind else g, kind, c)
        for g, (_, kind) in zip(grads, rule.operands, strict=True)
    ]
    return phase1_vjp(tuple(grads)), d_s0


_kernel_op.defvjp(_kernel_op_fwd, _kernel_op_bwd)


def pallas_form(rule: KernelRule) -> Callable:
    """The ``Impl.PALLAS`` form of ``rule``, with the signature of every form
    (:mod:`fwjax.ops.impl`). Time, keys and values are zero-padded to the backend's tile sizes
    (zero keys and values, and zero gates, are exact no-ops: a rule whose neutral gate is not 0
    takes it in a form where it is, such as log α)."""

    def form(q, k, v, gates, initial_state, scale, options):
        b, t, h, key_dim = q.shape
        value_dim = v.shape[-1]
        sd = initial_state.dtype
        cfg = kernel_config(
            options.pallas,
            t,
            key_dim,
            value_dim,
            options.chunk_size,
            b * h,
            options.out_dtype,
            sd,
            state_segments=options.state_segments if rule.phased else None,
            phased=rule.phased,
        )
        if cfg.backend is PallasBackend.MOSAIC_GPU and not rule.phased:
            raise ValueError(
                f"PallasBackend.MOSAIC_GPU has no kernels for {rule.name!r} (only the phased "
                "kernels of the delta and gated delta rules)"
            )
        kp, vp = cfg.tiling.key, cfg.tiling.value
        widths = (kp, kp, vp, *(None for _ in gates))
        xs = scaled_inputs(q, k, v, gates, initial_state, scale)
        xs = tuple(to_kernel_layout(x, cfg.tiling, w) for x, w in zip(xs, widths, strict=True))
        s0 = jnp.pad(initial_state, [(0, 0), (0, 0), (0, kp - key_dim), (0, vp - value_dim)])
        o, s = _kernel_op(rule, cfg, xs, s0)
        return from_kernel_layout(o, t, value_dim), s[:, :, :key_dim, :value_dim]

    return form


# The operands of the delta rule's kernel: Q, K and the phase-1 terms W, U, P; the gated
# delta rule's kernel adds the chunk decay.
DELTA_OPERANDS = (
    ("q", Kind.SEQ_KEY),
    ("k", Kind.SEQ_KEY),
    ("w", Kind.SEQ_KEY),
    ("u", Kind.SEQ_VALUE),
    ("p", Kind.SEQ_CHUNK),
)
DECAY_OPERANDS = (*DELTA_OPERANDS, ("decay", Kind.CHUNK_SCALAR))
DECAYS = frozenset({"decay"})  # kept in the state dtype (KernelRule.exact_operands)


def packed_kernel_rule(name: str, arrange: Callable) -> KernelRule:
    """The kernel of a rule on packed rows: the gated delta rule's chunk kernel
    (:func:`~fwjax.ops.pallas.chunk_math.gated_delta_forward`) fed the document-masked terms of
    :func:`fwjax.ops.common.packed_terms` (a chunk's decay is 0 when a document starts in it;
    the sum rule's ``W`` is 0), with the CHUNKED form's reverse chunk scan as its backward.

    Args:
      name: the rule's kernel name (``{name}_packed_fwd`` in profiles).
      arrange: the form's inputs (``q, k, v, *gates, starts``) as ``(q, k, v, β, log α,
        starts)``, with None for a gate the rule lacks.
    """

    def phase1(*xs):
        q_e, k_e, w, u, p, total = packed_terms(*arrange(xs))
        w = jnp.zeros_like(k_e) if w is None else w
        return q_e, k_e, w, u, p, total[..., None, None]

    return KernelRule(
        name=f"{name}_packed",
        phase1=phase1,
        operands=DECAY_OPERANDS,
        forward=cm.gated_delta_forward,
        backward=None,
        xla_backward=functools.partial(packed_chunks_bwd, arrange),
        exact_operands=DECAYS,
    )
