"""GPU backend: the (gated) delta rule's phased kernels as Mosaic GPU kernels (Hopper warpgroups).

``PallasBackend.MOSAIC_GPU`` runs the phased schedule (:mod:`fwjax.ops.pallas.phased`) as six
Mosaic GPU kernels: the two sequential chains here, and the four kernels parallel over chunks
(phase 1's WY terms, the outputs, the gradients and phase 1's VJP) in
:mod:`fwjax.ops.pallas.mosaic_gpu_chunks`,
which shares the MMA helper :func:`mma_sum` and the size checks here.

In each chain (:func:`_chain_kernel`) one CTA per ``(batch, head, value tile)`` walks the
chunks with its carry tile ``[K, tv]`` in registers (float32), chunk operands arriving by TMA
into shared memory through :func:`jax.experimental.pallas.mosaic_gpu.emit_pipeline` (two
chunks in flight), the carry entering each chunk leaving by TMA in the matmul dtype. Forward
(:func:`delta_chain_forward`)::

    states[n] = S
    X = U_n − W_n S                   MMA: W_n [C, K] @ S [K, tv], both in shared memory
    S ← Γ_n S + K_nᵀ X                MMA: K_nᵀ [K, C] @ X [C, tv]

Backward, from the last chunk (:func:`delta_chain_backward`)::

    gs[n] = G
    Ũ̄ = P_nᵀ Ō_n + K_n G             two MMAs
    G ← Γ_n G + Q_nᵀ Ō_n − W_nᵀ Ũ̄    two MMAs

``Γ_n`` is the gated rule's chunk decay (1 for the delta rule), read in float32 from a row of
its own (:func:`decay_rows`). ``PallasChain.AFFINE``'s chains, ``S ← M_n S + B_n`` and
``G ← M_nᵀ G + H_n``, one MMA per chunk, run on the same builder (:func:`affine_chain`).
With ``state_segments`` the chains split as in :func:`fwjax.ops.pallas.phased._chain` (the
widened pass is the same kernel without saves).

Constraints, checked by :func:`check_supported`: bfloat16 or float16 operands
(``PallasPrecision.INPUT`` with such inputs), a float32 state, ``C``, ``K`` and ``tv``
multiples of 64 (the warpgroup MMA's rows; :func:`fwjax.ops.pallas.mosaic_gpu_tiling` pads to
them), and kernels that fit Hopper's shared memory (:func:`smem_bytes`: with two chunks in
flight that means ``C = 64`` and ``K <= 128``). The tiling's default value tile keeps the
carry within 64 float32 registers per thread (``tv = 64`` at ``K = 128``).

Written so that the same kernel bodies run in Pallas' Mosaic GPU interpret mode (the CPU tests)
and lower for CUDA; they differ only where the interpreter lacks a feature:

- a transposed MMA operand (``K_nᵀ``, ``Sᵀ``, ...) is a transposed view of its buffer
  (:func:`~jax.experimental.pallas.mosaic_gpu.transpose_ref`) when compiling; the interpreter
  has no such views, so there it is copied, transposed, into scratch (:func:`mma_sum`);
- register layouts that Mosaic GPU cannot infer (the masks' iotas, vectors broadcast along
  rows or columns, in :mod:`fwjax.ops.pallas.mosaic_gpu_chunks`) are named only when
  compiling;
- each product goes into a fresh, zeroed accumulator and the state adds it in registers (the
  interpreter has no pre-initialised accumulators, ``pl.run_state``);
- the shared-memory tiling and swizzle that the MMA needs are applied only when compiling (the
  interpreter does not model them; the kernel's values are the same).

Compiled behaviour and speed are unverified here: the tests run the interpreter and lower the
kernels for CUDA (``jax.export``) without a GPU.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

MMA_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
MMA_TILE = 64  # rows of one warpgroup MMA; C, K and tv are multiples of it
# Shared memory per CTA on Hopper (the limit Mosaic GPU checks when it compiles), less a margin
# for the pipeline's barriers.
SMEM_LIMIT = 227 * 1024 - 1024
# The float32 elements of one [K, tv] carry (or accumulator) per warpgroup beyond which the
# registers spill: 64 per thread.
CARRY_ELEMENTS = 64 * 128


def smem_bytes(chunk: int, key: int, value_block: int, itemsize: int = 2) -> int:
    """Shared memory of the largest chain, the cotangent chain: two chunks in flight of
    ``P [C, C]``, ``K``, ``Q``, ``W [C, K]``, ``Ō [C, tv]``, plus the carry
    ``[K, tv]`` and ``Ũ̄ [C, tv]`` (the float32 carry's buffer lives outside the pipeline's
    scope). The state chain and the output kernel need less; the gradient kernel has its own
    bound (:func:`~fwjax.ops.pallas.mosaic_gpu_chunks.gradients_smem_bytes`)."""
    c, k, tv = chunk, key, value_block
    in_flight = 2 * (c * c + 3 * c * k + c * tv)
    return itemsize * (in_flight + k * tv + c * tv)


# The JAX whose Mosaic GPU API (``plgpu.kernel`` with ``out_type``/``scratch_types``/
# ``kernel_name``, the interpreter) these kernels are written and tested against.
MIN_JAX = (0, 10)


def check_supported(matmul_dtype, state_dtype, chunk: int, key: int, value_block: int) -> None:
    """Raises ValueError unless the kernel supports this JAX, these dtypes and sizes."""
    from fwjax.ops.pallas import jax_version

    if jax_version() < MIN_JAX:
        raise ValueError(
            f"PallasBackend.MOSAIC_GPU needs jax >= {'.'.join(map(str, MIN_JAX))}, "
            f"found {jax.__version__}"
        )
    if jnp.dtype(matmul_dtype) not in MMA_DTYPES:
        raise ValueError(
            f"PallasBackend.MOSAIC_GPU needs bfloat16 or float16 matmul operands, got "
            f"{jnp.dtype(matmul_dtype).name} (PallasPrecision.INPUT with such inputs)"
        )
    if jnp.dtype(state_dtype) != jnp.float32:
        raise ValueError(
            f"PallasBackend.MOSAIC_GPU carries a float32 state, got {jnp.dtype(state_dtype).name}"
        )
    for name, size in (("chunk", chunk), ("key", key), ("value_block", value_block)):
        if size % MMA_TILE:
            raise ValueError(f"PallasBackend.MOSAIC_GPU needs {name}={size} a multiple of 64")
    needed = smem_bytes(chunk, key, value_block, jnp.dtype(matmul_dtype).itemsize)
    if needed > SMEM_LIMIT:
        raise ValueError(
            f"PallasBackend.MOSAIC_GPU with {chunk=}, {key=}, {value_block=} needs {needed} "
            f"bytes of shared memory per CTA, over {SMEM_LIMIT}: use chunk_size=64, a smaller "
            "value_block, or K <= 128"
        )


def interpret_params():
    # JAX 0.10 exports Mosaic GPU's interpreter parameters only from its private module.
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


# CUDA's launch limits on the grid: x up to 2³¹ − 1 blocks, y and z up to 65535.
GRID_X_LIMIT = 2**31 - 1
GRID_YZ_LIMIT = 65535


def cuda_grid(grid: tuple[int, ...]) -> tuple[int, int, int]:
    """The CUDA grid ``(x, y, z)`` Mosaic GPU launches for a Pallas grid: more than three
    axes are flattened into the first (``(a, b, c, d) → (a·b, c, d)``), and the order is
    reversed, so the last Pallas axis is CUDA's x."""
    if len(grid) > 3:
        grid = (math.prod(grid[:-2]), *grid[-2:])
    z, y, x = (1,) * (3 - len(grid)) + tuple(grid)
    return x, y, z


