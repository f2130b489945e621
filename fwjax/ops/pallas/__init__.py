"""Pallas kernels of the chunked fast weight rules: options, backend choice and tile layout.

One kernel design for every rule: phase 1 of the chunked form (the WY terms of the delta rule) runs
in XLA on all chunks at once; the sequential phase 2 runs as a Pallas kernel with one program per
``(batch, head, value tile)`` that keeps its fp32 state tile ``[K, tv]`` on chip while it walks the
chunks (with ``PallasSchedule.PHASED`` it carries only the state chain, and kernels parallel over
chunks do the rest). Columns of the state evolve independently given the chunk terms, so value
tiling is exact. The per-chunk math is shared (:mod:`fwjax.ops.pallas.chunk_math`); each backend
has its own file:

- :mod:`fwjax.ops.pallas.triton_gpu` — GPU through Pallas' Triton lowering (see its docstring
  for why Triton and not Mosaic GPU);
- :mod:`fwjax.ops.pallas.mosaic_tpu` — TPU through Mosaic TPU;
- :mod:`fwjax.ops.pallas.mosaic_gpu` — the phased (gated) delta rule's kernels through Mosaic
  GPU (``PallasBackend.MOSAIC_GPU``).

On a CPU backend there is no Pallas compiler: kernels run in interpret mode, automatically.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fwjax.ops.pallas.scan_spec import PER_CHUNK_KINDS
from fwjax.ops.state_split import resolve_segments
from fwjax.validation import check_positive_ints


class PallasBackend(enum.Enum):
    """Which Pallas kernel family runs.

    Attributes:
      AUTO: ``MOSAIC_TPU`` on TPU. On GPU, from the JAX that deprecates Pallas' Triton
        lowering (:data:`TRITON_DEPRECATED_JAX`), ``MOSAIC_GPU`` for every call it has
        kernels for (see below), else ``TRITON``, the fallback (and on older JAX the GPU
        backend). ``TRITON`` on CPU (interpret mode).
      TRITON: the GPU kernels lowered through Triton (:mod:`fwjax.ops.pallas.triton_gpu`).
      MOSAIC_TPU: the TPU kernels (:mod:`fwjax.ops.pallas.mosaic_tpu`).
      MOSAIC_GPU: the delta and gated delta rules under ``PallasSchedule.PHASED`` with
        either chain, as Mosaic GPU kernels for Hopper warpgroups
        (:mod:`fwjax.ops.pallas.mosaic_gpu`; bfloat16/float16 inputs, sizes padded to
        multiples of 64): phase 1, the state and cotangent chains, the outputs and the
        gradients (phase 1 and the gradients as the Triton kernels beyond ``C = 64`` with
        ``K, V <= 128``). Other rules and options raise ValueError. Compiled behaviour and
        speed are not yet measured.
    """

    AUTO = "auto"
    TRITON = "triton"
    MOSAIC_TPU = "mosaic_tpu"
    MOSAIC_GPU = "mosaic_gpu"


class PallasBackward(enum.Enum):
    """How the backward pass of ``Impl.PALLAS`` runs.

    Attributes:
      KERNEL: a reverse chunk scan as a Pallas kernel (state cotangent kept on chip), then the
        VJP of phase 1 in XLA.
      XLA: the XLA reverse chunk scan of ``Impl.CHUNKED`` (the rule's ``xla_backward``, see
        :mod:`fwjax.ops.pallas.rule_kernel`), fed the chunk states that the forward kernel
        saved. A fallback while a backend's backward kernel misbehaves; the only backward of
        rules without a backward kernel (the gated delta rule).
    """

    KERNEL = "kernel"
    XLA = "xla"


class PallasSchedule(enum.Enum):
    """How the kernels of the delta and gated delta rules divide the chunk loop.

    Attributes:
      FUSED: one sequential kernel per ``(batch, head, value tile)`` does all of phase 2, four
        matmuls per chunk (output included); its backward kernel nine, with partial sums over
        value tiles through HBM.
      PHASED: the structure of flash-linear-attention (its WY kernels, ``chunk_delta_h``,
        ``chunk_o``): phase 1 as a kernel parallel over chunks, then the sequential kernel carries
        only the chain ``S ← Γ_C S + Kᵀ (U − W S)`` (two matmuls per chunk) and saves the state
        entering each chunk in the matmul dtype; a kernel with one program per ``(batch, head,
        chunk)``, all in parallel, then computes the outputs. The backward mirrors it: a reverse
        kernel carries only ``G``, saving it per chunk, a parallel kernel forms each chunk's
        cotangents over the whole value dimension (no partial sums), and another, also
        parallel over chunks, phase 1's VJP (the inputs' cotangents). With the op's
        ``state_segments`` the chain kernels run as parallel segments (the split state scan,
        :mod:`fwjax.ops.pallas.phased`). Rules without these kernels (the sum rule, packed
        rows) run ``FUSED``.
    """

    FUSED = "fused"
    PHASED = "phased"


class PallasChain(enum.Enum):
    """How the phased schedule's sequential kernels step the state chain.

    Attributes:
      UPDATE: ``S ← Γ_C S + Kᵀ (U − W S)``, two dependent matmuls (``2·C·K·V`` flops) per chunk;
        backward ``G ← Γ_C G + Qᵀ Ō − Wᵀ (Pᵀ Ō + K G)``.
      AFFINE: ``S ← M S + B`` with ``M = Γ_C I − Kᵀ W`` and ``B = Kᵀ U`` formed by a kernel
        parallel over chunks: one dependent matmul (``K·K·V`` flops) per chunk, fewer for
        ``K < 2C``; backward ``G ← Mᵀ G + H`` with ``H = Qᵀ Ō − Wᵀ Pᵀ Ō`` formed in parallel.
        ``M`` enters as a matmul operand in the matmul dtype at every chunk; its rounding does
        not compound (``benchmarks/chain_drift.py``).
    """

    UPDATE = "update"
    AFFINE = "affine"


class PallasPrecision(enum.Enum):
    """Dtype of the kernels' matmul operands (accumulation and the state are always in the
    state dtype, at least float32).

    Attributes:
      INPUT: the inputs' dtype: bfloat16/float16 inputs run every matmul on tensor cores, with
        the state tile and the fp32 phase-1 terms rounded to the inputs' dtype as operands
        (the policy of flash-linear-attention). Outputs, gradients AND the state then carry
        the inputs' precision (errors of order 2^-8 for bfloat16).
      STATE: the state dtype: float32 matmuls (no bfloat16 tensor cores), matching
        ``Impl.CHUNKED`` to float32 accuracy.
    """

    INPUT = "input"
    STATE = "state"


@dataclasses.dataclass(frozen=True)
class PallasOptions:
    """Options of ``Impl.PALLAS`` (hashable: a static argument of the jitted ops).

    Attributes:
      backend: a :class:`PallasBackend`.
      interpret: run the kernel in Pallas' interpret mode (on XLA, for debugging and CPU
        tests). None: interpret exactly when the default backend is CPU. On CPU interpret
        mode is forced, since Pallas has no CPU compiler.
      backward: a :class:`PallasBackward`.
      precision: a :class:`PallasPrecision`.
      value_block: the value tile ``tv`` (columns of the state per program). None: the whole
        (padded) value dimension, halved while there are fewer than 128 programs and the
        tile is above 16 (more programs hide the latency of the sequential chunk loop).
      num_warps: Triton warps per program; None: 4 for ``K·tv <= 64·64``, else 8.
      num_stages: Triton software pipelining stages of the chunk loop.
      schedule: a :class:`PallasSchedule`.
      chain: a :class:`PallasChain` (``PallasSchedule.PHASED`` only).
    """

    backend: PallasBackend = PallasBackend.AUTO
    interpret: bool | None = None
    backward: PallasBackward = PallasBackward.KERNEL
    precision: PallasPrecision = PallasPrecision.INPUT
    value_block: int | None = None
    num_warps: int | None = None
    num_stages: int = 2
    schedule: PallasSchedule = PallasSchedule.FUSED
    chain: PallasChain = PallasChain.UPDATE

    def __post_init__(self):
        object.__setattr__(self, "backend", PallasBackend(self.backend))
        object.__setattr__(self, "backward", PallasBackward(self.backward))
        object.__setattr__(self, "precision", PallasPrecision(self.precision))
        object.__setattr__(self, "schedule", PallasSchedule(self.schedule))
        object.__setattr__(self, "chain", PallasChain(self.chain))
        check_positive_ints(value_block=self.value_block, num_warps=self.num_warps, allow_none=True)
        check_positive_ints(num_stages=self.num_stages)


DEFAULT_OPTIONS = PallasOptions()

# The JAX release that deprecates Pallas' Triton lowering (0.12 warns ``jax-pallas-triton``
# when lowering): from it, ``PallasBackend.AUTO`` takes Mosaic GPU where it has the kernels.
TRITON_DEPRECATED_JAX = (0, 11)


def jax_version() -> tuple[int, int]:
    """``(major, minor)`` of the running JAX."""
    major, minor = jax.__version__.split(".")[:2]
    return int(major), int(minor)


def resolve_backend(options: PallasOptions, platform: str | None = None) -> PallasBackend:
    """The concrete backend for ``options`` on ``platform`` (default: JAX's default backend),
    before the call's sizes are known: ``AUTO`` on GPU resolves to ``TRITON`` here and may
    become ``MOSAIC_GPU`` in :func:`kernel_config`."""
    platform = platform or jax.default_backend()
    if options.backend is PallasBackend.AUTO:
        return PallasBackend.MOSAIC_TPU if platform == "tpu" else PallasBackend.TRITON
    return options.backend


def resolve_interpret(options: PallasOptions, platform: str | None = None) -> bool:
    """Interpret mode: as requested, forced on CPU (Pallas compiles only for GPU and TPU)."""
    platform = platform or jax.default_backend()
    if platform == "cpu":
        return True
    return bool(options.interpret)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class Tiling(NamedTuple):
    """Padded sizes and the value tile of one kernel call.

    ``chunk``: chunk length ``C``; ``key``/``value``: padded ``K``/``V``; ``value_block``: ``tv``
    (divides ``value``); ``chunks``: ``N``, the number of chunks of the padded sequence (a
    multiple of ``segments``); ``segments``: ``P`` of the split state scan (1: none).
    """

    chunk: int
    key: int
    value: int
    value_block: int
    chunks: int
    segments: int = 1


def triton_tiling(t, k, v, chunk_size, programs, options: PallasOptions) -> Tiling:
    """Triton needs power-of-two loads/stores and ``tl.dot`` operands of at least 16 × 16:
    chunk, key and value sizes are rounded up to powers of two >= 16 (zero keys, values and
    β = 0 are exact no-ops; see :mod:`fwjax.ops.common`). ``programs``: ``B·H``."""
    c = next_power_of_2(max(16, min(chunk_size, t)))
    kp, vp = next_power_of_2(max(16, k)), next_power_of_2(max(16, v))
    tv = _value_block(vp, programs, options, minimum=16)
    if tv & (tv - 1) or tv < 16:
        raise ValueError(f"value_block={tv} must be a power of two >= 16 for Triton")
    return Tiling(c, kp, vp, tv, -(-t // c))


def tpu_tiling(t, k, v, chunk_size, programs, options: PallasOptions) -> Tiling:
    """Mosaic TPU blocks: the last two dims divisible by (8, 128) or spanning the array. The
    chunk (second-minor) is rounded up to a multiple of 16 (bfloat16 packs 16 rows per tile);
    K and V stay whole; a value tile must be a multiple of 128."""
    c = -(-max(16, min(chunk_size, t)) // 16) * 16
    tv = _value_block(v, programs, options, minimum=128)
    if tv != v and tv % 128:
        raise ValueError(f"value_block={tv} must be V={v} or a multiple of 128 on TPU")
    return Tiling(c, k, v, tv, -(-t // c))


def mosaic_gpu_tiling(t, k, v, chunk_size, programs, options: PallasOptions) -> Tiling:
    """:func:`triton_tiling` (its Triton kernels may run beside) with the sizes of
    Hopper's warpgroup MMA: chunk, key and value rounded up to powers of two >= 64, and a value
    tile of at least 64 (zero keys, values and β = 0 are exact no-ops). Unless given, the value
    tile also halves (down to 64) until the carry ``[K, tv]`` fits the registers and the
    kernels fit shared memory (:func:`fwjax.ops.pallas.mosaic_gpu.smem_bytes`)."""
    from fwjax.ops.pallas import mosaic_gpu

    c = next_power_of_2(max(mosaic_gpu.MMA_TILE, min(chunk_size, t)))
    kp = next_power_of_2(max(mosaic_gpu.MMA_TILE, k))
    vp = next_power_of_2(max(mosaic_gpu.MMA_TILE, v))
    tv = _value_block(vp, programs, options, minimum=mosaic_gpu.MMA_TILE)
    if tv & (tv - 1) or tv < mosaic_gpu.MMA_TILE:
        raise ValueError(f"value_block={tv} must be a power of two >= 64 for Mosaic GPU")
    while (
        options.value_block is None
        and tv > mosaic_gpu.MMA_TILE
        and (
            kp * tv > mosaic_gpu.CARRY_ELEMENTS
            or mosaic_gpu.smem_bytes(c, kp, tv) > mosaic_gpu.SMEM_LIMIT
        )
    ):
        tv //= 2
    return Tiling(c, kp, vp, tv, -(-t // c))


def _value_block(v, programs, options, minimum):
    if options.value_block is not None:
        tv = options.value_block
    else:
        tv = v
        while programs * (v // tv) < 128 and tv // 2 >= minimum and tv % 2 == 0:
            tv //= 2
    if v % tv:
        raise ValueError(f"value_block={tv} must divide the padded value dimension {v}")
    return tv


class KernelConfig(NamedTuple):
    """Everything static about one ``Impl.PALLAS`` call (hashable)."""

    backend: PallasBackend
    interpret: bool
    backward: PallasBackward
    tiling: Tiling
    matmul_dtype: jnp.dtype
    num_warps: int | None
    num_stages: int
    schedule: PallasSchedule
    chain: PallasChain


def kernel_config(
    options,
    t,
    k,
    v,
    chunk_size,
    programs,
    out_dtype,
    state_dtype,
    state_segments=None,
    phased: bool = False,
) -> KernelConfig:
    """Resolves ``options`` for sequence length ``t``, key/value sizes, ``B·H`` programs.

    The matmul operands take the inputs' dtype ``out_dtype`` (``PallasPrecision.INPUT``) or
    ``state_dtype`` (``PallasPrecision.STATE``); products accumulate, and the state lives, in
    the state dtype. ``state_segments``: the split state scan's ``P`` requested for a rule
    with the phased kernels (None: none); under ``PallasSchedule.PHASED`` it sets
    ``Tiling.segments`` (:func:`fwjax.ops.state_split.resolve_segments`) and pads ``N`` to a
    multiple of it with no-op chunks. ``phased``: the rule has the phased kernels (the delta
    and gated delta rules), which ``PallasBackend.MOSAIC_GPU`` runs.
    """
    options = options or DEFAULT_OPTIONS
    args = (t, k, v, chunk_size, programs, out_dtype, state_dtype, state_segments)
    if options.backend is PallasBackend.AUTO and _auto_mosaic_gpu(options, phased, args):
        options = dataclasses.replace(options, backend=PallasBackend.MOSAIC_GPU)
    backend = resolve_backend(options)
    tiling_fn = {
        PallasBackend.MOSAIC_TPU: tpu_tiling,
        PallasBackend.MOSAIC_GPU: mosaic_gpu_tiling,
    }.get(backend, triton_tiling)
    tiling = tiling_fn(t, k, v, chunk_size, programs, options)
    if state_segments and options.schedule is PallasSchedule.PHASED:
        p = resolve_segments(state_segments, tiling.chunks)
        # The chains run P× the programs: the value tile need not shrink as far for them.
        tiling = tiling_fn(t, k, v, chunk_size, programs * p, options)
        tiling = tiling._replace(chunks=-(-tiling.chunks // p) * p, segments=p)
    input_precision = options.precision is PallasPrecision.INPUT
    matmul_dtype = jnp.dtype(out_dtype if input_precision else state_dtype)
    if backend is PallasBackend.MOSAIC_GPU:
        _check_mosaic_gpu(options, tiling, matmul_dtype, state_dtype)
    return KernelConfig(
        backend,
        resolve_interpret(options),
        options.backward,
        tiling,
        matmul_dtype,
        options.num_warps,
        options.num_stages,
        options.schedule,
        options.chain,
    )


def _auto_mosaic_gpu(options, phased: bool, args) -> bool:
    """``AUTO``'s choice of Mosaic GPU over Triton: on a GPU, from
    :data:`TRITON_DEPRECATED_JAX`, for a rule with the phased kernels whose call Mosaic GPU
    takes (``PallasSchedule.PHASED``, 16-bit matmul operands, sizes within its shared
    memory)."""
    if not phased or jax.default_backend() != "gpu" or jax_version() < TRITON_DEPRECATED_JAX:
        return False
    try:
        kernel_config(dataclasses.replace(options, backend=PallasBackend.MOSAIC_GPU), *args)
    except ValueError:  # no Mosaic GPU kernel for these options, dtypes or sizes
        return False
    return True


def _check_mosaic_gpu(options, tiling, matmul_dtype, state_dtype) -> None:
    """Raises ValueError for options that ``PallasBackend.MOSAIC_GPU`` has no kernel for."""
    from fwjax.ops.pallas import mosaic_gpu

    if options.schedule is not PallasSchedule.PHASED:
        raise ValueError(
            f"PallasBackend.MOSAIC_GPU runs only PallasSchedule.PHASED, "
            f"got schedule={options.schedule.value!r}"
        )
    # (The sizes this admits also fit the affine chain: mosaic_gpu.affine_smem_bytes.)
    mosaic_gpu.check_supported(
        matmul_dtype, state_dtype, tiling.chunk, tiling.key, tiling.value_block
    )


def run_chunk_scan(spec, *args, cfg: KernelConfig):
    """Runs a :class:`fwjax.ops.pallas.scan_spec.ChunkScan` on ``cfg``'s backend (Triton for
    ``MOSAIC_GPU``, whose own kernels :mod:`fwjax.ops.pallas.phased` calls directly)."""
    tiles = {"c": cfg.tiling.chunk, "tv": cfg.tiling.value_block, "interpret": cfg.interpret}
    if cfg.backend is PallasBackend.MOSAIC_TPU:
        from fwjax.ops.pallas import mosaic_tpu

        return mosaic_tpu.chunk_scan(spec, *args, **tiles)
    from fwjax.ops.pallas import triton_gpu

    return triton_gpu.chunk_scan(
        spec, *args, **tiles, num_warps=cfg.num_warps, num_stages=cfg.num_stages
    )


def run_chunk_map(spec, *args, cfg: KernelConfig):
    """Runs a :class:`fwjax.ops.pallas.scan_spec.ChunkMap` on ``cfg``'s backend (Triton for
    ``MOSAIC_GPU``, whose own kernels :mod:`fwjax.ops.pallas.phased` calls directly)."""
    t = cfg.tiling
    sizes = {"c": t.chunk, "k": t.key, "v": t.value, "interpret": cfg.interpret}
    if cfg.backend is PallasBackend.MOSAIC_TPU:
        from fwjax.ops.pallas import mosaic_tpu

        return mosaic_tpu.chunk_map(spec, *args, **sizes)
    from fwjax.ops.pallas import triton_gpu

    return triton_gpu.chunk_map(spec, *args, **sizes, num_warps=cfg.num_warps)


def to_kernel_layout(x: jax.Array, tiling: Tiling, width: int | None) -> jax.Array:
    """``[B, T, H, D] -> [B, H, N, C, width]`` (or ``[B, T, H] -> [B, H, N, C]`` when
    ``width`` is None), zero-padding time to ``N·C`` and the last axis to ``width``."""
    b, t, h = x.shape[:3]
    pad = [(0, 0), (0, tiling.chunks * tiling.chunk - t), (0, 0)]
    if width is not None:
        pad.append((0, width - x.shape[3]))
    tail = () if width is None else (width,)
    x = jnp.pad(x, pad).reshape(b, tiling.chunks, tiling.chunk, h, *tail)
    return jnp.moveaxis(x, 3, 1)


def from_kernel_layout(x: jax.Array, t: int, width: int) -> jax.Array:
    """``[B, H, N, C, D'] -> [B, T, H, width]``: drops the time and feature padding."""
    b, h, n, c = x.shape[:4]
    x = jnp.moveaxis(x, 1, 3).reshape(b, n * c, h, x.shape[-1])
    return x[:, :t, :, :width]


def flat(x: jax.Array) -> jax.Array:
    """``[B, H, N, C, D] -> [B, H, N·C, D]`` (the kernels' sequence layout)."""
    return x.reshape(*x.shape[:2], x.shape[2] * x.shape[3], x.shape[4])


def unflat(x: jax.Array, c: int) -> jax.Array:
    """``[..., B, H, N·C, D] -> [..., B, H, N, C, D]``."""
    return x.reshape(*x.shape[:-2], x.shape[-2] // c, c, x.shape[-1])


def flat_operand(x: jax.Array, kind) -> jax.Array:
    """:func:`flat` for an operand laid out per step; per-chunk kinds
    (:data:`fwjax.ops.pallas.scan_spec.PER_CHUNK_KINDS`) pass as they are."""
    return x if kind in PER_CHUNK_KINDS else flat(x)


def unflat_operand(x: jax.Array, kind, c: int) -> jax.Array:
    """The inverse of :func:`flat_operand`."""
    return x if kind in PER_CHUNK_KINDS else unflat(x, c)


__all__ = [
    "DEFAULT_OPTIONS",
    "TRITON_DEPRECATED_JAX",
    "PallasBackend",
    "PallasBackward",
    "PallasChain",
    "PallasOptions",
    "PallasPrecision",
    "PallasSchedule",
    "Tiling",
    "mosaic_gpu_tiling",
    "resolve_backend",
    "resolve_interpret",
]
