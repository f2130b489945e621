"""Backend-neutral descriptions of the chunk kernels, which each backend file lowers.

A kernel walks the ``N`` chunks of one ``(batch, head, value tile)`` in order (or in reverse),
carrying a ``[K, tv]`` tile in the state dtype (the state, or its cotangent). Each operand has a
:class:`Kind` that says how it is laid out and which slice a chunk step sees; ``step`` maps the
per-chunk values and the carry to the new carry and the per-chunk outputs (:class:`ChunkScan`).
A :class:`ChunkMap` has no carry: one program per ``(batch, head, chunk)``, all in parallel.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


class Kind(enum.Enum):
    """Operand layouts (``T' = N·C`` padded time, ``nv`` value tiles, ``tv = V / nv``).

    Attributes:
      SEQ_KEY: ``[B, H, T', K]``; a step sees ``[C, K]``.
      SEQ_VALUE: ``[B, H, T', V]``; a step sees ``[C, tv]`` (its value tile).
      SEQ_CHUNK: ``[B, H, T', C]``; a step sees ``[C, C]``.
      SEQ_SCALAR: ``[B, H, T', 1]``, one value per step (a gate); a chunk sees ``[C, 1]``.
      CHUNK_ROW: ``[B, H, N, 1, C]``, the same values laid out as one row per chunk; a chunk
        sees ``[1, C]`` (chunk maps only: the transpose of ``SEQ_SCALAR`` without an in-kernel
        transpose).
      STATE: ``[B, H, K, V]``; as input, the initial carry; as output, the final carry.
      STATES: ``[B, H, N, K, V]``; a step sees ``[K, tv]`` of its chunk.
      MAPS: ``[B, H, N, K, K]``, a ``[K, K]`` matrix per chunk (the chain's linear map); a
        step sees its chunk's whole matrix (inputs only).
      CHUNK_SCALAR: ``[B, H, N, 1, 1]``, one value per chunk (the gated rule's chunk decay
        ``Γ_C``, kept in the state dtype); a chunk sees ``[1, 1]``.
      PARTIAL_KEY: output ``[nv, B, H, T', K]``, one partial sum per value tile.
      PARTIAL_CHUNK: output ``[nv, B, H, T', C]``.
      PARTIAL_SCALAR: output ``[nv, B, H, N, 1, 1]``.
    """

    SEQ_KEY = "seq_key"
    SEQ_VALUE = "seq_value"
    SEQ_CHUNK = "seq_chunk"
    SEQ_SCALAR = "seq_scalar"
    CHUNK_ROW = "chunk_row"
    STATE = "state"
    STATES = "states"
    MAPS = "maps"
    CHUNK_SCALAR = "chunk_scalar"
    PARTIAL_KEY = "partial_key"
    PARTIAL_CHUNK = "partial_chunk"
    PARTIAL_SCALAR = "partial_scalar"


SEQ_KINDS = (
    Kind.SEQ_KEY,
    Kind.SEQ_VALUE,
    Kind.SEQ_CHUNK,
    Kind.SEQ_SCALAR,
    Kind.PARTIAL_KEY,
    Kind.PARTIAL_CHUNK,
)
# Kinds laid out per chunk ``[B, H, N, ., .]`` rather than per step ``[B, H, N·C, .]``.
PER_CHUNK_KINDS = (Kind.CHUNK_ROW, Kind.STATES, Kind.MAPS, Kind.CHUNK_SCALAR)


@dataclasses.dataclass(frozen=True)
class Operand:
    name: str
    kind: Kind
    dtype: jnp.dtype | None = None  # outputs only


@dataclasses.dataclass(frozen=True)
class ChunkScan:
    """A chunk-scan kernel.

    Attributes:
      name: kernel name (shows in profiles).
      inputs: the input operands, in call order; exactly one has kind ``STATE`` (the initial
        carry).
      outputs: the output operands; exactly one has kind ``STATE`` (the final carry).
      step: ``step(values: dict, carry) -> (carry, outputs: dict)``; ``values`` holds every
        non-``STATE`` input's slice for the chunk, ``outputs`` every non-``STATE`` output's.
      reverse: walk the chunks from last to first.
      state_dtype: dtype of the carry.
    """

    name: str
    inputs: tuple[Operand, ...]
    outputs: tuple[Operand, ...]
    step: Callable
    reverse: bool
    state_dtype: jnp.dtype


@dataclasses.dataclass(frozen=True)
class Dims:
    """Sizes of one call: batch, heads, chunks, chunk, key, value, value tile."""

    b: int
    h: int
    n: int
    c: int
    k: int
    v: int
    tv: int

    @property
    def nv(self) -> int:
        return self.v // self.tv

    def shape(self, kind: Kind) -> tuple[int, ...]:
        b, h, t = self.b, self.h, self.n * self.c
        return {
            Kind.SEQ_KEY: (b, h, t, self.k),
            Kind.SEQ_VALUE: (b, h, t, self.v),
            Kind.SEQ_CHUNK: (b, h, t, self.c),
            Kind.SEQ_SCALAR: (b, h, t, 1),
            Kind.CHUNK_ROW: (b, h, self.n, 1, self.c),
            Kind.STATE: (b, h, self.k, self.v),
            Kind.STATES: (b, h, self.n, self.k, self.v),
            Kind.MAPS: (b, h, self.n, self.k, self.k),
            Kind.CHUNK_SCALAR: (b, h, self.n, 1, 1),
            Kind.PARTIAL_KEY: (self.nv, b, h, t, self.k),
            Kind.PARTIAL_CHUNK: (self.nv, b, h, t, self.c),
            Kind.PARTIAL_SCALAR: (self.nv, b, h, self.n, 1, 1),
        }[kind]


def dims_of(spec: ChunkScan, args, c: int, tv: int) -> Dims:
    """Reads the sizes from the arguments (validated against each operand's kind)."""
    shapes = {op.kind: a.shape for op, a in zip(spec.inputs, args, strict=True)}
    b, h, k, v = shapes[Kind.STATE]
    per_chunk = (s[2] * c for kind, s in shapes.items() if kind in PER_CHUNK_KINDS)
    t = next((s[2] for kind, s in shapes.items() if kind in SEQ_KINDS), None)
    t = next(per_chunk) if t is None else t  # a chain over per-chunk terms only
    if t % c:
        raise ValueError(f"padded time T'={t} must be a multiple of the chunk C={c}")
    dims = Dims(b, h, t // c, c, k, v, tv)
    for op, a in zip(spec.inputs, args, strict=True):
        if a.shape != dims.shape(op.kind):
            raise ValueError(
                f"{spec.name}: {op.name}.shape={a.shape}, expected {dims.shape(op.kind)}"
            )
    return dims


def out_shapes(spec: ChunkScan, dims: Dims):
    return [jax.ShapeDtypeStruct(dims.shape(op.kind), op.dtype) for op in spec.outputs]


@dataclasses.dataclass(frozen=True)
class ChunkMap:
    """A kernel parallel over chunks: one program per ``(batch, head, chunk)``, no carry.

    Each program sees its chunk's blocks over the whole value dimension (``tv = V``: operands
    that contract over ``V`` are complete in one program, no partial sums) and writes its
    chunk's outputs. Input and output kinds: ``SEQ_KEY``, ``SEQ_VALUE``, ``SEQ_CHUNK``,
    ``SEQ_SCALAR``, ``CHUNK_ROW``, ``STATES`` (the ``[K, V]`` state of the program's chunk),
    ``MAPS`` and ``CHUNK_SCALAR``.

    Attributes:
      name: kernel name (shows in profiles).
      inputs: the input operands, in call order.
      outputs: the output operands (with their dtypes).
      fn: ``fn(values: dict) -> outputs: dict`` on one chunk's values.
    """

    name: str
    inputs: tuple[Operand, ...]
    outputs: tuple[Operand, ...]
    fn: Callable


MAP_KINDS = (
    Kind.SEQ_KEY,
    Kind.SEQ_VALUE,
    Kind.SEQ_CHUNK,
    Kind.SEQ_SCALAR,
    Kind.CHUNK_ROW,
    Kind.STATES,
    Kind.MAPS,
    Kind.CHUNK_SCALAR,
)


def map_dims(spec: ChunkMap, args, c: int, k: int, v: int) -> Dims:
    """The sizes of a :class:`ChunkMap` call with key and value sizes ``k``, ``v`` (validated
    against each operand's kind)."""
    seq = [a.shape for op, a in zip(spec.inputs, args, strict=True) if op.kind in SEQ_KINDS]
    b, h, t = seq[0][:3]
    if t % c:
        raise ValueError(f"padded time T'={t} must be a multiple of the chunk C={c}")
    dims = Dims(b, h, t // c, c, k, v, v)
    for op, a in zip(spec.inputs, args, strict=True):
        if op.kind not in MAP_KINDS:
            raise ValueError(f"{spec.name}: {op.name} has kind {op.kind}, not one of {MAP_KINDS}")
        if a.shape != dims.shape(op.kind):
            raise ValueError(
                f"{spec.name}: {op.name}.shape={a.shape}, expected {dims.shape(op.kind)}"
            )
    return dims


def map_block_spec(kind: Kind, d: Dims):
    """The block of one ``(b, h, n)`` program of a :class:`ChunkMap` (every backend's)."""
    if kind is Kind.SEQ_KEY:
        return pl.BlockSpec((None, None, d.c, d.k), lambda b, h, n: (b, h, n, 0))
    if kind is Kind.SEQ_VALUE:
        return pl.BlockSpec((None, None, d.c, d.v), lambda b, h, n: (b, h, n, 0))
    if kind is Kind.SEQ_CHUNK:
        return pl.BlockSpec((None, None, d.c, d.c), lambda b, h, n: (b, h, n, 0))
    if kind is Kind.SEQ_SCALAR:
        return pl.BlockSpec((None, None, d.c, 1), lambda b, h, n: (b, h, n, 0))
    if kind is Kind.CHUNK_ROW:
        return pl.BlockSpec((None, None, None, 1, d.c), lambda b, h, n: (b, h, n, 0, 0))
    if kind is Kind.STATES:
        return pl.BlockSpec((None, None, None, d.k, d.v), lambda b, h, n: (b, h, n, 0, 0))
    if kind is Kind.MAPS:
        return pl.BlockSpec((None, None, None, d.k, d.k), lambda b, h, n: (b, h, n, 0, 0))
    if kind is Kind.CHUNK_SCALAR:
        return pl.BlockSpec((None, None, None, 1, 1), lambda b, h, n: (b, h, n, 0, 0))
    raise ValueError(f"operand kind {kind!r} is not a ChunkMap kind")


def map_call(spec: ChunkMap, *args, c: int, k: int, v: int, interpret: bool, compiler_params):
    """Runs a :class:`ChunkMap` with grid ``(B, H, N)`` and ``map_block_spec`` blocks on the
    backend of ``compiler_params``; returns the outputs in spec order."""
    d = map_dims(spec, args, c, k, v)
    return pl.pallas_call(
        functools.partial(map_kernel, spec=spec),
        grid=(d.b, d.h, d.n),
        in_specs=[map_block_spec(op.kind, d) for op in spec.inputs],
        out_specs=[map_block_spec(op.kind, d) for op in spec.outputs],
        out_shape=out_shapes(spec, d),
        compiler_params=compiler_params,
        interpret=interpret,
        name=spec.name,
    )(*args)


def map_kernel(*refs, spec: ChunkMap):
    """The body of every backend's :class:`ChunkMap` kernel: read the chunk's blocks, apply
    ``spec.fn``, write its outputs."""
    n_in = len(spec.inputs)
    values = {op.name: ref[...] for op, ref in zip(spec.inputs, refs[:n_in], strict=True)}
    results = spec.fn(values)
    for op, ref in zip(spec.outputs, refs[n_in:], strict=True):
        ref[...] = results[op.name].astype(op.dtype)
