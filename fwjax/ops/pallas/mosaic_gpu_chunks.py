"""GPU backend: the Mosaic GPU kernels of the phased (gated) delta rule that run parallel over
chunks (:mod:`fwjax.ops.pallas.mosaic_gpu` holds the sequential chains and the shared pieces).

Each has one CTA per ``(batch, head, chunk)`` (and value tile, for the outputs and the affine
maps), loads its chunk's blocks by TMA into shared memory, multiplies with warpgroup MMAs from
there (:func:`fwjax.ops.pallas.mosaic_gpu.mma_sum`) and writes its results by TMA:

- :func:`delta_wy`, phase 1: ``W``, ``U``, ``P`` (and the gated rule's ``Q'``, ``K'``), the
  triangular inverse by forward substitution in registers;
- :func:`delta_chunk_output`: ``O = Q S + P (U − W S)`` from the state entering the chunk;
- :func:`delta_chunk_gradients`: the operands' cotangents from the state entering the chunk
  and the cotangent of the state after it;
- :func:`affine_maps`: ``PallasChain.AFFINE``'s per-chunk maps ``M``, and ``B`` or ``H``.

``delta_wy`` and ``delta_chunk_gradients`` hold the whole value dimension in one CTA, which
takes ``C = 64`` with ``K, V <= 128`` (:func:`wy_supported`, :func:`gradients_supported`);
beyond it :mod:`fwjax.ops.pallas.phased` runs their Triton versions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from fwjax.ops.pallas.mosaic_gpu import (
    CARRY_ELEMENTS,
    MMA_TILE,
    SMEM_LIMIT,
    Transposed,
    check_call,
    check_supported,
    launch,
    mma_sum,
    mma_transforms,
)


def _store(out, value, dtype, interpret: bool) -> None:
    """Writes ``value`` (registers) in ``dtype`` to the block ``out`` in HBM by TMA, through a
    scoped shared-memory buffer (tiled like an MMA operand when compiling, for a 2-D block),
    free again when this returns."""

    def store(block):
        block[...] = value.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(block, out)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the buffer has been read

    shape = out.shape
    tiles = mma_transforms(shape[-1], dtype, interpret) if len(shape) == 2 else ()
    pl.run_scoped(store, plgpu.SMEM(shape, dtype, transforms=tiles))


def wy_supported(chunk: int, key: int, value: int) -> bool:
    """Whether :func:`delta_wy` takes these sizes: ``C = 64`` (the inverse's ``[C, C]``
    float32 carry, ``Aᵀ`` and masks in registers) and ``U [C, V]``, ``W [C, K]`` in float32
    within one warpgroup's registers (``K, V <= 128``)."""
    return chunk <= MMA_TILE and chunk * max(key, value) <= CARRY_ELEMENTS


def _wgmma_layout(x, interpret: bool):
    """``x`` (an iota) in the MMA accumulator's register layout when compiling (Mosaic GPU
    cannot infer it); the interpreter has no layouts."""
    return x if interpret else plgpu.layout_cast(x, plgpu.Layout.WGMMA)


def _vector(ref, axis: int, interpret: bool):
    """A ``[C]`` vector from shared memory, laid out to broadcast along ``axis`` of an
    accumulator-shaped value (``axis`` 1: one value per row; 0: one per column)."""
    if interpret:
        return ref[...]
    return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(axis))


