"""TPU backend: chunk kernels lowered through Mosaic TPU.

Chunk scans (:func:`chunk_scan`), grid ``(B, H, nv, N)``: the chunk axis is the innermost,
sequential (``"arbitrary"``) grid dimension, so Pallas' pipeline brings each chunk's ``[C, ·]``
blocks into VMEM (double-buffered) while the previous chunk computes. The ``[K, tv]`` carry lives
in a VMEM scratch buffer that persists across the chunk axis: initialised from the ``STATE`` input
at the first chunk, and written to the ``STATE`` output at the last (its block index is constant
over the chunk axis, so it is written back to HBM once). The other grid axes are ``"parallel"``
(megacore sharding). Block constraints of Mosaic (last two dims divisible by ``(8, 128)`` or whole)
are met by :func:`fwjax.ops.pallas.tpu_tiling`.
"""

from __future__ import annotations

import functools

from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from fwjax.ops.pallas.scan_spec import (
    ChunkMap,
    ChunkScan,
    Dims,
    Kind,
    dims_of,
    map_call,
    out_shapes,
)


def _block_spec(kind: Kind, d: Dims, reverse: bool) -> pl.BlockSpec:
    def chunk(n):
        return d.n - 1 - n if reverse else n

    if kind is Kind.SEQ_KEY:
        return pl.BlockSpec((None, None, d.c, d.k), lambda b, h, j, n: (b, h, chunk(n), 0))
    if kind is Kind.SEQ_VALUE:
        return pl.BlockSpec((None, None, d.c, d.tv), lambda b, h, j, n: (b, h, chunk(n), j))
    if kind is Kind.SEQ_CHUNK:
        return pl.BlockSpec((None, None, d.c, d.c), lambda b, h, j, n: (b, h, chunk(n), 0))
    if kind is Kind.STATE:
        return pl.BlockSpec((None, None, d.k, d.tv), lambda b, h, j, n: (b, h, 0, j))
    if kind is Kind.STATES:
        return pl.BlockSpec(
            (None, None, None, d.k, d.tv), lambda b, h, j, n: (b, h, chunk(n), 0, j)
        )
    if kind is Kind.MAPS:
        return pl.BlockSpec((None, None, None, d.k, d.k), lambda b, h, j, n: (b, h, chunk(n), 0, 0))
    if kind is Kind.CHUNK_SCALAR:
        return pl.BlockSpec((None, None, None, 1, 1), lambda b, h, j, n: (b, h, chunk(n), 0, 0))
    if kind is Kind.PARTIAL_SCALAR:
        return pl.BlockSpec(
            (None, None, None, None, 1, 1), lambda b, h, j, n: (j, b, h, chunk(n), 0, 0)
        )
    if kind is Kind.PARTIAL_KEY:
        return pl.BlockSpec((None, None, None, d.c, d.k), lambda b, h, j, n: (j, b, h, chunk(n), 0))
    if kind is Kind.PARTIAL_CHUNK:
        return pl.BlockSpec((None, None, None, d.c, d.c), lambda b, h, j, n: (j, b, h, chunk(n), 0))
    raise ValueError(f"unknown operand kind {kind!r}")


def _kernel(*refs, spec: ChunkScan, d: Dims):
    n_in, n_out = len(spec.inputs), len(spec.outputs)
    ins = dict(zip((op.name for op in spec.inputs), refs[:n_in], strict=True))
    outs = dict(zip((op.name for op in spec.outputs), refs[n_in : n_in + n_out], strict=True))
    (carry_ref,) = refs[n_in + n_out :]
    (init,) = [op.name for op in spec.inputs if op.kind is Kind.STATE]
    (final,) = [op.name for op in spec.outputs if op.kind is Kind.STATE]
    n = pl.program_id(3)

    @pl.when(n == 0)
    def _():
        carry_ref[...] = ins[init][...].astype(carry_ref.dtype)

    values = {op.name: ins[op.name][...] for op in spec.inputs if op.kind is not Kind.STATE}
    carry, results = spec.step(values, carry_ref[...])
    carry_ref[...] = carry
    for op in spec.outputs:
        if op.kind is not Kind.STATE:
            outs[op.name][...] = results[op.name].astype(op.dtype)

    @pl.when(n == d.n - 1)
    def _():
        outs[final][...] = carry_ref[...].astype(outs[final].dtype)


def chunk_scan(spec: ChunkScan, *args, c: int, tv: int, interpret: bool):
    """Runs ``spec`` on the TPU (or in interpret mode); returns the outputs in spec order."""
    d = dims_of(spec, args, c, tv)
    return pl.pallas_call(
        functools.partial(_kernel, spec=spec, d=d),
        grid=(d.b, d.h, d.nv, d.n),
        in_specs=[_block_spec(op.kind, d, spec.reverse) for op in spec.inputs],
        out_specs=[_block_spec(op.kind, d, spec.reverse) for op in spec.outputs],
        out_shape=out_shapes(spec, d),
        scratch_shapes=[pltpu.VMEM((d.k, d.tv), spec.state_dtype)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        name=spec.name,
    )(*args)


def chunk_map(spec: ChunkMap, *args, c: int, k: int, v: int, interpret: bool):
    """Runs ``spec`` with grid ``(B, H, N)``, every axis ``"parallel"``; blocks ``[C, K]``,
    ``[C, V]``, ``[C, C]``, ``[K, V]`` (whole last dims, ``C`` a multiple of 16)."""
    params = pltpu.CompilerParams(dimension_semantics=("parallel",) * 3)
    return map_call(spec, *args, c=c, k=k, v=v, interpret=interpret, compiler_params=params)