def launch(kernel, *, grid: tuple[int, ...], grid_names: tuple[str, ...], interpret: bool, **kw):
    """``plgpu.kernel`` over ``grid`` (one CTA per grid point), in the interpreter when
    ``interpret``, after checking the grid against CUDA's limits (:func:`cuda_grid`).

    Raises:
      ValueError: the grid exceeds a CUDA limit (the message names the axes).
    """
    x, y, z = cuda_grid(grid)
    if x > GRID_X_LIMIT or max(y, z) > GRID_YZ_LIMIT:
        raise ValueError(
            f"PallasBackend.MOSAIC_GPU: grid {dict(zip(grid_names, grid, strict=True))} launches "
            f"as CUDA blocks {(x, y, z)=}, over the limits ({GRID_X_LIMIT}, {GRID_YZ_LIMIT}, "
            f"{GRID_YZ_LIMIT}); split the batch"
        )
    return plgpu.kernel(
        kernel,
        grid=grid,
        grid_names=grid_names,
        interpret=interpret_params() if interpret else None,
        **kw,
    )


def mma_transforms(columns: int, dtype, interpret: bool) -> tuple:
    """Shared-memory tiling and swizzle of a ``[rows, columns]`` MMA operand (none when
    interpreting)."""
    if interpret:
        return ()
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = plgpu.find_swizzle(columns * itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


class Operand(NamedTuple):
    """One chunk-wise operand of a chain kernel: ``array [B, H, ...]`` in HBM, of which each
    step reads the block ``block`` at ``index(chunk, value_tile)``, laid out for the MMA as a
    ``[rows, columns]`` operand (``columns`` its last dimension) when compiling."""

    array: jax.Array
    block: tuple
    index: Callable
    mma: bool = True  # an MMA operand (tiled and swizzled when compiling)


# Γ_C of every chunk as a row ``[B, H, N, 1, DECAY_ROW]`` (float32, the value repeated): a
# TMA copy moves a multiple of 128 bytes.
DECAY_ROW = 32


def decay_rows(decay: jax.Array) -> jax.Array:
    """The gated rule's chunk decays ``Γ_C [B, H, N, 1, 1]`` as the chains read them."""
    return jnp.broadcast_to(decay.astype(jnp.float32), (*decay.shape[:-1], DECAY_ROW))


def _decay_operand(decay) -> tuple:
    """The chains' operand for ``decay`` (``[B, H, N, 1, DECAY_ROW]``), or none."""
    if decay is None:
        return ()
    return (Operand(decay, (None, 1, DECAY_ROW), lambda n, j: (n, 0, 0), mma=False),)


def _chain_kernel(step, operands, carry0, scratch, *, chunks, tv, save, reverse, interpret, name):
    """A sequential chain over the chunks, one CTA per ``(batch, head, value tile)``.

    The carry ``C [K, tv]`` (float32) stays in registers. At chunk ``n`` (descending when
    ``reverse``) the kernel writes ``C`` in the matmul dtype to shared memory (the step's MMA
    operand, and with ``save`` the source of its TMA copy to ``saved[n]``), then
    ``C ← step(blocks, C, c_smem, *scratch_refs)`` with the chunk's operand blocks in shared
    memory (TMA, two chunks in flight).

    Args:
      step: the chain's step (see above); returns the new carry.
      operands: :class:`Operand` tuples, the first one in the matmul dtype; MMA operands are
        tiled for the MMA in their own dtype when compiling.
      carry0: the carry entering the first step, ``[B, H, K, V]`` float32.
      scratch: shapes ``[rows, columns]`` of the step's shared-memory scratch (matmul dtype).
      chunks: ``N``, the chunks walked.
      tv: the value tile (divides ``V``).
      save: also return the carry entering each chunk ``[B, H, N, K, V]``.
      reverse: walk the chunks from last to first.
      interpret: Mosaic GPU's interpret mode.
      name: the kernel's name.

    Returns:
      ``(final carry,)``, or ``(final carry, saved)`` with ``save``.
    """
    b, h, dk, dv = carry0.shape
    n = chunks
    md = operands[0].array.dtype
    f32 = jnp.float32
    chunk_of = (lambda i: n - 1 - i) if reverse else (lambda i: i)

    # The float32 carry entering and leaving passes through shared memory (tiled when compiled,
    # so that its loads and stores take the MMA accumulator's register layout), in scopes of
    # their own: the buffer does not sit beside the pipeline's.
    carry_smem_type = plgpu.SMEM((dk, tv), f32, transforms=mma_transforms(tv, f32, interpret))

    def kernel(*refs):
        gmem, (final_gmem, *saved), (c_smem, *scratch_refs) = (
            refs[: len(operands) + 1],
            refs[len(operands) + 1 : len(operands) + 2 + save],
            refs[len(operands) + 2 + save :],
        )
        *ops_gmem, carry0_gmem = gmem
        bi, hi, j = (jax.lax.axis_index(axis) for axis in ("b", "h", "j"))
        cols = pl.ds(j * tv, tv)

        def load_carry(carry_smem, barrier):
            plgpu.copy_gmem_to_smem(carry0_gmem.at[bi, hi, :, cols], carry_smem, barrier)
            plgpu.barrier_wait(barrier)
            return carry_smem[...]

        def body(indices, *blocks_and_carry):
            *blocks, carry = blocks_and_carry
            (i,) = indices
            # The carry entering this chunk, in the matmul dtype (the previous chunk's copy of
            # it has finished reading the buffer).
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            c_smem[...] = carry.astype(md)
            plgpu.commit_smem()
            if save:
                plgpu.copy_smem_to_gmem(c_smem, saved[0].at[bi, hi, chunk_of(i), :, cols])
            return step(blocks, carry, c_smem, *scratch_refs)

        specs = [
            plgpu.BlockSpec(
                op.block,
                lambda i, op=op: op.index(chunk_of(i), j),
                transforms=(
                    mma_transforms(op.block[-1], op.array.dtype, interpret) if op.mma else ()
                ),
            )
            for op in operands
        ]
        start = pl.run_scoped(load_carry, carry_smem_type, plgpu.Barrier())
        chain = plgpu.emit_pipeline(
            body, grid=(n,), in_specs=specs, init_carry=start, max_concurrent_steps=2
        )
        final = chain(*(ref.at[bi, hi] for ref in ops_gmem))
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last saved carry's copy

        def store_carry(carry_smem):
            carry_smem[...] = final
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(carry_smem, final_gmem.at[bi, hi, :, cols])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(store_carry, carry_smem_type)

    out_type = [jax.ShapeDtypeStruct((b, h, dk, dv), f32)]
    if save:
        out_type.append(jax.ShapeDtypeStruct((b, h, n, dk, dv), md))
    scratch_types = [
        plgpu.SMEM((dk, tv), md, transforms=mma_transforms(tv, md, interpret)),  # the carry
        *(
            plgpu.SMEM(shape, md, transforms=mma_transforms(shape[-1], md, interpret))
            for shape in scratch
        ),
    ]
    return launch(
        kernel,
        out_type=tuple(out_type),
        grid=(b, h, dv // tv),
        grid_names=("b", "h", "j"),
        kernel_name=name,
        scratch_types=scratch_types,
        interpret=interpret,
    )(*(op.array for op in operands), carry0)


class Transposed(NamedTuple):
    """A shared-memory MMA operand ``[r, c]`` taken as its transpose ``[c, r]``."""

    ref: object


def mma_sum(*pairs, rows: int, columns: int, interpret: bool):
    """``Σ a @ b`` over ``pairs`` of shared-memory operands (``[rows, columns]``, either
    operand possibly :class:`Transposed`): warpgroup MMAs issued back to back into one fresh
    float32 accumulator, awaited once; returns it as a value.

    Compiled, a transposed operand is a transposed view of its buffer
    (:func:`~jax.experimental.pallas.mosaic_gpu.transpose_ref`: the MMA reads it in the other
    order, for 16-bit operands at no cost). The interpreter has no such views; there the
    operand is copied, transposed, into a scratch buffer first (same values)."""
    transposed = [x.ref for pair in pairs for x in pair if isinstance(x, Transposed)]

    def mma(copies):
        copies = list(copies)

        def operand(x):
            if not isinstance(x, Transposed):
                return x
            return copies.pop(0) if interpret else plgpu.transpose_ref(x.ref, (1, 0))

        operands = [(operand(a), operand(b)) for a, b in pairs]

        def run(acc):
            for a, b in operands:
                plgpu.wgmma(acc, a, b)
            return acc[...]  # waits for the MMAs

        return pl.run_scoped(run, plgpu.ACC((rows, columns), jnp.float32))

    if not (interpret and transposed):
        return mma(())

    def copy_transposed(*copies):
        for ref, copy in zip(transposed, copies, strict=True):
            copy[...] = ref[...].T
        plgpu.commit_smem()
        return mma(copies)

    scratch = [plgpu.SMEM(ref.shape[::-1], ref.dtype) for ref in transposed]
    return pl.run_scoped(copy_transposed, *scratch)


def delta_chain_forward(
    k,
    w,
    u,
    s0,
    decay=None,
    *,
    chunk: int,
    value_block: int,
    save: bool,
    interpret: bool,
    name="delta_chain_fwd",
):
    """The phased (gated) delta rule's forward chain, ``S ← Γ_C S + Kᵀ (U − W S)`` chunk by
    chunk (``Γ_C = 1`` without ``decay``).

    Args:
      k: ``K``, ``[B, H, N·C, K]``, in the matmul dtype.
      w: ``W = T (β ⊙ K)``, ``[B, H, N·C, K]``, in the matmul dtype.
      u: ``U = T (β ⊙ V)``, ``[B, H, N·C, V]``, in the matmul dtype.
      s0: the initial state ``[B, H, K, V]``, float32.
      decay: the gated rule's chunk decays (:func:`decay_rows`), or None.
      chunk: ``C``, the rows of a chunk.
      value_block: ``tv``, the state columns per CTA (divides ``V``).
      save: also return the state entering each chunk.
      interpret: run in Mosaic GPU's interpret mode (CPU).
      name: the kernel's name (in profiles).

    Returns:
      ``(S_final [B, H, K, V] float32, states [B, H, N, K, V])`` with the states in the matmul
      dtype, or ``(S_final,)`` without ``save``.
    """
    dk, tv = k.shape[-1], value_block
    c = chunk
    check_call(k.dtype, s0.dtype, s0.shape[-1], c, dk, tv)
    product = functools.partial(mma_sum, interpret=interpret)

    def step(blocks, s, s_smem, x_smem):
        k_ref, w_ref, u_ref, *decay_ref = blocks
        x = u_ref[...].astype(jnp.float32) - product((w_ref, s_smem), rows=c, columns=tv)
        x_smem[...] = x.astype(x_smem.dtype)
        plgpu.commit_smem()
        if decay_ref:
            s = decay_ref[0][0, 0] * s  # Γ_C S
        kt = Transposed(k_ref)
        return s + product((kt, x_smem), rows=dk, columns=tv)  # + Kᵀ (U − W S)

    operands = (
        Operand(k, (c, dk), lambda n, j: (n, 0)),
        Operand(w, (c, dk), lambda n, j: (n, 0)),
        Operand(u, (c, tv), lambda n, j: (n, j)),
        *_decay_operand(decay),
    )
    return _chain_kernel(
        step, operands, s0, [(c, tv)], chunks=k.shape[2] // c, tv=tv, save=save,
        reverse=False, interpret=interpret, name=name,
    )  # fmt: skip


def delta_chain_backward(
    p,
    k,
    q,
    w,
    do,
    g0,
    decay=None,
    *,
    value_block: int,
    save: bool,
    interpret: bool,
    name="delta_chain_bwd",
):
    """The phased (gated) delta rule's cotangent chain,
    ``G ← Γ_C G + Qᵀ Ō − Wᵀ (Pᵀ Ō + K G)``, from the last chunk to the first.

    Args:
      p: ``P = (Q Kᵀ) ⊙ M`` of every chunk, ``[B, H, N·C, C]``, in the matmul dtype.
      k, q, w: ``K``, ``Q`` and ``W``, ``[B, H, N·C, K]``, in the matmul dtype.
      do: the output cotangent ``Ō``, ``[B, H, N·C, V]``, in the matmul dtype.
      g0: the cotangent of the final state ``[B, H, K, V]``, float32.
      decay: the gated rule's chunk decays (:func:`decay_rows`), or None.
      value_block: ``tv`` (divides ``V``).
      save: also return ``gs[n]``, the cotangent of the state after chunk ``n``.
      interpret: run in Mosaic GPU's interpret mode (CPU).
      name: the kernel's name (in profiles).

    Returns:
      ``(∂L/∂S⁰ [B, H, K, V] float32, gs [B, H, N, K, V])`` with ``gs`` in the matmul dtype, or
      ``(∂L/∂S⁰,)`` without ``save``.
    """
    c, dk, tv = p.shape[-1], k.shape[-1], value_block
    check_call(k.dtype, g0.dtype, g0.shape[-1], c, dk, tv)
    product = functools.partial(mma_sum, interpret=interpret)
    t = Transposed

    def step(blocks, g, g_smem, du_smem):
        p_ref, k_ref, q_ref, w_ref, do_ref, *decay_ref = blocks
        du = product((t(p_ref), do_ref), (k_ref, g_smem), rows=c, columns=tv)  # Pᵀ Ō + K G
        du_smem[...] = (-du).astype(du_smem.dtype)  # −Ũ̄ (negation is exact)
        plgpu.commit_smem()
        if decay_ref:
            g = decay_ref[0][0, 0] * g  # Γ_C G
        # + Qᵀ Ō − Wᵀ Ũ̄ in one accumulator (one [K, tv] product in registers beside G).
        return g + product((t(q_ref), do_ref), (t(w_ref), du_smem), rows=dk, columns=tv)

    operands = (
        Operand(p, (c, c), lambda n, j: (n, 0)),
        Operand(k, (c, dk), lambda n, j: (n, 0)),
        Operand(q, (c, dk), lambda n, j: (n, 0)),
        Operand(w, (c, dk), lambda n, j: (n, 0)),
        Operand(do, (c, tv), lambda n, j: (n, j)),
        *_decay_operand(decay),
    )
    return _chain_kernel(
        step, operands, g0, [(c, tv)], chunks=k.shape[2] // c, tv=tv, save=save,
        reverse=True, interpret=interpret, name=name,
    )  # fmt: skip


def affine_smem_bytes(key: int, value_block: int, itemsize: int = 2) -> int:
    """Shared memory of :func:`affine_chain`: two chunks in flight of ``M [K, K]`` (matmul
    dtype) and ``B [K, tv]`` (float32), plus the carry ``[K, tv]``."""
    k, tv = key, value_block
    return 2 * (itemsize * k * k + 4 * k * tv) + itemsize * k * tv


def affine_chain(
    m, b, carry0, *, transpose: bool, value_block: int, save: bool, interpret: bool, name
):
    """The affine chain of ``PallasChain.AFFINE``, one MMA per chunk: forward
    ``S ← M_n S + B_n`` from the first chunk, or (``transpose``) the cotangent chain
    ``G ← M_nᵀ G + H_n`` from the last; ``M = Γ_C I − Kᵀ W`` and ``B = Kᵀ U`` or
    ``H = Qᵀ Ō − Wᵀ Pᵀ Ō`` come from :func:`fwjax.ops.pallas.mosaic_gpu_chunks.affine_maps`.

    Args:
      m: ``M`` of every chunk, ``[B, H, N, K, K]``, in the matmul dtype.
      b: ``B`` (or ``H``) of every chunk, ``[B, H, N, K, V]``, float32.
      carry0: the carry entering the first step, ``[B, H, K, V]``, float32.
      transpose: the cotangent chain (``Mᵀ``, from the last chunk).
      value_block: ``tv`` (divides ``V``).
      save: also return the carry entering each chunk (the state before chunk ``n``, or the
        cotangent of the state after it).
      interpret: run in Mosaic GPU's interpret mode (CPU).
      name: the kernel's name (in profiles).

    Returns:
      ``(final carry [B, H, K, V] float32, saved [B, H, N, K, V])`` with ``saved`` in the
      matmul dtype, or ``(final carry,)`` without ``save``.
    """
    _, _, n, dk, _ = m.shape
    tv, md = value_block, m.dtype
    check_call(md, carry0.dtype, carry0.shape[-1], MMA_TILE, dk, tv)
    needed = affine_smem_bytes(dk, tv, md.itemsize)
    if needed > SMEM_LIMIT:
        raise ValueError(
            f"the affine chain with key={dk}, value_block={tv} needs {needed} bytes of shared "
            f"memory per CTA, over {SMEM_LIMIT}"
        )

    def step(blocks, carry, c_smem):
        m_ref, b_ref = blocks
        m_op = Transposed(m_ref) if transpose else m_ref
        return mma_sum((m_op, c_smem), rows=dk, columns=tv, interpret=interpret) + b_ref[...]

    operands = (
        Operand(m, (None, dk, dk), lambda i, j: (i, 0, 0)),
        Operand(b, (None, dk, tv), lambda i, j: (i, 0, j)),
    )
    return _chain_kernel(
        step, operands, carry0, [], chunks=n, tv=tv, save=save, reverse=transpose,
        interpret=interpret, name=name,
    )  # fmt: skip


def check_call(md, state_dtype, v, c, dk, tv) -> None:
    """:func:`check_supported`, and ``tv`` dividing ``V``."""
    check_supported(md, state_dtype, c, dk, tv)
    if v % tv:
        raise ValueError(f"value_block={tv} must divide V={v}")
