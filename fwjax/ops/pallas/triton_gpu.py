"""GPU backend: chunk kernels lowered through Pallas' Triton backend.

Chunk scans (:func:`chunk_scan`), grid ``(B, H, nv)``: one program per batch element, head and
value tile. Each program gets whole-sequence blocks of its head and walks the chunks in an
in-kernel ``lax.fori_loop`` (``scf.for``, software-pipelined by Triton with ``num_stages``),
keeping its ``[K, tv]`` fp32 carry in registers; each step loads ``[C, ·]`` row slices with
``pl.ds`` (the pattern of JAX's own Triton attention kernel). Chunk maps (:func:`chunk_map`),
grid ``(B, H, N)``: one program per chunk with its whole blocks.

Why Triton, although JAX 0.11 deprecates the Triton lowering: these kernels are sequential
loops of small (``64 × 64``) matmuls per program, generated for every rule from backend-neutral
bodies (:mod:`fwjax.ops.pallas.chunk_math`); Triton schedules such code (register-resident
accumulators, ``mma`` layouts, pipelined loads) by itself, while Mosaic GPU needs each kernel
written for warpgroups (TMA copies, barriers, ``wgmma`` with shared-memory operands and
layouts), and its lowering in JAX 0.10 has no ``dot_general``. The (gated) delta rule's phased
kernels are written so in :mod:`fwjax.ops.pallas.mosaic_gpu` (``PallasBackend.MOSAIC_GPU``),
which falls back to the kernels here only beyond its register budget.
Triton constraints honoured here
(:func:`fwjax.ops.pallas.triton_tiling`): every load/store is a power of two in size, and every
``dot`` operand dimension is >= 16.
"""

from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from fwjax.ops.pallas.scan_spec import (
    PER_CHUNK_KINDS,
    ChunkMap,
    ChunkScan,
    Dims,
    Kind,
    dims_of,
    map_call,
    out_shapes,
)


def _block_spec(kind: Kind, d: Dims) -> pl.BlockSpec:
    t = d.n * d.c
    if kind is Kind.SEQ_KEY:
        return pl.BlockSpec((None, None, t, d.k), lambda b, h, j: (b, h, 0, 0))
    if kind is Kind.SEQ_VALUE:
        return pl.BlockSpec((None, None, t, d.tv), lambda b, h, j: (b, h, 0, j))
    if kind is Kind.SEQ_CHUNK:
        return pl.BlockSpec((None, None, t, d.c), lambda b, h, j: (b, h, 0, 0))
    if kind is Kind.STATE:
        return pl.BlockSpec((None, None, d.k, d.tv), lambda b, h, j: (b, h, 0, j))
    if kind is Kind.STATES:
        return pl.BlockSpec((None, None, d.n, d.k, d.tv), lambda b, h, j: (b, h, 0, 0, j))
    if kind is Kind.MAPS:
        return pl.BlockSpec((None, None, d.n, d.k, d.k), lambda b, h, j: (b, h, 0, 0, 0))
    if kind is Kind.CHUNK_SCALAR:
        return pl.BlockSpec((None, None, d.n, 1, 1), lambda b, h, j: (b, h, 0, 0, 0))
    if kind is Kind.PARTIAL_SCALAR:
        return pl.BlockSpec((None, None, None, d.n, 1, 1), lambda b, h, j: (j, b, h, 0, 0, 0))
    if kind is Kind.PARTIAL_KEY:
        return pl.BlockSpec((None, None, None, t, d.k), lambda b, h, j: (j, b, h, 0, 0))
    if kind is Kind.PARTIAL_CHUNK:
        return pl.BlockSpec((None, None, None, t, d.c), lambda b, h, j: (j, b, h, 0, 0))
    raise ValueError(f"unknown operand kind {kind!r}")


def _kernel(*refs, spec: ChunkScan, d: Dims):
    n_in = len(spec.inputs)
    ins = dict(zip((op.name for op in spec.inputs), refs[:n_in], strict=True))
    outs = dict(zip((op.name for op in spec.outputs), refs[n_in:], strict=True))
    (init,) = [op.name for op in spec.inputs if op.kind is Kind.STATE]
    (final,) = [op.name for op in spec.outputs if op.kind is Kind.STATE]
    sd = spec.state_dtype

    def body(i, carry):
        n = d.n - 1 - i if spec.reverse else i
        rows = pl.ds(pl.multiple_of(n * d.c, d.c), d.c)
        values = {}
        for op in spec.inputs:
            if op.kind in PER_CHUNK_KINDS:
                values[op.name] = ins[op.name][n, :, :]
            elif op.kind is not Kind.STATE:
                values[op.name] = ins[op.name][rows, :]
        carry, results = spec.step(values, carry)
        for op in spec.outputs:
            if op.kind in (Kind.STATES, Kind.PARTIAL_SCALAR):
                outs[op.name][n, :, :] = results[op.name].astype(op.dtype)
            elif op.kind is not Kind.STATE:
                outs[op.name][rows, :] = results[op.name].astype(op.dtype)
        return carry

    carry = jax.lax.fori_loop(0, d.n, body, ins[init][...].astype(sd))
    outs[final][...] = carry.astype(outs[final].dtype)


def chunk_scan(spec: ChunkScan, *args, c: int, tv: int, interpret: bool, num_warps, num_stages):
    """Runs ``spec`` on the GPU (or in interpret mode); returns the outputs in spec order."""
    d = dims_of(spec, args, c, tv)
    if num_warps is None:
        num_warps = 4 if d.k * d.tv <= 64 * 64 else 8
    return pl.pallas_call(
        functools.partial(_kernel, spec=spec, d=d),
        grid=(d.b, d.h, d.nv),
        in_specs=[_block_spec(op.kind, d) for op in spec.inputs],
        out_specs=[_block_spec(op.kind, d) for op in spec.outputs],
        out_shape=out_shapes(spec, d),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=spec.name,
    )(*args)


def chunk_map(spec: ChunkMap, *args, c: int, k: int, v: int, interpret: bool, num_warps):
    """Runs ``spec`` with grid ``(B, H, N)``, one program per chunk (whole ``[C, ·]`` and
    ``[K, V]`` blocks); returns the outputs in spec order."""
    if num_warps is None:
        num_warps = 4 if k * v <= 64 * 64 else 8
    params = pltriton.CompilerParams(num_warps=num_warps, num_stages=1)
    return map_call(spec, *args, c=c, k=k, v=v, interpret=interpret, compiler_params=params)
