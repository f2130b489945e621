"""GPU backend: the Mosaic GPU kernels of the phased (gated) delta rule that run parallel over
chunks (:mod:`fwjax.ops.pallas.mosaic_gpu` holds the sequential chains and the shared pieces).

Each has one CTA per ``(batch, head, chunk)`` (and value tile, for the outputs and the affine
maps), loads its chunk's blocks by TMA into shared memory, multiplies with warpgroup MMAs from
there (:func:`fwjax.ops.pallas.mosaic_gpu.mma_sum`) and writes its results by TMA:

- :func:`delta_wy`, phase 1: ``W``, ``U``, ``P`` (and the gated rule's ``Q'``, ``K'``), the
  triangular inverse by forward substitution in registers;
- :func:`delta_chunk_output`: ``O = Q S + P (U − W S)`` from the state entering the chunk;
- :func:`delta_wy_backward`: phase 1's VJP, ``T`` recomputed;
- :func:`delta_chunk_gradients`: the operands' cotangents from the state entering the chunk
  and the cotangent of the state after it;
- :func:`affine_maps`: ``PallasChain.AFFINE``'s per-chunk maps ``M``, and ``B`` or ``H``.

``delta_wy``, ``delta_wy_backward`` and ``delta_chunk_gradients`` hold the whole value
dimension in one CTA, which takes ``C = 64`` with ``K, V <= 128`` (:func:`wy_supported`,
:func:`wy_backward_supported`, :func:`gradients_supported`); beyond it
:mod:`fwjax.ops.pallas.phased` runs their Triton versions.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

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


class _Masks(NamedTuple):
    """Row and column indices of a ``[C, C]`` accumulator (in its register layout when
    compiling), and broadcasts of ``[C]`` vectors along its rows or columns."""

    rows: jax.Array
    cols: jax.Array

    @classmethod
    def make(cls, c: int, interpret: bool) -> _Masks:
        iota = lambda axis: jax.lax.broadcasted_iota(jnp.int32, (c, c), axis)
        return cls(_wgmma_layout(iota(0), interpret), _wgmma_layout(iota(1), interpret))

    def by_row(self, x, width: int):
        """``x [C]`` (one value per row) as ``[C, width]``."""
        return jax.lax.broadcast_in_dim(x, (self.rows.shape[0], width), [0])

    def by_col(self, x):
        """``x [C]`` (one value per column) as ``[C, C]``."""
        return jax.lax.broadcast_in_dim(x, self.rows.shape, [1])


def high_low(x, dtype) -> tuple:
    """Float32 ``x`` as a high and a low part in the matmul ``dtype`` (``x = high + low`` to
    about 16 bits): how float32 factors enter an MMA."""
    high = x.astype(dtype)
    return high, (x - high.astype(jnp.float32)).astype(dtype)


def _split(ref, x, dtype) -> None:
    """Writes float32 ``x`` to ``ref [2, ...]`` as :func:`high_low` parts."""
    ref[0], ref[1] = high_low(x, dtype)


def _split_pairs(x, y) -> tuple:
    """The MMA pairs of ``x y`` from split operands ``x = x₀ + x₁``, ``y = y₀ + y₁`` (each a
    ``[2, ...]`` buffer, or :class:`~fwjax.ops.pallas.mosaic_gpu.Transposed` of one; one of
    them may be an unsplit operand): ``x₀y₀ + x₁y₀ + x₀y₁``, the ``x₁y₁`` term (2⁻¹⁶ of the product)
    dropped."""
    part = lambda z, i: Transposed(z.ref.at[i]) if isinstance(z, Transposed) else z.at[i]
    if not (_is_split(x) or _is_split(y)):
        raise ValueError("_split_pairs needs a split operand")
    if not _is_split(y):
        return ((part(x, 0), y), (part(x, 1), y))
    if not _is_split(x):
        return ((x, part(y, 0)), (x, part(y, 1)))
    return ((part(x, 0), part(y, 0)), (part(x, 1), part(y, 0)), (part(x, 0), part(y, 1)))


def _is_split(z) -> bool:
    ref = z.ref if isinstance(z, Transposed) else z
    return len(ref.shape) == 3


def _wy_inverse(kk, beta_cols, g_diff, m: _Masks):
    """``T = (I + A)⁻¹`` of one chunk in registers (float32), ``A = tril(diag(β) K Kᵀ ⊙ D,
    −1)``, from ``kk = K Kᵀ`` (an accumulator), ``β`` as a per-column vector and, for the
    gated rule, ``g_diff()`` giving ``g_i − g_j`` at ``[i, j]`` (None: ``D`` is the causal
    mask). The inverse works on ``Aᵀ`` (its column ``i`` is row ``i`` of ``A``, a per-row
    vector): forward substitution ``X_i = e_i − A[i, :] X`` over ``C − 1`` row steps, rows
    above ``i`` final."""
    # Aᵀ[j, i] = β_i (K Kᵀ)_ij D_ij on i > j (K Kᵀ is symmetric).
    a_t = m.by_col(beta_cols) * kk
    if g_diff is not None:
        a_t = a_t * jnp.exp(jnp.where(m.cols > m.rows, -g_diff(), 0.0))  # D_ij at [j, i]
    a_t = jnp.where(m.cols > m.rows, a_t, 0.0)
    c = kk.shape[0]

    def substitute(i, x):
        a_i = jnp.sum(jnp.where(m.cols == i, a_t, 0.0), axis=1)  # A[i, j] at row j
        a_i_x = jnp.sum(m.by_row(a_i, c) * x, axis=0)  # Σ_j A[i, j] X[j, :], per column
        e_i = jnp.where(m.cols == i, 1.0, 0.0)
        return jnp.where(m.rows == i, e_i - m.by_col(a_i_x), x)

    eye = jnp.where(m.rows == m.cols, 1.0, 0.0)
    return jax.lax.fori_loop(1, c, substitute, eye)


def _inverse_into(t_s, k_s, beta_s, g_s, *, md, interpret: bool) -> tuple:
    """Phase 1's ``T`` of one chunk (:func:`_wy_inverse`, ``K Kᵀ`` by one MMA before any
    mask is live) split into ``t_s [2, C, C]``, from the chunk's ``K``, ``β`` and the gated
    rule's ``g`` (``g_s``: empty without one) in shared memory. Returns ``(masks, g_row,
    g_diff)`` for the kernel's later terms (``g_row``: ``g_i`` on row ``i``; ``g_diff()``:
    ``g_i − g_j`` at ``[i, j]``; both None without a gate)."""
    c = k_s.shape[0]
    kk = mma_sum((k_s, Transposed(k_s)), rows=c, columns=c, interpret=interpret)
    m = _Masks.make(c, interpret)
    g_row = g_diff = None
    if g_s:
        g_row = _vector(g_s[0], 1, interpret)
        g_diff = lambda: m.by_row(g_row, c) - m.by_col(_vector(g_s[0], 0, interpret))
    _split(t_s, _wy_inverse(kk, _vector(beta_s, 0, interpret), g_diff, m), md)
    return m, g_row, g_diff


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
        for ref, target in zip(gmem, scratch[:n_in], strict=True):
            plgpu.copy_gmem_to_smem(ref.at[bi, hi, rows], target, barrier)
        plgpu.barrier_wait(barrier)
        product = functools.partial(mma_sum, interpret=interpret)
        split = functools.partial(_split, dtype=md)
        m, g_row, g_diff = _inverse_into(t_s, k_s, beta_s, g_s, md=md, interpret=interpret)
        beta_rows = _vector(beta_s, 1, interpret)  # β_i on row i
        if gated:
            gamma = jnp.exp(g_row)
        beta_k = beta_rows * gamma if gated else beta_rows  # βΓ
        split(bk_s, m.by_row(beta_k, dk) * k_s[...].astype(f32))
        split(bv_s, m.by_row(beta_rows, dv) * v_s[...].astype(f32))
        plgpu.commit_smem()

        def emit(out, value):  # one result in registers at a time
            _store(out.at[bi, hi, rows], value, md, interpret)

        *decayed_out, w_out, u_out, p_out = outs
        emit(w_out, product(*_split_pairs(t_s, bk_s), rows=c, columns=dk))  # W
        emit(u_out, product(*_split_pairs(t_s, bv_s), rows=c, columns=dv))  # U
        scores = product((q_s, Transposed(k_s)), rows=c, columns=c)  # Q Kᵀ
        if gated:
            scores = scores * jnp.exp(jnp.where(m.rows >= m.cols, g_diff(), 0.0))  # ⊙ D
        emit(p_out, jnp.where(m.rows >= m.cols, scores, 0.0))  # P
        if gated:
            g_last = g_s[0][c - 1]
            emit(decayed_out[0], m.by_row(gamma, dk) * q_s[...].astype(f32))  # diag(Γ) Q
            k_scale = m.by_row(jnp.exp(g_last - g_row), dk)
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


def wy_backward_smem_bytes(chunk: int, key: int, value: int, itemsize: int = 2) -> int:
    """Shared memory of :func:`delta_wy_backward`: one chunk's ``Q, K [C, K]``, ``V [C, V]``,
    the split cotangents ``W̄ [2, C, K]``, ``Ū [2, C, V]``, ``P̄ [C, C]`` (float32), three
    split ``[2, C, C]`` buffers, ``β`` and ``g``, one float32 output block at a time, and the
    column sums' reduction scratch (a ``[C, C]`` float32 value)."""
    c, k, v = chunk, key, value
    inputs = 2 * c * k + c * v + 2 * (c * k + c * v) + 3 * 2 * c * c
    return itemsize * inputs + 4 * (c * c + 2 * c + c * max(k, v) + c * c)


