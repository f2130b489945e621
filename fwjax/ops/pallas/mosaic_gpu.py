"""GPU backend: the (gated) delta rule's phased kernels as Mosaic GPU kernels (Hopper warpgroups).

``PallasBackend.MOSAIC_GPU`` runs three kernels of the phased schedule
(:mod:`fwjax.ops.pallas.phased`) here, written for Mosaic GPU. In the two sequential ones
(:func:`_chain_kernel`) one CTA per ``(batch, head, value tile)`` walks the chunks with its
carry tile ``[K, tv]`` in registers (float32), chunk operands arriving by TMA into shared
memory through :func:`jax.experimental.pallas.mosaic_gpu.emit_pipeline` (two chunks in
flight), the carry entering each chunk leaving by TMA in the matmul dtype. Forward
(:func:`delta_chain_forward`)::

    states[n] = S
    X = U_n − W_n S                   MMA: W_n [C, K] @ S [K, tv], both in shared memory
    S ← Γ_n S + K_nᵀ X                MMA: K_nᵀ [K, C] @ X [C, tv]

Backward, from the last chunk (:func:`delta_chain_backward`)::

    gs[n] = G
    Ũ̄ = P_nᵀ Ō_n + K_n G             two MMAs
    G ← Γ_n G + Q_nᵀ Ō_n − W_nᵀ Ũ̄    two MMAs

``Γ_n`` is the gated rule's chunk decay (1 for the delta rule), read in float32 from a row of
its own (:func:`decay_rows`).

Then every chunk's output at once, one CTA per ``(batch, head, chunk, value tile)``
(:func:`delta_chunk_output`)::

    O_n = Q_n S_n + P_n (U_n − W_n S_n)        three MMAs

The call's other kernels (phase 1's WY terms and the gradients, both parallel over chunks) are
the Triton ones (:mod:`fwjax.ops.pallas.triton_gpu`), whose lowering JAX 0.11 deprecates;
these are the first of their Mosaic GPU replacements. With ``state_segments`` the chains split
as in :func:`fwjax.ops.pallas.phased._chain` (the widened pass is the same kernel without
saves).

Constraints, checked by :func:`check_supported`: bfloat16 or float16 operands
(``PallasPrecision.INPUT`` with such inputs), a float32 state, ``C``, ``K`` and ``tv``
multiples of 64 (the warpgroup MMA's rows; :func:`fwjax.ops.pallas.mosaic_gpu_tiling` pads to
them), and kernels that fit Hopper's shared memory (:func:`smem_bytes`: with two chunks in
flight that means ``C = 64`` and ``K <= 128``). The tiling's default value tile keeps the
carry within 64 float32 registers per thread (``tv = 64`` at ``K = 128``).

Written so that the same kernel body runs in Pallas' Mosaic GPU interpret mode (the CPU tests)
and lowers for CUDA:

- transposed operands (``K_nᵀ``; ``P_nᵀ``, ``Q_nᵀ``, ``W_nᵀ``) arrive pre-transposed,
  ``[B, H, N, ·, C]``, by an XLA transpose (the interpreter has no transposed operand views,
  :func:`~jax.experimental.pallas.mosaic_gpu.transpose_ref`);
- each product goes into a fresh, zeroed accumulator and the state adds it in registers (the
  interpreter has no pre-initialised accumulators, ``pl.run_state``);
- the shared-memory tiling and swizzle that the MMA needs are applied only when compiling (the
  interpreter does not model them; the kernel's values are the same).

Compiled behaviour and speed are unverified here: the tests run the interpreter and lower the
kernels for CUDA (``jax.export``) without a GPU.
"""

from __future__ import annotations

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
    """Shared memory of the largest kernel here, the cotangent chain: two chunks in flight of
    ``Pᵀ [C, C]``, ``K [C, K]``, ``Qᵀ``, ``Wᵀ [K, C]``, ``Ō [C, tv]``, plus the carry
    ``[K, tv]`` and ``Ũ̄ [C, tv]`` (the float32 carry's buffer lives outside the pipeline's
    scope). The state chain and the output kernel need less."""
    c, k, tv = chunk, key, value_block
    in_flight = 2 * (c * c + 3 * c * k + c * tv)
    return itemsize * (in_flight + k * tv + c * tv)


