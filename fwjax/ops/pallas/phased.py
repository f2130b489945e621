"""The phased schedule of the PALLAS kernels (``PallasSchedule.PHASED``) of the delta and gated
delta rules: the structure of flash-linear-attention's WY kernels, ``chunk_delta_h`` and
``chunk_o`` and their backward kernels, on the backend-neutral kernel descriptions of
:mod:`fwjax.ops.pallas.scan_spec`.

Forward::

    WY kernel (one program per batch, head, chunk; all in parallel):
        Q, K, W, U, P [, Γ_C] of each chunk (the triangular inverse by forward substitution)
    chain kernel (sequential; one program per batch, head, value tile):
        states[n] = S;   S ← Γ_C S + Kᵀ (U − W S)                   two matmuls per chunk
    output kernel (one program per batch, head, chunk; all in parallel):
        O = Q S_n + P (U − W S_n)

Backward, with ``Ō`` and ``G = ∂L/∂S``::

    cotangent chain kernel (sequential, reverse):
        gs[n] = G;   G ← Γ_C G + Qᵀ Ō − Wᵀ (Pᵀ Ō + K G)
    gradient kernel (parallel over chunks, the whole value dimension in one program):
        Q̄, K̄, W̄, Ū, P̄ [, Γ̄_C] of chunk n from S_n, gs[n], Ō      (no partial sums over tiles)

with phase 1 recomputed by its kernel beforehand, and then phase 1's VJP::

    phase-1 VJP kernel (one program per batch, head, chunk; all in parallel):
        q̄, k̄, v̄, β̄ [, ḡ] of chunk n from Q̄, K̄, W̄, Ū, P̄ [, Γ̄_C]      (T recomputed in the kernel)

(``chunk_math.wy_chunk_backward``; the gate's cumsum VJP in XLA; on Mosaic GPU
``mosaic_gpu_chunks.delta_wy_backward``, its terms elementwise in ``Q̄``, ``K̄``, ``Γ̄_C`` in XLA).
With ``state_segments = P > 1`` each chain kernel runs as ``P`` segments of the
chunks in parallel (the split state scan, :func:`_chain`). The saved states and cotangents
are stored in the matmul dtype (the operands they feed are rounded to it anyway;
flash-linear-attention stores them in bfloat16 too);
the chains themselves carry the state dtype. The per-chunk math is
:mod:`fwjax.ops.pallas.chunk_math` (``wy_chunk``, ``chain_forward``, ``chunk_output``,
``chain_backward``, ``chunk_gradients``, ``wy_chunk_backward``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp

from fwjax.ops.pallas import (
    PallasBackend,
    PallasChain,
    flat,
    flat_operand,
    run_chunk_map,
    run_chunk_scan,
    unflat,
    unflat_operand,
)
from fwjax.ops.pallas import chunk_math as cm
from fwjax.ops.pallas.scan_spec import ChunkMap, ChunkScan, Kind, Operand
from fwjax.ops.state_split import incoming_carries


def _operands(rule, cfg, terms, sd) -> tuple[dict, dict, tuple[str, ...]]:
    """Phase 1's operands by name (flattened, cast), their kinds, and the decay's name if any."""
    names = [name for name, _ in rule.operands]
    values = dict(zip(names, rule.cast_operands(terms, cfg.matmul_dtype, sd), strict=True))
    decay = ("decay",) if "decay" in values else ()
    return values, dict(rule.operands), decay


class NativeChain(NamedTuple):
    """A backend's own kernel of a chain: ``run(name, chain_in, carry, save, cfg)`` returns
    what :func:`_run_chain` returns; it walks the chunks from the last when ``reverse``."""

    run: Callable
    reverse: bool


def _run_chain(name, chain_in, step, carry, emitted, cfg, reverse=False, native=None):
    """A sequential chain kernel: ``chain_in`` maps each operand's name to ``(kind, array)``;
    ``step(values, carry) -> (carry, {emitted: value})`` with the carry in ``carry``'s dtype and
    the per-chunk ``emitted`` value saved in the matmul dtype. Returns ``(final carry,
    emitted [B, H, N, K, V])``, or ``(final carry,)`` when ``emitted`` is None (nothing
    saved). ``native``, if given, is a backend's own kernel of the same chain
    (:class:`NativeChain`), run instead of the generic one."""
    if native is not None:
        if native.reverse != reverse:
            raise ValueError(f"{native.run.__name__} walks the chunks with {native.reverse=}")
        return native.run(name, chain_in, carry, emitted is not None, cfg)
    saved = () if emitted is None else (Operand(emitted, Kind.STATES, cfg.matmul_dtype),)
    spec = ChunkScan(
        name,
        inputs=(
            *(Operand(n, kind) for n, (kind, _) in chain_in.items()),
            Operand("carry0", Kind.STATE),
        ),
        outputs=(Operand("carry", Kind.STATE, carry.dtype), *saved),
        step=step,
        reverse=reverse,
        state_dtype=carry.dtype,
    )
    return run_chunk_scan(spec, *(x for _, x in chain_in.values()), carry, cfg=cfg)


# Operand kinds whose last axis is the state's value axis: the chains take them as additive
# terms column by column, independent of the carry (U, Ō, B, H), so zero columns of them leave
# the carry's matching columns evolving by the chain's linear part alone. An operand on the
# value axis that multiplied the carry would break the split's widened pass.
_VALUE_KINDS = (Kind.SEQ_VALUE, Kind.STATES)


def _split(x, p):
    """``P`` consecutive segments of the chunks as ``P`` heads (a reshape, no copy):
    ``[B, H, N·C, .]`` → ``[B, H·P, N·C/P, .]``, ``[B, H, N, ., .]`` → ``[B, H·P, N/P, ., .]``."""
    return x.reshape(x.shape[0], x.shape[1] * p, x.shape[2] // p, *x.shape[3:])


def _widened(cfg, k):
    """``cfg`` for a carry of ``V + K`` columns (rounded up to whole value tiles); its width."""
    t = cfg.tiling
    if cfg.backend is PallasBackend.MOSAIC_TPU and t.value_block == t.value:
        width, block = t.value + k, t.value + k  # one whole block (Mosaic: whole or 128·m)
    else:
        width, block = -(-(t.value + k) // t.value_block) * t.value_block, t.value_block
    return cfg._replace(tiling=t._replace(value=width, value_block=block)), width


def _chain(name, chain_in, step, carry, emitted, cfg, reverse=False, native=None):
    """:func:`_run_chain`, split into ``P = cfg.tiling.segments`` segments of chunks whose
    chains run in parallel when ``P > 1`` (the split state scan):

    1. every segment's affine map ``end = Φ start + E`` in one pass: the chain is linear in
       each column of its carry, so carrying ``[0 | I]`` (``V + K`` columns) with zero columns
       appended to the operands on the value axis ends at ``[E | Φ]`` (``Φ`` the product of the
       segment's chunk maps ``Γ_C I − Kᵀ W``, or their transposes in reverse);
    2. the true carry entering each segment, ``P`` small steps in XLA;
    3. every segment's chain again from its true start, saving the per-chunk values.

    Costs ``(2V + K)/V`` times the chain's work for ``P×`` its parallelism.
    """
    p = cfg.tiling.segments
    if p == 1:
        return _run_chain(name, chain_in, step, carry, emitted, cfg, reverse, native)
    b, h, k, v = carry.shape
    split = {n: (kind, _split(x, p)) for n, (kind, x) in chain_in.items()}

    # 1. [E | Φ] of every segment from the carry [0 | I] (zero columns beyond V + K).
    wide_cfg, width = _widened(cfg, k)
    pad = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - v)])
    wide = {n: (kind, pad(x) if kind in _VALUE_KINDS else x) for n, (kind, x) in split.items()}
    eye = jnp.eye(k, width - v, dtype=carry.dtype)
    start = jnp.concatenate(
        [jnp.zeros((b, h * p, k, v), carry.dtype), jnp.broadcast_to(eye, (b, h * p, *eye.shape))],
        axis=-1,
    )
    ends, *_ = _run_chain(f"{name}_maps", wide, step, start, None, wide_cfg, reverse, native)
    ends = ends.reshape(b, h, p, k, width)

    # 2. The carry entering each segment (P steps in XLA).
    maps = (jnp.moveaxis(ends[..., v : v + k], 2, 0), jnp.moveaxis(ends[..., :v], 2, 0))
    starts = jnp.moveaxis(incoming_carries(*maps, carry, reverse=reverse), 0, 2)

    # 3. Each segment from its true start.
    final, saved = _run_chain(
        name, split, step, starts.reshape(b, h * p, k, v), emitted, cfg, reverse, native
    )
    final = final.reshape(b, h, p, k, v)[:, :, 0 if reverse else p - 1]
    return final, saved.reshape(b, h, -1, *saved.shape[3:])


def _mosaic_gpu_chain(name, chain_in, carry, save, cfg):
    """The forward chain ``S ← Γ_C S + Kᵀ (U − W S)`` as the Mosaic GPU kernel
    (:func:`fwjax.ops.pallas.mosaic_gpu.delta_chain_forward`)."""
    from fwjax.ops.pallas import mosaic_gpu

    k, w, u = (chain_in[n][1] for n in "kwu")
    decay = _mosaic_gpu_decay(chain_in)
    args = _mosaic_gpu_args(cfg, name)
    chunk = cfg.tiling.chunk
    return mosaic_gpu.delta_chain_forward(k, w, u, carry, decay, chunk=chunk, save=save, **args)


def _mosaic_gpu_decay(chain_in):
    """The gated rule's chunk decays as the Mosaic GPU chains read them, or None."""
    from fwjax.ops.pallas import mosaic_gpu

    return mosaic_gpu.decay_rows(chain_in["decay"][1]) if "decay" in chain_in else None


def _mosaic_gpu_args(cfg, name) -> dict:
    """The static arguments every Mosaic GPU kernel takes."""
    return {"value_block": cfg.tiling.value_block, "interpret": cfg.interpret, "name": name}


def _mosaic_gpu_cotangent_chain(name, chain_in, carry, save, cfg):
    """The cotangent chain ``G ← Γ_C G + Qᵀ Ō − Wᵀ (Pᵀ Ō + K G)`` as the Mosaic GPU kernel
    (:func:`fwjax.ops.pallas.mosaic_gpu.delta_chain_backward`)."""
    from fwjax.ops.pallas import mosaic_gpu

    q, k, w, p, do = (chain_in[n][1] for n in ("q", "k", "w", "p", "do"))
    args = _mosaic_gpu_args(cfg, name)
    decay = _mosaic_gpu_decay(chain_in)
    return mosaic_gpu.delta_chain_backward(p, k, q, w, do, carry, decay, save=save, **args)


def _mosaic_gpu_affine_chain(name, chain_in, carry, save, cfg):
    """``PallasChain.AFFINE``'s chains as the Mosaic GPU kernel
    (:func:`fwjax.ops.pallas.mosaic_gpu.affine_chain`): ``S ← M S + B`` given ``B``, or
    ``G ← Mᵀ G + H`` (from the last chunk) given ``H``."""
    from fwjax.ops.pallas import mosaic_gpu

    transpose = "h" in chain_in
    m, b = chain_in["m"][1], chain_in["h" if transpose else "b"][1]
    args = _mosaic_gpu_args(cfg, name)
    return mosaic_gpu.affine_chain(m, b, carry, transpose=transpose, save=save, **args)


def _mosaic_gpu_affine_maps(rule, cfg, ops, decay, kind: str, **values) -> tuple:
    """Every chunk's ``(M, B)`` (``values``: ``u``) or ``(M, H)`` (``q``, ``p``, ``do``) by
    the Mosaic GPU kernel (:func:`fwjax.ops.pallas.mosaic_gpu_chunks.affine_maps`)."""
    from fwjax.ops.pallas import mosaic_gpu, mosaic_gpu_chunks

    rows = mosaic_gpu.decay_rows(ops["decay"]) if decay else None
    return mosaic_gpu_chunks.affine_maps(
        ops["k"], ops["w"], rows, chunk=cfg.tiling.chunk, interpret=cfg.interpret,
        name=f"{rule.name}_{kind}", **values,
    )  # fmt: skip


def _mosaic_gpu_fits(cfg, supported: str) -> bool:
    """Whether a kernel parallel over chunks runs as the Mosaic GPU kernel (else as the Triton
    one): with ``PallasBackend.MOSAIC_GPU`` where ``mosaic_gpu_chunks.<supported>`` takes the
    sizes (the whole value dimension in one CTA)."""
    if cfg.backend is not PallasBackend.MOSAIC_GPU:
        return False
    from fwjax.ops.pallas import mosaic_gpu_chunks

    t = cfg.tiling
    return getattr(mosaic_gpu_chunks, supported)(t.chunk, t.key, t.value)


def _mosaic_gpu_gates(beta, gate) -> tuple:
    """The gates as the Mosaic GPU phase-1 kernels read them, ``(β, g)`` float32
    ``[B, H, N·C]``, from kernel-layout ``β`` and ``log α`` (``gate``: empty without one), and
    ``g`` ``[B, H, N, C]``: the cumulative ``log α`` from each chunk's start (``g = log Γ``, a
    cumsum in XLA), or None."""
    f32 = jnp.float32
    per_step = lambda x: x.astype(f32).reshape(*x.shape[:2], -1)  # [B, H, N, C] → [B, H, N·C]
    g = jnp.cumsum(gate[0].astype(f32), axis=-1) if gate else None
    return per_step(beta), None if g is None else per_step(g), g


def _mosaic_gpu_phase1(rule, cfg, xs) -> tuple:
    """Phase 1 by the Mosaic GPU kernel (:func:`fwjax.ops.pallas.mosaic_gpu_chunks.delta_wy`):
    the rule's operands in kernel layout, as :func:`phase1` returns them; the gated rule's chunk
    decay ``Γ_C = exp(g_C)`` in float32, from the cumulative ``log α`` in XLA."""
    from fwjax.ops.pallas import mosaic_gpu_chunks

    q, k, v, beta, *gate = xs
    md, c = cfg.matmul_dtype, cfg.tiling.chunk
    beta_steps, g_steps, g = _mosaic_gpu_gates(beta, gate)
    terms = mosaic_gpu_chunks.delta_wy(
        *(flat(x).astype(md) for x in (q, k, v)),
        beta_steps,
        g_steps,
        chunk=c,
        interpret=cfg.interpret,
        name=f"{rule.name}_wy",
    )
    terms = tuple(unflat(x, c) for x in terms)
    if g is None:
        return (q.astype(md), k.astype(md), *terms)  # (Q, K, W, U, P)
    return (*terms, jnp.exp(g[..., -1:])[..., None])  # (Q', K', W, U, P, Γ_C [B, H, N, 1, 1])


def _mosaic_gpu_phase1_backward(rule, cfg, xs, grads) -> tuple:
    """Phase 1's VJP by the Mosaic GPU kernel
    (:func:`fwjax.ops.pallas.mosaic_gpu_chunks.delta_wy_backward`), with the terms elementwise
    in the cotangents of ``Q``, ``K`` (the gated rule's ``Q' = diag(Γ) Q``,
    ``K' = diag(Γ_C / Γ) K``) and ``Γ_C = exp(g_C)`` added here in XLA. ``xs``, ``grads``: as
    :func:`phase1_backward`'s. Returns float32 ``(q̄, k̄, v̄, β̄[, ḡ])`` in kernel layout,
    ``ḡ`` the cotangent of the cumulative ``log α``."""
    from fwjax.ops.pallas import mosaic_gpu_chunks

    q, k, v, beta, *gate = xs
    md, c, f32 = cfg.matmul_dtype, cfg.tiling.chunk, jnp.float32
    beta_steps, g_steps, g = _mosaic_gpu_gates(beta, gate)

    split = lambda x: jnp.stack(mosaic_gpu_chunks.high_low(flat(x).astype(f32), md))

    d_q, d_k, dw, du, dp, *d_decay = grads
    q, k = q.astype(md), k.astype(md)  # the operands as phase 1's kernel reads them
    dq, dk, dv, d_beta, *d_g = mosaic_gpu_chunks.delta_wy_backward(
        flat(q), flat(k), flat(v).astype(md), beta_steps, g_steps,
        split(dw), split(du), flat(dp).astype(f32),
        chunk=c, interpret=cfg.interpret, name=f"{rule.name}_wy_bwd",
    )  # fmt: skip
    dq, dk, dv = (unflat(x, c) for x in (dq, dk, dv))
    d_q, d_k, d_beta = d_q.astype(f32), d_k.astype(f32), d_beta.reshape(beta.shape)
    if g is None:  # the operands Q, K are q, k
        return dq + d_q, dk + d_k, dv, d_beta
    q_scale, k_scale = jnp.exp(g)[..., None], jnp.exp(g[..., -1:] - g)[..., None]
    k_terms = jnp.sum(k_scale * d_k * k.astype(f32), axis=-1)  # ∂/∂g through K'
    d_g = d_g[0].reshape(g.shape) + jnp.sum(q_scale * d_q * q.astype(f32), axis=-1) - k_terms
    # g_C (the last row's g) also enters every K' and Γ_C = exp(g_C).
    d_decay = d_decay[0].astype(f32).reshape(g[..., -1].shape) * jnp.exp(g[..., -1])
    d_g = d_g.at[..., -1].add(jnp.sum(k_terms, axis=-1) + d_decay)
    return dq + q_scale * d_q, dk + k_scale * d_k, dv, d_beta, d_g


def _mosaic_gpu_gradients(rule, cfg, ops, states, gs, do, decay: bool) -> tuple:
    """The operands' cotangents ``(Q̄, K̄, W̄, Ū, P̄[, Γ̄_C])`` (flattened, float32) by the Mosaic
    GPU kernel (:func:`fwjax.ops.pallas.mosaic_gpu_chunks.delta_chunk_gradients`); ``P̄``
    takes the causal mask here and ``Γ̄_C`` the sum of the kernel's row sums."""
    from fwjax.ops.pallas import mosaic_gpu_chunks

    c = cfg.tiling.chunk
    args = (*(ops[n] for n in ("k", "w", "u", "p")), states, gs, do)
    grads = mosaic_gpu_chunks.delta_chunk_gradients(
        *args, decay=decay, interpret=cfg.interpret, name=f"{rule.name}_grads"
    )
    dq, dk, dw, du, dp, *row_sums = grads
    causal = jnp.tile(jnp.tril(jnp.ones((c, c), bool)), (dp.shape[2] // c, 1))
    dp = jnp.where(causal, dp, 0.0)  # P = (Q Kᵀ) ⊙ M
    d_decay = [r.sum(-1)[..., None, None] for r in row_sums]  # Σ S ⊙ G: [B, H, N, 1, 1]
    return dq, dk, dw, du, dp, *d_decay


def _chain_maps(x, decay, md, sd):
    """``(M, B)`` of the affine chain from one chunk's operands ``x`` (by name)."""
    d = x["decay"] if decay else None
    return cm.chain_maps(x["k"], x["w"], x["u"], md, sd, d)


def _phase1_inputs(beta, gate) -> tuple[tuple, list]:
    """The inputs of the phase-1 kernels (forward and VJP) before their cotangents: operands
    ``q, k, v`` and the gates, and the gates' values in kernel layout. The gates enter as
    columns ``[C, 1]`` and rows ``[1, C]`` (two views of the same values); the gated rule's
    ``log α`` as its cumulative sum from each chunk's start (``g = log Γ``, a cumsum in XLA)."""
    gates = [beta]
    if gate:
        gates.append(jnp.cumsum(gate[0], axis=-1))
    columns = [g.reshape(*g.shape[:2], -1, 1) for g in gates]  # SEQ_SCALAR [B, H, N·C, 1]
    rows = [g[..., None, :] for g in gates]  # CHUNK_ROW [B, H, N, 1, C]
    names = ("beta_col", "g_col")[: len(gates)], ("beta_row", "g_row")[: len(gates)]
    inputs = (
        Operand("q", Kind.SEQ_KEY),
        Operand("k", Kind.SEQ_KEY),
        Operand("v", Kind.SEQ_VALUE),
        *(Operand(n, Kind.SEQ_SCALAR) for n in names[0]),
        *(Operand(n, Kind.CHUNK_ROW) for n in names[1]),
    )
    return inputs, [*columns, *rows]


def phase1(rule, cfg, xs, sd) -> tuple:
    """Phase 1 as a kernel parallel over chunks (:func:`~fwjax.ops.pallas.chunk_math.wy_chunk`):
    the rule's operands (``rule.phase1``'s, flattened to ``[B, H, N·C, .]``) from kernel-layout
    inputs ``(q, k, v, β[, log α])``. The gates enter as columns ``[C, 1]`` and rows ``[1, C]``
    (two views of the same values); the gated rule's cumulative ``log α`` is a cumsum in XLA.
    With ``PallasBackend.MOSAIC_GPU``, where it fits, the Mosaic GPU kernel instead
    (:func:`_mosaic_gpu_phase1`)."""
    if _mosaic_gpu_fits(cfg, "wy_supported"):
        return _mosaic_gpu_phase1(rule, cfg, xs)
    q, k, v, beta, *gate = (x.astype(sd) for x in xs)
    c = cfg.tiling.chunk
    inputs, gate_values = _phase1_inputs(beta, gate)
    # Written in the dtype the kernels read them in (the matmul dtype; the decay in sd), so
    # no separate cast pass follows.
    outputs = tuple(
        Operand(n, kind, rule.operand_dtype(n, cfg.matmul_dtype, sd)) for n, kind in rule.operands
    )

    def terms(x):
        gated = {"g_col": x["g_col"], "g_row": x["g_row"]} if gate else {}
        values = cm.wy_chunk(x["q"], x["k"], x["v"], x["beta_col"], x["beta_row"], sd, **gated)
        if not gate:
            values = (x["q"].astype(sd), x["k"].astype(sd), *values)  # (Q, K, W, U, P)
        return dict(zip((op.name for op in outputs), values, strict=True))

    spec = ChunkMap(f"{rule.name}_wy", inputs, outputs, terms)
    flat_inputs = (flat(q), flat(k), flat(v), *gate_values)
    results = run_chunk_map(spec, *flat_inputs, cfg=cfg)
    return tuple(unflat_operand(x, op.kind, c) for x, op in zip(results, outputs, strict=True))


def phase1_backward(rule, cfg, xs, grads, sd) -> tuple:
    """Phase 1's VJP as a kernel parallel over chunks
    (:func:`~fwjax.ops.pallas.chunk_math.wy_chunk_backward`, ``T`` recomputed in the kernel):
    the cotangents of the kernel-layout inputs ``xs = (q, k, v, β[, log α])`` from those of
    the rule's operands ``grads`` (``rule.operands``' order and kernel layout). The gated
    rule's gate cotangent, of the cumulative ``log α``, goes through the cumsum's VJP (a
    reversed cumsum within each chunk) in XLA. With ``PallasBackend.MOSAIC_GPU``, where it
    fits, the Mosaic GPU kernel instead (:func:`_mosaic_gpu_phase1_backward`)."""
    if _mosaic_gpu_fits(cfg, "wy_backward_supported"):
        dq, dk, dv, *d_gates = _mosaic_gpu_phase1_backward(rule, cfg, xs, grads)
    else:
        dq, dk, dv, *d_gates = _phase1_backward_kernel(rule, cfg, xs, grads, sd)
    if len(d_gates) == 2:  # g = cumsum(log α) within the chunk: ∂L/∂log α_t = Σ_{s ≥ t} ∂L/∂g_s
        d_gates[1] = jnp.flip(jnp.cumsum(jnp.flip(d_gates[1], -1), axis=-1), -1)
    dxs = (dq, dk, dv, *d_gates)
    return tuple(d.astype(x.dtype) for d, x in zip(dxs, xs, strict=True))


def _phase1_backward_kernel(rule, cfg, xs, grads, sd) -> tuple:
    """:func:`phase1_backward` by the backend's ChunkMap (Triton, Mosaic TPU): ``(q̄, k̄, v̄,
    β̄[, ḡ])`` in kernel layout, ``ḡ`` the cotangent of the cumulative ``log α``."""
    q, k, v, beta, *gate = xs
    c = cfg.tiling.chunk
    inputs, gate_values = _phase1_inputs(beta.astype(sd), [x.astype(sd) for x in gate])
    cotangents = tuple((f"d{n}", kind) for n, kind in rule.operands)  # dq, dk, dw, du, dp[, ...]
    inputs = (*inputs, *(Operand(n, kind) for n, kind in cotangents))
    out_kinds = (Kind.SEQ_KEY, Kind.SEQ_KEY, Kind.SEQ_VALUE, Kind.SEQ_SCALAR, Kind.SEQ_SCALAR)
    outputs = tuple(
        Operand(n, kind, sd)
        for n, kind in zip(("q", "k", "v", "beta", "g"), out_kinds, strict=True)
    )[: 4 + len(gate)]

    def fn(x):
        gated = {"g_col": x["g_col"], "g_row": x["g_row"], "d_decay": x["ddecay"]} if gate else {}
        d_terms = (x[n] for n in ("dq", "dk", "dw", "du", "dp"))
        values = cm.wy_chunk_backward(
            x["q"], x["k"], x["v"], x["beta_col"], x["beta_row"], *d_terms, sd, **gated
        )
        return dict(zip((op.name for op in outputs), values, strict=True))

    flat_grads = (flat_operand(g, kind) for g, (_, kind) in zip(grads, cotangents, strict=True))
    spec = ChunkMap(f"{rule.name}_wy_bwd", inputs, outputs, fn)
    flat_inputs = (flat(q), flat(k), flat(v), *gate_values, *flat_grads)
    dq, dk, dv, *d_gates = run_chunk_map(spec, *flat_inputs, cfg=cfg)
    per_chunk = lambda d: d.reshape(beta.shape)  # [B, H, N·C, 1] → [B, H, N, C]
    return (unflat(dq, c), unflat(dk, c), unflat(dv, c), *(per_chunk(d) for d in d_gates))


def forward(rule, cfg, xs, s0):
    """Phased forward of ``rule`` on kernel-layout inputs ``xs`` (``[B, H, N, C, .]``) and the
    padded initial state ``s0 [B, H, K, V]``.

    Returns:
      ``(O [B, H, N, C, V]`` in the matmul dtype, ``S_final`` in the state dtype, the state
      entering each chunk ``[B, H, N, K, V]`` in the matmul dtype).
    """
    md, sd = cfg.matmul_dtype, s0.dtype
    ops, kinds, decay = _operands(rule, cfg, phase1(rule, cfg, xs, sd), sd)

    if cfg.chain is PallasChain.AFFINE:
        # M = Γ_C I − Kᵀ W and B = Kᵀ U for every chunk at once, then S ← M S + B.
        maps_in = ("k", "w", "u", *decay)
        maps = ChunkMap(
            f"{rule.name}_affine",
            inputs=tuple(Operand(n, kinds[n]) for n in maps_in),
            outputs=(Operand("m", Kind.MAPS, md), Operand("b", Kind.STATES, sd)),
            fn=lambda x: dict(zip("mb", _chain_maps(x, decay, md, sd), strict=True)),
        )
        if cfg.backend is PallasBackend.MOSAIC_GPU:
            m, b = _mosaic_gpu_affine_maps(rule, cfg, ops, decay, "affine", u=ops["u"])
        else:
            m, b = run_chunk_map(maps, *(ops[n] for n in maps_in), cfg=cfg)
        chain_in = {"m": (Kind.MAPS, m), "b": (Kind.STATES, b)}

        def chain_step(x, s):
            return cm.chain_affine(x["m"], x["b"], s, md, sd), {"states": s}

    else:
        chain_in = {n: (kinds[n], ops[n]) for n in ("k", "w", "u", *decay)}

        def chain_step(x, s):
            d = x["decay"] if decay else None
            return cm.chain_forward(x["k"], x["w"], x["u"], s, md, sd, d), {"states": s}

    native = None
    if cfg.backend is PallasBackend.MOSAIC_GPU:
        affine = cfg.chain is PallasChain.AFFINE
        native = NativeChain(_mosaic_gpu_affine_chain if affine else _mosaic_gpu_chain, False)
    name = f"{rule.name}_chain_fwd"
    s, states = _chain(name, chain_in, chain_step, s0, "states", cfg, native=native)

    out_in = ("q", "w", "u", "p")
    if cfg.backend is PallasBackend.MOSAIC_GPU:
        from fwjax.ops.pallas import mosaic_gpu_chunks

        args = _mosaic_gpu_args(cfg, f"{rule.name}_out")
        o = mosaic_gpu_chunks.delta_chunk_output(*(ops[n] for n in out_in), states, **args)
        return unflat(o, cfg.tiling.chunk), s, states
    output = ChunkMap(
        f"{rule.name}_out",
        inputs=(*(Operand(n, kinds[n]) for n in out_in), Operand("states", Kind.STATES)),
        outputs=(Operand("o", Kind.SEQ_VALUE, md),),
        fn=lambda x: {"o": cm.chunk_output(*(x[n] for n in out_in), x["states"], md, sd)},
    )
    (o,) = run_chunk_map(output, *(ops[n] for n in out_in), states, cfg=cfg)
    return unflat(o, cfg.tiling.chunk), s, states


def backward(rule, cfg, xs, states, d_o, d_s):
    """Phased VJP from the residuals of :func:`forward` (``xs``, ``states``) and the
    cotangents ``d_o [B, H, N, C, V]``, ``d_s [B, H, K, V]``; returns ``(dxs, dS⁰)``."""
    md, sd, c = cfg.matmul_dtype, d_s.dtype, cfg.tiling.chunk
    # Phase 1 recomputed, and its VJP, as kernels parallel over chunks.
    terms = phase1(rule, cfg, xs, sd)
    phase1_vjp = lambda grads: phase1_backward(rule, cfg, xs, grads, sd)
    ops, kinds, decay = _operands(rule, cfg, terms, sd)
    do = flat(d_o).astype(md)

    if cfg.chain is PallasChain.AFFINE:
        # M (as in the forward) and H = Qᵀ Ō − Wᵀ Pᵀ Ō for every chunk, then G ← Mᵀ G + H.
        terms_in = ("q", "k", "w", "p", *decay)

        def affine_terms(x):
            d = x["decay"] if decay else None
            m = cm.chain_map(x["k"], x["w"], md, sd, d)
            h = cm.cotangent_inputs(x["q"], x["w"], x["p"], x["do"], md, sd)
            return {"m": m, "h": h}

        maps = ChunkMap(
            f"{rule.name}_affine_bwd",
            inputs=(*(Operand(n, kinds[n]) for n in terms_in), Operand("do", Kind.SEQ_VALUE)),
            outputs=(Operand("m", Kind.MAPS, md), Operand("h", Kind.STATES, sd)),
            fn=affine_terms,
        )
        if cfg.backend is PallasBackend.MOSAIC_GPU:
            args = {"q": ops["q"], "p": ops["p"], "do": do}
            m, h = _mosaic_gpu_affine_maps(rule, cfg, ops, decay, "affine_bwd", **args)
        else:
            m, h = run_chunk_map(maps, *(ops[n] for n in terms_in), do, cfg=cfg)
        chain_in = {"m": (Kind.MAPS, m), "h": (Kind.STATES, h)}

        def chain_step(x, g):
            return cm.chain_affine_backward(x["m"], x["h"], g, md, sd), {"gs": g}

    else:
        chain_in = {n: (kinds[n], ops[n]) for n in ("q", "k", "w", "p", *decay)}
        chain_in["do"] = (Kind.SEQ_VALUE, do)

        def chain_step(x, g):
            d = x["decay"] if decay else None
            g_new = cm.chain_backward(x["q"], x["k"], x["w"], x["p"], x["do"], g, md, sd, d)
            return g_new, {"gs": g}  # gs[n]: ∂L/∂S after chunk n

    native = None
    if cfg.backend is PallasBackend.MOSAIC_GPU:
        affine = cfg.chain is PallasChain.AFFINE
        run = _mosaic_gpu_affine_chain if affine else _mosaic_gpu_cotangent_chain
        native = NativeChain(run, reverse=True)
    name = f"{rule.name}_chain_bwd"
    d_s0, gs = _chain(name, chain_in, chain_step, d_s, "gs", cfg, reverse=True, native=native)

    names = ("q", "k", "w", "u", "p", *decay)
    if _mosaic_gpu_fits(cfg, "gradients_supported"):
        grads = _mosaic_gpu_gradients(rule, cfg, ops, states, gs, do, bool(decay))
        grads = (unflat_operand(g, kinds[n], c) for g, n in zip(grads, names, strict=True))
        return phase1_vjp(tuple(grads)), d_s0

    def gradients(x):
        d = x["decay"] if decay else None
        grads = cm.chunk_gradients(
            *(x[n] for n in names[:5]), x["states"], x["do"], x["gs"], md, sd, d
        )
        return {f"d{n}": g for n, g in zip(names, grads, strict=True)}

    grads_map = ChunkMap(
        f"{rule.name}_grads",
        inputs=(
            *(Operand(n, kinds[n]) for n in names),
            Operand("states", Kind.STATES),
            Operand("gs", Kind.STATES),
            Operand("do", Kind.SEQ_VALUE),
        ),
        outputs=tuple(Operand(f"d{n}", kinds[n], sd) for n in names),
        fn=gradients,
    )
    grads = run_chunk_map(grads_map, *(ops[n] for n in names), states, gs, do, cfg=cfg)
    grads = (unflat_operand(g, kinds[n], c) for g, n in zip(grads, names, strict=True))
    return phase1_vjp(tuple(grads)), d_s0