def wy_backward_supported(chunk: int, key: int, value: int, itemsize: int = 2) -> bool:
    """Whether :func:`delta_wy_backward` takes these sizes: those of :func:`wy_supported`,
    within Hopper's shared memory."""
    fits = wy_backward_smem_bytes(chunk, key, value, itemsize) <= SMEM_LIMIT
    return wy_supported(chunk, key, value) and fits


def delta_wy_backward(q, k, v, beta, g, dw, du, dp, *, chunk: int, interpret: bool,
                      name="delta_wy_bwd"):  # fmt: skip
    """The VJP of :func:`delta_wy` (phase 1's backward), every chunk at once, one CTA per
    ``(batch, head, chunk)``: the products of
    :func:`fwjax.ops.pallas.chunk_math.wy_chunk_backward`, ``T`` recomputed as in the
    forward::

        T = (I + A)⁻¹                                 K Kᵀ: one MMA, as in the forward
        T̄ = (W̄ Kᵀ) diag(βΓ) + (Ū Vᵀ) diag(β)        four MMAs (W̄, Ū split)
        Ā = −Tᵀ T̄ Tᵀ                                  six MMAs (T, T̄, Tᵀ T̄ split)
        R = diag(β) (Ā ⊙ D),  S̄ = P̄ ⊙ D ⊙ M             K Kᵀ again (and Q Kᵀ, gated)
        Q̄ = S̄ K,   K̄ = (R + Rᵀ) K + S̄ᵀ Q + diag(βΓ) Tᵀ W̄    eleven MMAs (R, S̄, T, W̄ split)
        V̄ = diag(β) Tᵀ Ū                              three MMAs
        β̄ = rowsum(Ā ⊙ D ⊙ K Kᵀ) + Γ ⊙ rowsum(Tᵀ W̄ ⊙ K) + rowsum(Tᵀ Ū ⊙ V)

    (26 MMAs per chunk, 27 gated), and, for the gated rule,
    ``ḡ = rowsum(X) − colsum(X) + βΓ ⊙ rowsum(Tᵀ W̄ ⊙ K)`` with ``X = R ⊙ K Kᵀ + S̄ ⊙ Q Kᵀ``.
    Float32 operands enter their MMAs as :func:`high_low` parts in the matmul dtype (as in
    :func:`delta_wy`). With float16 that bounds them by its range (65504): ``T̄`` grows as
    ``|Ū| |V| √V``, so cotangents in the thousands (a large loss scale) overflow here to
    inf/NaN where bfloat16 does not. The terms of ``Q̄``, ``K̄`` and ``ḡ`` that are
    elementwise in the cotangents of ``Q``, ``K`` (``Q'``, ``K'``) and ``Γ_C`` are the
    caller's (``fwjax.ops.pallas.phased._mosaic_gpu_phase1_backward``).

    Args:
      q, k: ``[B, H, N·C, K]``, in the matmul dtype.
      v: ``[B, H, N·C, V]``, in the matmul dtype.
      beta: ``β``, ``[B, H, N·C]``, float32.
      g: the gated rule's cumulative ``log α`` within each chunk, ``[B, H, N·C]``, float32,
        or None.
      dw, du: the cotangents of ``W`` and ``U`` as :func:`high_low` parts, stacked:
        ``[2, B, H, N·C, K]`` and ``[2, B, H, N·C, V]`` in the matmul dtype.
      dp: the cotangent of ``P``, ``[B, H, N·C, C]``, float32.
      chunk: ``C``.
      interpret: run in Mosaic GPU's interpret mode (CPU).
      name: the kernel's name (in profiles).

    Returns:
      ``(Q̄, K̄ [B, H, N·C, K], V̄ [B, H, N·C, V], β̄ [B, H, N·C])`` in float32, and with
      ``g`` the kernel's part of ``ḡ`` ``[B, H, N·C]`` (float32).
    """
    b, h, t, dk = k.shape
    c, dv, md, f32 = chunk, v.shape[-1], k.dtype, jnp.float32
    gated = g is not None
    check_supported(md, f32, c, dk, MMA_TILE)
    if dv % MMA_TILE or not wy_backward_supported(c, dk, dv, md.itemsize):
        raise ValueError(
            f"delta_wy_backward takes chunk=64 with key, value <= 128 (multiples of 64), got "
            f"chunk={c}, key={dk}, value={dv}"
        )
    per_step = (q, k, v, beta, *((g,) if gated else ()))
    n_in, n_out = len(per_step) + 3, 5 if gated else 4
    n_copies = len(per_step) + 2 + 2 + 1  # W̄ and Ū in two copies each, then P̄

    def kernel(*refs):
        gmem, outs, scratch = refs[:n_in], refs[n_in : n_in + n_out], refs[n_in + n_out :]
        per_step_s, (dw_s, du_s, dp_s) = scratch[: n_in - 3], scratch[n_in - 3 : n_in]
        q_s, k_s, v_s, beta_s, *g_s = per_step_s
        t_s, x_s, ds_s, barrier = scratch[n_in:]
        bi, hi, ni = (jax.lax.axis_index(axis) for axis in ("b", "h", "n"))
        rows = pl.ds(ni * c, c)
        per_step_in, (dw_g, du_g, dp_g) = gmem[: n_in - 3], gmem[n_in - 3 :]
        blocks = zip(per_step_in, per_step_s, strict=True)
        copies = [(src.at[bi, hi, rows], dst) for src, dst in blocks]
        for src, dst in ((dw_g, dw_s), (du_g, du_s)):  # each half by its own 2-D copy
            copies += [(src.at[part, bi, hi, rows], dst.at[part]) for part in (0, 1)]
        copies.append((dp_g.at[bi, hi, rows], dp_s))
        assert len(copies) == n_copies
        for source, target in copies:
            plgpu.copy_gmem_to_smem(source, target, barrier)
        plgpu.barrier_wait(barrier)
        product = functools.partial(mma_sum, rows=c, interpret=interpret)
        split = functools.partial(_split, dtype=md)
        t_ = Transposed

        def emit(out, value):  # one result in registers at a time
            _store(out.at[bi, hi, rows], value, f32, interpret)

        m, g_row, g_diff = _inverse_into(t_s, k_s, beta_s, g_s, md=md, interpret=interpret)
        plgpu.commit_smem()

        # T̄ = W̄ (diag(βΓ) K)ᵀ + Ū (diag(β) V)ᵀ: the diagonals scale columns after the MMAs.
        beta_cols = _vector(beta_s, 0, interpret)  # β_j on column j
        beta_gamma_cols = beta_cols
        if gated:
            beta_gamma_cols = beta_cols * jnp.exp(_vector(g_s[0], 0, interpret))
        d_t = m.by_col(beta_gamma_cols) * product(*_split_pairs(dw_s, t_(k_s)), columns=c)
        d_t = d_t + m.by_col(beta_cols) * product(*_split_pairs(du_s, t_(v_s)), columns=c)
        split(x_s, d_t)
        plgpu.commit_smem()
        # Ā = −(Tᵀ T̄) Tᵀ, Tᵀ T̄ split into the same buffer (its MMAs are done).
        split(x_s, product(*_split_pairs(t_(t_s), x_s), columns=c))
        plgpu.commit_smem()
        d_a = -product(*_split_pairs(x_s, t_(t_s)), columns=c)
        decay = jnp.exp(jnp.where(m.rows >= m.cols, g_diff(), 0.0)) if gated else 1.0  # D
        d_a_decay = jnp.where(m.rows > m.cols, d_a, 0.0) * decay  # Ā ⊙ D on A's triangle
        kk = product((k_s, t_(k_s)), columns=c)  # again, not kept live through the above
        d_beta = jnp.sum(d_a_decay * kk, axis=1)
        beta_rows = _vector(beta_s, 1, interpret)  # β_i on row i
        gamma_rows = jnp.exp(g_row) if gated else 1.0  # Γ_i on row i
        r = m.by_row(beta_rows, c) * d_a_decay  # R = diag(β) (Ā ⊙ D)
        x_gate = r * kk if gated else None
        split(x_s, r)  # Tᵀ T̄ is spent
        # S̄ = P̄ ⊙ D ⊙ M.
        dp = dp_s[...] if interpret else plgpu.load(dp_s, (), layout=plgpu.Layout.WGMMA)
        d_scores = jnp.where(m.rows >= m.cols, dp, 0.0) * decay
        split(ds_s, d_scores)
        plgpu.commit_smem()
        if gated:  # ḡ's part from D: rowsum − colsum of X = D̄ ⊙ D
            x_gate = x_gate + d_scores * product((q_s, t_(k_s)), columns=c)
            col_sums = jnp.sum(x_gate, axis=0)  # per column; to rows by a masked reduction
            col_sums = jnp.sum(jnp.where(m.rows == m.cols, m.by_col(col_sums), 0.0), axis=1)
            d_g = jnp.sum(x_gate, axis=1) - col_sums

        dq_out, dk_out, dv_out, d_beta_out, *d_g_out = outs
        emit(dq_out, product(*_split_pairs(ds_s, k_s), columns=dk))  # S̄ K
        # (diag(βΓ) K)‾ = Tᵀ W̄: its row sums with K, and its term of K̄.
        d_bk = product(*_split_pairs(t_(t_s), dw_s), columns=dk)
        k_d_bk = jnp.sum(d_bk * k_s[...].astype(f32), axis=1)
        beta_gamma = beta_rows * gamma_rows
        pairs = (*_split_pairs(x_s, k_s), *_split_pairs(t_(x_s), k_s))  # (R + Rᵀ) K
        pairs += _split_pairs(t_(ds_s), q_s)  # S̄ᵀ Q
        emit(dk_out, m.by_row(beta_gamma, dk) * d_bk + product(*pairs, columns=dk))
        d_beta = d_beta + gamma_rows * k_d_bk
        # (diag(β) V)‾ = Tᵀ Ū.
        d_bv = product(*_split_pairs(t_(t_s), du_s), columns=dv)
        d_beta = d_beta + jnp.sum(d_bv * v_s[...].astype(f32), axis=1)
        emit(dv_out, m.by_row(beta_rows, dv) * d_bv)
        emit(d_beta_out, d_beta)
        if gated:
            emit(d_g_out[0], d_g + beta_gamma * k_d_bk)
        plgpu.wait_smem_to_gmem(0)

    smem = lambda shape: plgpu.SMEM(shape, md, transforms=mma_transforms(shape[-1], md, interpret))
    inputs = [smem((c, dk)), smem((c, dk)), smem((c, dv)), plgpu.SMEM((c,), f32)]
    if gated:
        inputs.append(plgpu.SMEM((c,), f32))
    dp_type = plgpu.SMEM((c, c), f32, transforms=mma_transforms(c, f32, interpret))
    inputs += [smem((2, c, dk)), smem((2, c, dv)), dp_type]  # W̄, Ū, P̄
    seq = lambda *width: jax.ShapeDtypeStruct((b, h, t, *width), f32)
    return launch(
        kernel,
        out_type=(seq(dk), seq(dk), seq(dv), seq(), *((seq(),) if gated else ())),
        grid=(b, h, t // c),
        grid_names=("b", "h", "n"),
        kernel_name=name,
        scratch_types=[
            *inputs,
            smem((2, c, c)),  # T, split in two
            smem((2, c, c)),  # T̄, then Tᵀ T̄, then R
            smem((2, c, c)),  # S̄
            plgpu.Barrier(num_arrivals=n_copies),
        ],
        compiler_params=plgpu.CompilerParams(reduction_scratch_bytes=4 * c * c),
        interpret=interpret,
    )(*per_step, dw, du, dp)


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
