"""GPU backend: the delta rule's forward state chain as a Mosaic GPU kernel (Hopper warpgroups).

``PallasBackend.MOSAIC_GPU`` runs the sequential kernel of the phased forward
(:mod:`fwjax.ops.pallas.phased`) here, written for Mosaic GPU: one CTA per
``(batch, head, value tile)`` walks the chunks with the state tile ``S [K, tv]`` in registers
(float32), chunk operands arriving by TMA into shared memory through
:func:`jax.experimental.pallas.mosaic_gpu.emit_pipeline` (two chunks in flight)::

    states[n] = S                     (bfloat16, shared memory → HBM by TMA)
    X = U_n − W_n S                   warpgroup MMA: W_n [C, K] @ S [K, tv], both in shared memory
    S ← S + K_nᵀ X                    warpgroup MMA: K_nᵀ [K, C] @ X [C, tv]

The other kernels of the call (phase 1, the outputs, the backward) are the Triton ones
(:mod:`fwjax.ops.pallas.triton_gpu`), whose lowering JAX 0.11 deprecates; this file is the
first of their Mosaic GPU replacements.

Constraints of the warpgroup MMA, checked by :func:`check_supported`: bfloat16 or float16
operands (``PallasPrecision.INPUT`` with such inputs), a float32 state, and ``C``, ``K`` and
``tv`` multiples of 64 (:func:`fwjax.ops.pallas.mosaic_gpu_tiling` pads to them).

Written so that the same kernel body runs in Pallas' Mosaic GPU interpret mode (the CPU tests)
and lowers for CUDA:

- ``K_nᵀ`` arrives pre-transposed, ``[B, H, N, K, C]`` (the interpreter has no transposed
  operand views, :func:`~jax.experimental.pallas.mosaic_gpu.transpose_ref`);
- each product goes into a fresh, zeroed accumulator and the state adds it in registers (the
  interpreter has no pre-initialised accumulators, ``pl.run_state``);
- the shared-memory tiling and swizzle that the MMA needs are applied only when compiling (the
  interpreter does not model them; the kernel's values are the same).

Compiled behaviour and speed are unverified here: the tests run the interpreter and lower the
kernel for CUDA (``jax.export``) without a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

MMA_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
MMA_TILE = 64  # rows of one warpgroup MMA; C, K and tv are multiples of it


def check_supported(matmul_dtype, state_dtype, chunk: int, key: int, value_block: int) -> None:
    """Raises ValueError unless the kernel supports these dtypes and sizes."""
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


def delta_chain_forward(
    kt, w, u, s0, *, value_block: int, save_states: bool, interpret: bool, name="delta_chain_fwd"
):
    """The phased delta rule's forward chain, ``S ← S + Kᵀ (U − W S)`` chunk by chunk.

    Args:
      kt: ``Kᵀ`` of every chunk, ``[B, H, N, K, C]``, in the matmul dtype.
      w: ``W = T (β ⊙ K)``, ``[B, H, N·C, K]``, in the matmul dtype.
      u: ``U = T (β ⊙ V)``, ``[B, H, N·C, V]``, in the matmul dtype.
      s0: the initial state ``[B, H, K, V]``, float32.
      value_block: ``tv``, the state columns per CTA (divides ``V``).
      save_states: also return the state entering each chunk.
      interpret: run in Mosaic GPU's interpret mode (CPU).
      name: the kernel's name (in profiles).

    Returns:
      ``(S_final [B, H, K, V] float32, states [B, H, N, K, V])`` with the states in the matmul
      dtype, or ``(S_final,)`` without ``save_states``.
    """
    b, h, n, dk, c = kt.shape
    dv, md, tv = u.shape[-1], kt.dtype, value_block
    check_supported(md, s0.dtype, c, dk, tv)
    if dv % tv:
        raise ValueError(f"value_block={tv} must divide V={dv}")
    rows_c = _mma_transforms(c, md, interpret)  # Kᵀ [K, C]
    rows_k = _mma_transforms(dk, md, interpret)  # W [C, K]
    rows_v = _mma_transforms(tv, md, interpret)  # U, X [C, tv]; S [K, tv]
    f32 = jnp.float32

    def kernel(kt_gmem, w_gmem, u_gmem, s0_gmem, *refs):
        *outs, s_smem, x_smem, carry_smem, barrier = refs
        final_gmem, states_gmem = outs if save_states else (outs[0], None)
        bi, hi, j = (jax.lax.axis_index(axis) for axis in ("b", "h", "j"))
        cols = pl.ds(j * tv, tv)
        plgpu.copy_gmem_to_smem(s0_gmem.at[bi, hi, :, cols], carry_smem, barrier)
        plgpu.barrier_wait(barrier)

        def step(indices, kt_ref, w_ref, u_ref, s):
            (i,) = indices
            # The state entering chunk i, in the matmul dtype: W S's operand, and the source
            # of its copy into ``states`` (the previous chunk's copy has finished reading it).
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            s_smem[...] = s.astype(md)
            plgpu.commit_smem()
            if save_states:
                plgpu.copy_smem_to_gmem(s_smem, states_gmem.at[bi, hi, i, :, cols])

            def w_s(acc):  # W S  [C, tv]
                plgpu.wgmma(acc, w_ref, s_smem)
                return acc[...]

            x = u_ref[...].astype(f32) - pl.run_scoped(w_s, plgpu.ACC((c, tv), f32))
            x_smem[...] = x.astype(md)
            plgpu.commit_smem()

            def kt_x(acc):  # Kᵀ X  [K, tv]
                plgpu.wgmma(acc, kt_ref, x_smem)
                return acc[...]

            return s + pl.run_scoped(kt_x, plgpu.ACC((dk, tv), f32))

        chain = plgpu.emit_pipeline(
            step,
            grid=(n,),
            in_specs=[
                plgpu.BlockSpec((None, dk, c), lambda i: (i, 0, 0), transforms=rows_c),
                plgpu.BlockSpec((c, dk), lambda i: (i, 0), transforms=rows_k),
                plgpu.BlockSpec((c, tv), lambda i: (i, j), transforms=rows_v),
            ],
            init_carry=carry_smem[...],
            max_concurrent_steps=2,
        )
        s = chain(kt_gmem.at[bi, hi], w_gmem.at[bi, hi], u_gmem.at[bi, hi])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        carry_smem[...] = s
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(carry_smem, final_gmem.at[bi, hi, :, cols])
        plgpu.wait_smem_to_gmem(0)

    out_type = [jax.ShapeDtypeStruct((b, h, dk, dv), f32)]
    if save_states:
        out_type.append(jax.ShapeDtypeStruct((b, h, n, dk, dv), md))
    return plgpu.kernel(
        kernel,
        out_type=tuple(out_type),
        grid=(b, h, dv // tv),
        grid_names=("b", "h", "j"),
        kernel_name=name,
        scratch_types=[
            plgpu.SMEM((dk, tv), md, transforms=rows_v),  # S in the matmul dtype
            plgpu.SMEM((c, tv), md, transforms=rows_v),  # X
            # The float32 state entering and leaving (tiled when compiled, so that its loads
            # and stores take the MMA accumulator's register layout).
            plgpu.SMEM((dk, tv), f32, transforms=_mma_transforms(tv, f32, interpret)),
            plgpu.Barrier(),
        ],
        interpret=_interpret_params() if interpret else None,
    )(kt, w, u, s0)