def delta_wy(q, k, v, beta, g=None, *, chunk: int, interpret: bool, name="delta_wy"):
    """Phase 1 of the phased (gated) delta rule, every chunk at once, one CTA per
    ``(batch, head, chunk)`` (:func:`fwjax.ops.pallas.chunk_math.wy_chunk`)::

        A = tril(diag(β) K Kᵀ ⊙ D, −1)        MMA K @ Kᵀ, masks in registers
        T = (I + A)⁻¹                          forward substitution, C − 1 row steps
        W = T diag(βΓ) K,   U = T diag(β) V    three MMAs each (split operands)
        P = (Q Kᵀ) ⊙ D                         MMA Q @ Kᵀ

    ``D_ij = exp(g_i − g_j)`` on ``j ≤ i`` and ``Γ_i = exp(g_i)`` with ``g`` the cumulative
    ``log α`` from each chunk's start (the gated rule); without ``g``, ``D`` is the causal mask
    and ``Γ = 1``. ``T``, ``diag(βΓ) K`` and ``diag(β) V`` are float32 values; each enters its
    MMA split into a high and a low part in the matmul dtype (``x = hi + lo``), and the
    products ``hi·hi + lo·hi + hi·lo`` keep about 16 bits of the float32 factors (one
    matmul-dtype rounding of ``T`` would cost bfloat16's 8, as in flash-linear-attention, whose
    triangular solve returns the inputs' dtype). The inverse works on ``Aᵀ`` (its column ``i``
    is row ``i`` of ``A``, a per-row vector), with masks and reductions in registers:
    ``X_i = e_i − A[i, :] X``.

    Args:
      q, k: ``[B, H, N·C, K]``, in the matmul dtype.
      v: ``[B, H, N·C, V]``, in the matmul dtype.
      beta: ``β``, ``[B, H, N·C]``, float32.
      g: the gated rule's cumulative ``log α`` within each chunk, ``[B, H, N·C]``, float32,
        or None.
      chunk: ``C``.
      interpret: run in Mosaic GPU's interpret mode (CPU).
      name: the kernel's name (in profiles).

    Returns:
      ``(W, U, P)``, or with ``g`` ``(Q', K', W, U, P)`` with ``Q' = diag(Γ) Q`` and
      ``K' = diag(Γ_C / Γ) K``; ``[B, H, N·C, ·]`` in the matmul dtype.
    """
    b, h, t, dk = k.shape
    c, dv, md, f32 = chunk, v.shape[-1], k.dtype, jnp.float32
    gated = g is not None
    check_supported(md, f32, c, dk, MMA_TILE)
    if dv % MMA_TILE or not wy_supported(c, dk, dv):
        raise ValueError(
            f"delta_wy takes chunk=64 with key, value <= 128 (multiples of 64), got "
            f"chunk={c}, key={dk}, value={dv}"
        )
    n_in, n_out = (5, 5) if gated else (4, 3)

    def kernel(*refs):
        gmem, outs, scratch = refs[:n_in], refs[n_in : n_in + n_out], refs[n_in + n_out :]
        q_s, k_s, v_s, beta_s, *g_s = scratch[:n_in]
        t_s, bk_s, bv_s, barrier = scratch[n_in:]
        bi, hi, ni = (jax.lax.axis_index(axis) for axis in ("b", "h", "n"))
        rows = pl.ds(ni * c, c)

        def split(ref, x):  # x = ref[0] + ref[1], a high and a low part in the matmul dtype
            high = x.astype(md)
            ref[0] = high
            ref[1] = (x - high.astype(f32)).astype(md)

        for ref, target in zip(gmem, scratch[:n_in], strict=True):
            plgpu.copy_gmem_to_smem(ref.at[bi, hi, rows], target, barrier)
        plgpu.barrier_wait(barrier)
        product = functools.partial(mma_sum, interpret=interpret)
        i_rows = _wgmma_layout(jax.lax.broadcasted_iota(jnp.int32, (c, c), 0), interpret)
        i_cols = _wgmma_layout(jax.lax.broadcasted_iota(jnp.int32, (c, c), 1), interpret)
        by_row = lambda x, width: jax.lax.broadcast_in_dim(x, (c, width), [0])
        by_col = lambda x: jax.lax.broadcast_in_dim(x, (c, c), [1])

        if gated:
            g_row = _vector(g_s[0], 1, interpret)
            # g_i − g_j at [i, j]
            g_diff = lambda: by_row(g_row, c) - by_col(_vector(g_s[0], 0, interpret))

        # Aᵀ[j, i] = β_i (K Kᵀ)_ij D_ij on i > j (K Kᵀ is symmetric).
        a_t = by_col(_vector(beta_s, 0, interpret)) * product(
            (k_s, Transposed(k_s)), rows=c, columns=c
        )
        if gated:
            a_t = a_t * jnp.exp(jnp.where(i_cols > i_rows, -g_diff(), 0.0))  # D_ij at [j, i]
        a_t = jnp.where(i_cols > i_rows, a_t, 0.0)

        # T = (I + A)⁻¹, row i = e_i − A[i, :] T (rows above i are final).
        def substitute(i, x):
            a_i = jnp.sum(jnp.where(i_cols == i, a_t, 0.0), axis=1)  # A[i, j] at row j
            a_i_x = jnp.sum(by_row(a_i, c) * x, axis=0)  # Σ_j A[i, j] X[j, :], per column
            e_i = jnp.where(i_cols == i, 1.0, 0.0)
            return jnp.where(i_rows == i, e_i - by_col(a_i_x), x)

        eye = jnp.where(i_rows == i_cols, 1.0, 0.0)
        split(t_s, jax.lax.fori_loop(1, c, substitute, eye))
        beta_rows = _vector(beta_s, 1, interpret)  # β_i on row i
        if gated:
            gamma = jnp.exp(g_row)
        beta_k = beta_rows * gamma if gated else beta_rows  # βΓ
        split(bk_s, by_row(beta_k, dk) * k_s[...].astype(f32))
        split(bv_s, by_row(beta_rows, dv) * v_s[...].astype(f32))
        plgpu.commit_smem()

        def split_product(x, y, columns):  # x y from x = x₀ + x₁, y = y₀ + y₁ (x₁ y₁ dropped)
            pairs = ((x.at[0], y.at[0]), (x.at[1], y.at[0]), (x.at[0], y.at[1]))
            return product(*pairs, rows=c, columns=columns)

        def emit(out, value):  # one result in registers at a time
            _store(out.at[bi, hi, rows], value, md, interpret)

        *decayed_out, w_out, u_out, p_out = outs
        emit(w_out, split_product(t_s, bk_s, dk))  # W
        emit(u_out, split_product(t_s, bv_s, dv))  # U
        scores = product((q_s, Transposed(k_s)), rows=c, columns=c)  # Q Kᵀ
        if gated:
            scores = scores * jnp.exp(jnp.where(i_rows >= i_cols, g_diff(), 0.0))  # ⊙ D
        emit(p_out, jnp.where(i_rows >= i_cols, scores, 0.0))  # P
        if gated:
            g_last = g_s[0][c - 1]
            emit(decayed_out[0], by_row(gamma, dk) * q_s[...].astype(f32))  # diag(Γ) Q
            k_scale = by_row(jnp.exp(g_last - g_row), dk)
            emit(decayed_out[1], k_scale * k_s[...].astype(f32))  # diag(Γ_C / Γ) K
        plgpu.wait_smem_to_gmem(0)

    smem = lambda shape: plgpu.SMEM(shape, md, transforms=mma_transforms(shape[-1], md, interpret))
    widths = (dk, dk, dk, dv, c) if gated else (dk, dv, c)
    inputs = [smem((c, dk)), smem((c, dk)), smem((c, dv)), plgpu.SMEM((c,), f32)]
    if gated:
        inputs.append(plgpu.SMEM((c,), f32))
    return launch(
        kernel,
        out_type=tuple(jax.ShapeDtypeStruct((b, h, t, width), md) for width in widths),
        grid=(b, h, t // c),
        grid_names=("b", "h", "n"),
        kernel_name=name,
        scratch_types=[
            *inputs,
            smem((2, c, c)),  # T, split in two
            smem((2, c, dk)),  # diag(βΓ) K
            smem((2, c, dv)),  # diag(β) V
            plgpu.Barrier(num_arrivals=len(inputs)),
        ],
        # The inverse's column sums reduce across warps through this scratch: 8 KiB holds a
        # [64, 64] float32 value at once (the default 2 KiB takes four rounds of barriers).
        compiler_params=plgpu.CompilerParams(reduction_scratch_bytes=4 * c * c),
        interpret=interpret,
    )(q, k, v, beta, *(() if g is None else (g,)))


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
    check_call(md, jnp.float32, dv, c, dk, tv)
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
        product = functools.partial(mma_sum, rows=c, columns=tv, interpret=interpret)
        x = u_smem[...].astype(jnp.float32) - product((w_smem, s_smem))
        x_smem[...] = x.astype(md)
        plgpu.commit_smem()
        o = product((q_smem, s_smem), (p_smem, x_smem))
        o_smem[...] = o.astype(md)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[bi, hi, rows, cols])
        plgpu.wait_smem_to_gmem(0)

    smem = lambda shape: plgpu.SMEM(shape, md, transforms=mma_transforms(shape[-1], md, interpret))
    return launch(
        kernel,
        out_type=jax.ShapeDtypeStruct(u.shape, md),
        # The chunks last, as CUDA's x (the only axis not capped at 65535), the batch as y
        # and the heads' value tiles as z (mosaic_gpu.cuda_grid): the limits then bound B and
        # H·V/tv, as they do in the 3-D grids, not B·H.
        grid=(h, dv // tv, b, n),
        grid_names=("h", "j", "b", "n"),
        kernel_name=name,
        scratch_types=[
            *(smem(shape) for shape in blocks),
            smem((c, tv)),  # X
            smem((c, tv)),  # O
            plgpu.Barrier(num_arrivals=len(blocks)),
        ],
        interpret=interpret,
    )(q, w, u, p, states)


def gradients_smem_bytes(chunk: int, key: int, value: int, itemsize: int = 2) -> int:
    """Shared memory of :func:`delta_chunk_gradients`: one chunk's ``K, W [C, K]``,
    ``U, Ō [C, V]``, ``P [C, C]``, ``S, G [K, V]``, one float32 output block at a time and
    the decay's row sums ``[K]``."""
    c, k, v = chunk, key, value
    inputs = 2 * c * k + 2 * c * v + c * c + 2 * k * v
    return itemsize * inputs + 4 * (c * max(c, k, v) + k)


def gradients_supported(chunk: int, key: int, value: int, itemsize: int = 2) -> bool:
    """Whether :func:`delta_chunk_gradients` takes these sizes: ``C = 64`` and its float32
    products ``[C, max(K, V)]`` within the registers of one warpgroup (``K, V <= 128``), and
    its blocks within Hopper's shared memory."""
    fits_registers = chunk <= MMA_TILE and chunk * max(key, value) <= CARRY_ELEMENTS
    return fits_registers and gradients_smem_bytes(chunk, key, value, itemsize) <= SMEM_LIMIT


def delta_chunk_gradients(k, w, u, p, states, gs, do, *, decay: bool, interpret: bool,
                          name="delta_grads"):  # fmt: skip
    """Every chunk's operand cotangents at once (the phased backward's gradient kernel,
    :func:`fwjax.ops.pallas.chunk_math.chunk_gradients`), one CTA per
    ``(batch, head, chunk)`` over the whole value dimension (no partial sums)::

        Ũ = U − W S              P̄ = Ō Ũᵀ (the causal mask is the caller's)
        Q̄ = Ō Sᵀ                 Ũ̄ = Pᵀ Ō + K G
        K̄ = Ũ Gᵀ                 W̄ = −Ũ̄ Sᵀ

    with ``S`` the state entering the chunk and ``G`` the cotangent of the state after it;
    ``Ũ`` and ``Ũ̄`` enter the later products in the matmul dtype (as in the XLA form). The
    gated rule also needs ``Γ̄_C = Σ S ⊙ G``: returned as the row sums of ``S ⊙ G``. (``Q``
    enters no cotangent.)

    Args:
      k, w: ``K`` and ``W``, ``[B, H, N·C, K]``, in the matmul dtype.
      u: ``U``, ``[B, H, N·C, V]``, in the matmul dtype.
      p: ``P = (Q Kᵀ) ⊙ M``, ``[B, H, N·C, C]``, in the matmul dtype.
      states: the state entering each chunk, ``[B, H, N, K, V]``, in the matmul dtype.
      gs: the cotangent of the state after each chunk, ``[B, H, N, K, V]``, matmul dtype.
      do: the output cotangent ``Ō``, ``[B, H, N·C, V]``, in the matmul dtype.
      decay: also return the row sums of ``S ⊙ G`` (the gated rule).
      interpret: run in Mosaic GPU's interpret mode (CPU).
      name: the kernel's name (in profiles).

    Returns:
      ``(Q̄, K̄, W̄ [B, H, N·C, K], Ũ̄ [B, H, N·C, V], P̄ [B, H, N·C, C])`` in float32 (``P̄``
      unmasked), and with ``decay`` the row sums ``[B, H, N, K]`` (float32) whose sum over
      ``K`` is each chunk's ``Γ̄_C``.
    """
    b, h, n, dk, dv = states.shape
    c, md, f32 = p.shape[-1], k.dtype, jnp.float32
    check_supported(md, f32, c, dk, MMA_TILE)
    if dv % MMA_TILE or not gradients_supported(c, dk, dv, md.itemsize):
        raise ValueError(
            f"delta_chunk_gradients takes chunk=64 with key, value <= 128 (multiples of 64), "
            f"got chunk={c}, key={dk}, value={dv}"
        )
    inputs = ((c, dk), (c, dk), (c, dv), (c, c), (dk, dv), (dk, dv), (c, dv))

    def kernel(*refs):
        gmem, outs, scratch = refs[:7], refs[7 : 12 + decay], refs[12 + decay :]
        *smem, barrier = scratch
        k_s, w_s, u_s, p_s, s_s, g_s, do_s = smem
        bi, hi, ni = (jax.lax.axis_index(axis) for axis in ("b", "h", "n"))
        rows = pl.ds(ni * c, c)
        for i, (ref, target) in enumerate(zip(gmem, smem, strict=True)):
            block = ni if i in (4, 5) else rows  # states and gs: [B, H, N, K, V]
            plgpu.copy_gmem_to_smem(ref.at[bi, hi, block], target, barrier)
        plgpu.barrier_wait(barrier)
        product = functools.partial(mma_sum, interpret=interpret)
        t = Transposed

        def emit(out, value):
            _store(out.at[bi, hi, rows], value, f32, interpret)

        dq_out, dk_out, dw_out, du_out, dp_out, *decay_out = outs
        # Ũ = U − W S, in U's buffer from here on.
        u_tilde = u_s[...].astype(f32) - product((w_s, s_s), rows=c, columns=dv)
        u_s[...] = u_tilde.astype(md)
        plgpu.commit_smem()
        emit(dp_out, product((do_s, t(u_s)), rows=c, columns=c))  # P̄ = Ō Ũᵀ
        emit(dq_out, product((do_s, t(s_s)), rows=c, columns=dk))  # Q̄ = Ō Sᵀ
        du = product((t(p_s), do_s), (k_s, g_s), rows=c, columns=dv)  # Ũ̄ = Pᵀ Ō + K G
        emit(du_out, du)
        do_s[...] = du.astype(md)  # Ō is spent: its buffer holds Ũ̄ from here on
        plgpu.commit_smem()
        emit(dk_out, product((u_s, t(g_s)), rows=c, columns=dk))  # K̄ = Ũ Gᵀ
        emit(dw_out, -product((do_s, t(s_s)), rows=c, columns=dk))  # W̄ = −Ũ̄ Sᵀ
        if decay:  # the row sums of S ⊙ G
            row_sums = jnp.sum(s_s[...].astype(f32) * g_s[...].astype(f32), axis=1)
            _store(decay_out[0].at[bi, hi, ni], row_sums, f32, interpret)
        plgpu.wait_smem_to_gmem(0)

    seq = lambda width: jax.ShapeDtypeStruct((b, h, n * c, width), f32)
    out_type = [seq(dk), seq(dk), seq(dk), seq(dv), seq(c)]
    if decay:
        out_type.append(jax.ShapeDtypeStruct((b, h, n, dk), f32))
    smem = lambda shape: plgpu.SMEM(shape, md, transforms=mma_transforms(shape[-1], md, interpret))
    return launch(
        kernel,
        out_type=tuple(out_type),
        grid=(b, h, n),
        grid_names=("b", "h", "n"),
        kernel_name=name,
        scratch_types=[
            *(smem(shape) for shape in inputs),
            plgpu.Barrier(num_arrivals=len(inputs)),
        ],
        interpret=interpret,
    )(k, w, u, p, states, gs, do)


def affine_maps(k, w, decay=None, *, chunk: int, u=None, q=None, p=None, do=None,
                interpret: bool, name):  # fmt: skip
    """Every chunk's affine map of ``PallasChain.AFFINE``, one CTA per
    ``(batch, head, value tile of 64, chunk)``::

        M = Γ_C I − Kᵀ W                       (written by each chunk's first value tile)
        B = Kᵀ U                               forward (``u``), or
        H = Qᵀ Ō − Wᵀ (Pᵀ Ō)                   backward (``q``, ``p``, ``do``)

    for :func:`fwjax.ops.pallas.mosaic_gpu.affine_chain` (``S ← M S + B``, ``G ← Mᵀ G + H``).
    ``Pᵀ Ō`` enters its product in the matmul dtype (as in
    :func:`fwjax.ops.pallas.chunk_math.cotangent_inputs`).

    Args:
      k, w: ``K`` and ``W``, ``[B, H, N·C, K]``, in the matmul dtype.
      decay: the gated rule's chunk decays as rows
        (:func:`fwjax.ops.pallas.mosaic_gpu.decay_rows`), or None (``Γ_C = 1``).
      chunk: ``C``.
      u: ``U`` ``[B, H, N·C, V]`` (the forward map), or None.
      q, p, do: ``Q [B, H, N·C, K]``, ``P [B, H, N·C, C]`` and ``Ō [B, H, N·C, V]`` (the
        backward map), or None.
      interpret: run in Mosaic GPU's interpret mode (CPU).
      name: the kernel's name (in profiles).

    Returns:
      ``(M [B, H, N, K, K]`` in the matmul dtype, ``B`` or ``H [B, H, N, K, V]`` float32).
    """
    backward = u is None
    b, h, t, dk = k.shape
    c, n, md, f32, tv = chunk, t // chunk, k.dtype, jnp.float32, MMA_TILE
    dv = (do if backward else u).shape[-1]
    check_call(md, f32, dv, c, dk, tv)
    # (array, block, its place: the chunk's rows, their value tile, or the chunk's row) of
    # each input, in call order.
    inputs = [(k, (c, dk), "rows"), (w, (c, dk), "rows")]
    if backward:
        inputs += [(q, (c, dk), "rows"), (p, (c, c), "rows"), (do, (c, tv), "tile")]
    else:
        inputs.append((u, (c, tv), "tile"))
    if decay is not None:
        inputs.append((decay, decay.shape[-2:], "chunk"))
    n_in = len(inputs)

    def kernel(*refs):
        gmem, (m_out, x_out) = refs[:n_in], refs[n_in : n_in + 2]
        *smem, barrier = refs[n_in + 2 :]
        bi, hi, j, ni = (jax.lax.axis_index(axis) for axis in ("b", "h", "j", "n"))
        rows, cols = pl.ds(ni * c, c), pl.ds(j * tv, tv)
        places = {"rows": (rows,), "tile": (rows, cols), "chunk": (ni,)}
        for ref, (_, _, place), target in zip(gmem, inputs, smem, strict=True):
            plgpu.copy_gmem_to_smem(ref.at[(bi, hi, *places[place])], target, barrier)
        plgpu.barrier_wait(barrier)
        product = functools.partial(mma_sum, interpret=interpret)
        t_ = Transposed
        k_s, w_s = smem[0], smem[1]

        @pl.when(j == 0)
        def _():
            kt_w = product((t_(k_s), w_s), rows=dk, columns=dk)  # first: no masks live yet
            i_rows = _wgmma_layout(jax.lax.broadcasted_iota(jnp.int32, (dk, dk), 0), interpret)
            i_cols = _wgmma_layout(jax.lax.broadcasted_iota(jnp.int32, (dk, dk), 1), interpret)
            gamma = 1.0 if decay is None else smem[-1][0, 0]  # Γ_C
            m = jnp.where(i_rows == i_cols, gamma - kt_w, -kt_w)  # Γ_C I − Kᵀ W
            _store(m_out.at[bi, hi, ni], m, md, interpret)

        if backward:
            q_s, p_s, do_s = smem[2:5]

            def cotangent_terms(neg_pt_do):
                # −Pᵀ Ō in the matmul dtype, then Qᵀ Ō + Wᵀ (−Pᵀ Ō) in one accumulator.
                pt_do = product((t_(p_s), do_s), rows=c, columns=tv)
                neg_pt_do[...] = (-pt_do).astype(md)
                plgpu.commit_smem()
                return product((t_(q_s), do_s), (t_(w_s), neg_pt_do), rows=dk, columns=tv)

            scratch_type = plgpu.SMEM((c, tv), md, transforms=mma_transforms(tv, md, interpret))
            x = pl.run_scoped(cotangent_terms, scratch_type)
        else:
            x = product((t_(k_s), smem[2]), rows=dk, columns=tv)  # Kᵀ U
        _store(x_out.at[bi, hi, ni, :, cols], x, f32, interpret)
        plgpu.wait_smem_to_gmem(0)

    def smem_type(array, block):
        if array is decay:
            return plgpu.SMEM(block, f32)
        return plgpu.SMEM(block, md, transforms=mma_transforms(block[-1], md, interpret))

    return launch(
        kernel,
        out_type=(
            jax.ShapeDtypeStruct((b, h, n, dk, dk), md),
            jax.ShapeDtypeStruct((b, h, n, dk, dv), f32),
        ),
        grid=(h, dv // tv, b, n),  # as in delta_chunk_output: CUDA (x, y, z) = (N, B, H·V/tv)
        grid_names=("h", "j", "b", "n"),
        kernel_name=name,
        scratch_types=[
            *(smem_type(array, block) for array, block, _ in inputs),
            plgpu.Barrier(num_arrivals=len(inputs)),
        ],
        interpret=interpret,
    )(*(array for array, _, _ in inputs))