# The JAX whose Mosaic GPU API (``plgpu.kernel`` with ``out_type``/``scratch_types``/
# ``kernel_name``, the interpreter) these kernels are written and tested against.
MIN_JAX = (0, 10)


def check_supported(matmul_dtype, state_dtype, chunk: int, key: int, value_block: int) -> None:
    """Raises ValueError unless the kernel supports this JAX, these dtypes and sizes."""
    version = tuple(int(part) for part in jax.__version__.split(".")[:2])
    if version < MIN_JAX:
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


def _interpret_params():
    # JAX 0.10 exports Mosaic GPU's interpreter parameters only from its private module.
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


def _mma_transforms(columns: int, dtype, interpret: bool) -> tuple:
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


def _chain_kernel(step, operands, carry0, scratch, *, tv, save, reverse, interpret, name):
    """A sequential chain over the chunks, one CTA per ``(batch, head, value tile)``.

    The carry ``C [K, tv]`` (float32) stays in registers. At chunk ``n`` (descending when
    ``reverse``) the kernel writes ``C`` in the matmul dtype to shared memory (the step's MMA
    operand, and with ``save`` the source of its TMA copy to ``saved[n]``), then
    ``C ← step(blocks, C, c_smem, *scratch_refs)`` with the chunk's operand blocks in shared
    memory (TMA, two chunks in flight).

    Args:
      step: the chain's step (see above); returns the new carry.
      operands: :class:`Operand` tuples, the first one per chunk (``[B, H, N, ·, ·]``) and in
        the matmul dtype.
      carry0: the carry entering the first step, ``[B, H, K, V]`` float32.
      scratch: shapes ``[rows, columns]`` and dtypes of the step's shared-memory scratch.
      tv: the value tile (divides ``V``).
      save: also return the carry entering each chunk ``[B, H, N, K, V]``.
      reverse: walk the chunks from last to first.
      interpret: Mosaic GPU's interpret mode.
      name: the kernel's name.

    Returns:
      ``(final carry,)``, or ``(final carry, saved)`` with ``save``.
    """
    b, h, dk, dv = carry0.shape
    n = operands[0].array.shape[2]  # the first operand is per chunk, [B, H, N, ·, ·]
    md = operands[0].array.dtype
    f32 = jnp.float32
    chunk_of = (lambda i: n - 1 - i) if reverse else (lambda i: i)

    # The float32 carry entering and leaving passes through shared memory (tiled when compiled,
    # so that its loads and stores take the MMA accumulator's register layout), in scopes of
    # their own: the buffer does not sit beside the pipeline's.
    carry_smem_type = plgpu.SMEM((dk, tv), f32, transforms=_mma_transforms(tv, f32, interpret))

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
                transforms=_mma_transforms(op.block[-1], md, interpret) if op.mma else (),
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
        plgpu.SMEM((dk, tv), md, transforms=_mma_transforms(tv, md, interpret)),  # the carry
        *(
            plgpu.SMEM(shape, md, transforms=_mma_transforms(shape[-1], md, interpret))
            for shape in scratch
        ),
    ]
    return plgpu.kernel(
        kernel,
        out_type=tuple(out_type),
        grid=(b, h, dv // tv),
        grid_names=("b", "h", "j"),
        kernel_name=name,
        scratch_types=scratch_types,
        interpret=_interpret_params() if interpret else None,
    )(*(op.array for op in operands), carry0)


def _product(*pairs, rows: int, columns: int):
    """``Σ a @ b`` over ``pairs`` of shared-memory operands (``[rows, columns]``): warpgroup
    MMAs issued back to back into one fresh float32 accumulator, awaited once; returns it as a
    value."""

    def mma(acc):
        for a, b in pairs:
            plgpu.wgmma(acc, a, b)
        return acc[...]  # waits for the MMAs

    return pl.run_scoped(mma, plgpu.ACC((rows, columns), jnp.float32))


def delta_chain_forward(
    kt,
    w,
    u,
    s0,
    decay=None,
    *,
    value_block: int,
    save: bool,
    interpret: bool,
    name="delta_chain_fwd",
):
    """The phased (gated) delta rule's forward chain, ``S ← Γ_C S + Kᵀ (U − W S)`` chunk by
    chunk (``Γ_C = 1`` without ``decay``).

    Args:
      kt: ``Kᵀ`` of every chunk, ``[B, H, N, K, C]``, in the matmul dtype.
      w: ``W = T (β ⊙ K)``, ``[B, H, N·C, K]``, in the matmul dtype.
      u: ``U = T (β ⊙ V)``, ``[B, H, N·C, V]``, in the matmul dtype.
      s0: the initial state ``[B, H, K, V]``, float32.
      decay: the gated rule's chunk decays (:func:`decay_rows`), or None.
      value_block: ``tv``, the state columns per CTA (divides ``V``).
      save: also return the state entering each chunk.
      interpret: run in Mosaic GPU's interpret mode (CPU).
      name: the kernel's name (in profiles).

    Returns:
      ``(S_final [B, H, K, V] float32, states [B, H, N, K, V])`` with the states in the matmul
      dtype, or ``(S_final,)`` without ``save``.
    """
    _, _, _, dk, c = kt.shape
    tv = value_block
    _check_call(kt.dtype, s0.dtype, s0.shape[-1], c, dk, tv)

    def step(blocks, s, s_smem, x_smem):
        kt_ref, w_ref, u_ref, *decay_ref = blocks
        x = u_ref[...].astype(jnp.float32) - _product((w_ref, s_smem), rows=c, columns=tv)
        x_smem[...] = x.astype(x_smem.dtype)
        plgpu.commit_smem()
        if decay_ref:
            s = decay_ref[0][0, 0] * s  # Γ_C S
        return s + _product((kt_ref, x_smem), rows=dk, columns=tv)  # + Kᵀ (U − W S)

    operands = (
        Operand(kt, (None, dk, c), lambda n, j: (n, 0, 0)),
        Operand(w, (c, dk), lambda n, j: (n, 0)),
        Operand(u, (c, tv), lambda n, j: (n, j)),
        *_decay_operand(decay),
    )
    return _chain_kernel(
        step, operands, s0, [(c, tv)], tv=tv, save=save, reverse=False,
        interpret=interpret, name=name,
    )  # fmt: skip


def delta_chain_backward(
    pt,
    k,
    qt,
    wt,
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
      pt: ``Pᵀ`` of every chunk (``P = (Q Kᵀ) ⊙ M``), ``[B, H, N, C, C]``, matmul dtype.
      k: ``K``, ``[B, H, N·C, K]``, in the matmul dtype.
      qt: ``Qᵀ`` of every chunk, ``[B, H, N, K, C]``, in the matmul dtype.
      wt: ``Wᵀ`` of every chunk, ``[B, H, N, K, C]``, in the matmul dtype.
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
    _, _, _, dk, c = qt.shape
    tv = value_block
    _check_call(k.dtype, g0.dtype, g0.shape[-1], c, dk, tv)

    def step(blocks, g, g_smem, du_smem):
        pt_ref, k_ref, qt_ref, wt_ref, do_ref, *decay_ref = blocks
        du = _product((pt_ref, do_ref), (k_ref, g_smem), rows=c, columns=tv)  # Pᵀ Ō + K G
        du_smem[...] = du.astype(du_smem.dtype)
        plgpu.commit_smem()
        q_do = _product((qt_ref, do_ref), rows=dk, columns=tv)
        if decay_ref:
            g = decay_ref[0][0, 0] * g  # Γ_C G
        return g + q_do - _product((wt_ref, du_smem), rows=dk, columns=tv)

    operands = (
        Operand(pt, (None, c, c), lambda n, j: (n, 0, 0)),
        Operand(k, (c, dk), lambda n, j: (n, 0)),
        Operand(qt, (None, dk, c), lambda n, j: (n, 0, 0)),
        Operand(wt, (None, dk, c), lambda n, j: (n, 0, 0)),
        Operand(do, (c, tv), lambda n, j: (n, j)),
        *_decay_operand(decay),
    )
    return _chain_kernel(
        step, operands, g0, [(c, tv)], tv=tv, save=save, reverse=True,
        interpret=interpret, name=name,
    )  # fmt: skip


def delta_chunk_output(q, w, u, p, states, *, value_block: int, interpret: bool, name="delta_out"):
    """Every chunk's output from the state entering it, ``O = Q S + P (U − W S)``, one CTA per
    ``(batch, head, chunk, value tile)``, all in parallel.

    Args:
      q, w: ``Q`` and ``W``, ``[B, H, N·C, K]``, in the matmul dtype.
      u: ``U``, ``[B, H, N·C, V]``, in the matmul dtype.
      p: ``P = (Q Kᵀ) ⊙ M``, ``[B, H, N·C, C]``, in the matmul dtype.
      states: the state entering each chunk, ``[B, H, N, K, V]``, in the matmul dtype.
      value_block: ``tv`` (divides ``V``).
      interpret: run in Mosaic GPU's interpret mode (CPU).
      name: the kernel's name (in profiles).

    Returns:
      ``O [B, H, N·C, V]`` in the matmul dtype.
    """
    b, h, n, dk, dv = states.shape
    c, md, tv = p.shape[-1], q.dtype, value_block
    _check_call(md, jnp.float32, dv, c, dk, tv)
    blocks = ((c, dk), (c, dk), (c, tv), (c, c), (dk, tv))  # Q, W, U, P, S

    def kernel(q_gmem, w_gmem, u_gmem, p_gmem, s_gmem, o_gmem, *scratch):
        q_smem, w_smem, u_smem, p_smem, s_smem, x_smem, o_smem, barrier = scratch
        bi, hi, ni, j = (jax.lax.axis_index(axis) for axis in ("b", "h", "n", "j"))
        rows, cols = pl.ds(ni * c, c), pl.ds(j * tv, tv)
        sources = (
            q_gmem.at[bi, hi, rows],
            w_gmem.at[bi, hi, rows],
            u_gmem.at[bi, hi, rows, cols],
            p_gmem.at[bi, hi, rows],
            s_gmem.at[bi, hi, ni, :, cols],
        )
        for source, target in zip(sources, (q_smem, w_smem, u_smem, p_smem, s_smem), strict=True):
            plgpu.copy_gmem_to_smem(source, target, barrier)
        plgpu.barrier_wait(barrier)
        x = u_smem[...].astype(jnp.float32) - _product((w_smem, s_smem), rows=c, columns=tv)
        x_smem[...] = x.astype(md)
        plgpu.commit_smem()
        o = _product((q_smem, s_smem), (p_smem, x_smem), rows=c, columns=tv)  # Q S + P X
        o_smem[...] = o.astype(md)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[bi, hi, rows, cols])
        plgpu.wait_smem_to_gmem(0)

    smem = lambda shape: plgpu.SMEM(shape, md, transforms=_mma_transforms(shape[-1], md, interpret))
    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct(u.shape, md),
        grid=(b, h, n, dv // tv),
        grid_names=("b", "h", "n", "j"),
        kernel_name=name,
        scratch_types=[
            *(smem(shape) for shape in blocks),
            smem((c, tv)),  # X
            smem((c, tv)),  # O
            plgpu.Barrier(num_arrivals=len(blocks)),
        ],
        interpret=_interpret_params() if interpret else None,
    )(q, w, u, p, states)


def _check_call(md, state_dtype, v, c, dk, tv) -> None:
    """:func:`check_supported`, and ``tv`` dividing ``V``."""
    check_supported(md, state_dtype, c, dk, tv)
    if v % tv:
        raise ValueError(f"value_block={tv} must divide V={v}")
