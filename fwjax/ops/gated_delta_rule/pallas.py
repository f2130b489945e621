"""Gated delta rule, PALLAS form: the gated chunked form
(:mod:`fwjax.ops.gated_delta_rule.chunked`) with its sequential phase 2 as a Pallas chunk-scan
kernel: the delta rule's step plus a per-chunk decay of the state.

Forward::

    per chunk, all at once (XLA), with g = cumsum(log α), Γ = exp(g), D_tj = Γ_t/Γ_j (j ≤ t):
        T = (I + tril(diag(β) K Kᵀ ⊙ D, −1))⁻¹
        W = T diag(βΓ) K,  U = T diag(β) V,  P = Q Kᵀ ⊙ D,  Q' = diag(Γ) Q,  K' = diag(Γ_C/Γ) K
    for each chunk n (kernel, state tile on chip):
        Ũ = U − W S,   O = Q' S + P Ũ,   S ← Γ_C S + K'ᵀ Ũ

Backward: the VJP of the CHUNKED form (XLA; a ``lax.scan`` over chunks with rematerialised
steps), recomputed from the inputs. ``PallasOptions.backward`` does not apply: the gated rule
has no backward kernel yet, so training speed is the CHUNKED form's backward plus this forward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fwjax.ops.gated_delta_rule.chunked import _chunk, gated_wy_terms
from fwjax.ops.pallas import (
    KernelConfig,
    flat,
    from_kernel_layout,
    kernel_config,
    run_chunk_scan,
    to_kernel_layout,
    unflat,
)
from fwjax.ops.pallas import chunk_math as cm
from fwjax.ops.pallas.scan_spec import ChunkScan, Kind, Operand


def _mT(x):
    return jnp.swapaxes(x, -1, -2)


def _gated_terms(q, k, v, beta, log_alpha):
    """Phase 1 on the kernel layout ``[B, H, N, C, .]``: ``(Q', K', W, U, P, decay)``."""
    g, decay, w, u = gated_wy_terms(k, v, beta, log_alpha)
    p = (q @ _mT(k)) * decay
    q_dec = jnp.exp(g)[..., None] * q
    k_dec = jnp.exp(g[..., -1:] - g)[..., None] * k  # Γ_C / Γ_j ≤ 1
    chunk_decay = jnp.broadcast_to(jnp.exp(g[..., -1])[..., None, None], k.shape)
    return q_dec, k_dec, w, u, p, chunk_decay


def _forward_spec(cfg: KernelConfig, sd) -> ChunkScan:
    md = cfg.matmul_dtype

    def step(x, s):
        o, s_new = cm.gated_delta_forward(
            x["q"], x["k"], x["w"], x["u"], x["p"], x["decay"], s, md, sd
        )
        return s_new, {"o": o}

    return ChunkScan(
        name="gated_delta_rule_fwd",
        inputs=(
            Operand("q", Kind.SEQ_KEY),
            Operand("k", Kind.SEQ_KEY),
            Operand("w", Kind.SEQ_KEY),
            Operand("u", Kind.SEQ_VALUE),
            Operand("p", Kind.SEQ_CHUNK),
            Operand("decay", Kind.SEQ_KEY),
            Operand("s0", Kind.STATE),
        ),
        outputs=(Operand("o", Kind.SEQ_VALUE, md), Operand("s", Kind.STATE, sd)),
        step=step,
        reverse=False,
        state_dtype=sd,
    )


def _xla_chunked(q, k, v, beta, log_alpha, s0):
    """The CHUNKED form on the kernel layout (the backward pass differentiates this)."""
    to_n = functools.partial(jnp.moveaxis, source=2, destination=0)
    s, o = jax.lax.scan(_chunk, s0, tuple(to_n(x) for x in (q, k, v, beta, log_alpha)))
    return jnp.moveaxis(o, 0, 2), s


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _gated_pallas(q, k, v, beta, log_alpha, s0, cfg):
    md, c = cfg.matmul_dtype, cfg.tiling.chunk
    terms = _gated_terms(q, k, v, beta, log_alpha)
    operands = [flat(x).astype(md) for x in terms]
    o, s = run_chunk_scan(_forward_spec(cfg, s0.dtype), *operands, s0, cfg=cfg)
    return unflat(o, c), s


def _gated_pallas_fwd(q, k, v, beta, log_alpha, s0, cfg):
    return _gated_pallas(q, k, v, beta, log_alpha, s0, cfg), (q, k, v, beta, log_alpha, s0)


def _gated_pallas_bwd(cfg, residuals, cotangents):
    d_o, d_s = cotangents
    _, pullback = jax.vjp(_xla_chunked, *residuals)
    return pullback((d_o.astype(residuals[0].dtype), d_s))


_gated_pallas.defvjp(_gated_pallas_fwd, _gated_pallas_bwd)


def gated_delta_rule_pallas(
    q, k, v, beta, alpha, initial_state, scale, chunk_size, options, out_dtype
):
    """See :func:`fwjax.ops.gated_delta_rule` (``Impl.PALLAS``). ``options``: a
    :class:`fwjax.ops.pallas.PallasOptions` or None (its ``backward`` does not apply);
    ``out_dtype``: the inputs' dtype, which the kernel's matmul operands take. Time, keys and
    values are zero-padded to the backend's tile sizes (zero keys and values, β = 0 and
    log α = 0, i.e. α = 1, are exact no-ops)."""
    b, t, h, key_dim = q.shape
    value_dim = v.shape[-1]
    sd = initial_state.dtype
    cfg = kernel_config(options, t, key_dim, value_dim, chunk_size, b * h, out_dtype, sd)
    kp, vp = cfg.tiling.key, cfg.tiling.value
    q = scale * q.astype(sd)  # o is linear in q: the scale stays differentiable
    q, k = (to_kernel_layout(x.astype(sd), cfg.tiling, kp) for x in (q, k))
    v = to_kernel_layout(v.astype(sd), cfg.tiling, vp)
    beta = to_kernel_layout(beta.astype(sd), cfg.tiling, None)
    log_alpha = to_kernel_layout(jnp.log(alpha.astype(sd)), cfg.tiling, None)  # pads log α = 0
    s0 = jnp.pad(initial_state, [(0, 0), (0, 0), (0, kp - key_dim), (0, vp - value_dim)])
    o, s = _gated_pallas(q, k, v, beta, log_alpha, s0, cfg)
    return from_kernel_layout(o, t, value_dim), s[:, :, :key_dim, :value_dim]
