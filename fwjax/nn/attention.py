"""Attention layers as Flax NNX modules: fast weight attention and the softmax baseline.

Both follow one state API (recurrentgemma's ``init_cache``): ``init_state(batch_size)`` returns an
empty state, and ``__call__(x, state=None) -> (y, state)``. Decoding one token at a time with the
carried state reproduces the parallel forward pass.
"""

from __future__ import annotations

import contextvars
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from fwjax import diagnostics
from fwjax.nn.config import FastWeightConfig
from fwjax.nn.partitioning import EMBED, HEADS, logical
from fwjax.nn.remat import rematerialised
from fwjax.ops import (
    FastWeightState,
    UpdateRule,
    fast_weight_attention,
    feature_maps,
    init_fast_weight_state,
    memory_keys,
    segments,
    softmax_attention,
)


class FavorProjection(nnx.Variable):
    """FAVOR+'s random projection ``[d_head, m]``: a non-trainable variable (never in ``Param``)."""


def lecun_normal(scale: float = 1.0):
    """LeCun-normal initialisation (truncated normal, variance 1/fan_in) with its std times
    ``scale``; ``scale=1`` is ``nnx.initializers.lecun_normal()`` exactly."""
    return nnx.initializers.variance_scaling(scale**2, "fan_in", "truncated_normal")


def _dense(d_in, d_out, axes, *, dtype, param_dtype, rngs, scale: float = 1.0):
    """A bias-free projection with LeCun-normal weights, their std multiplied by ``scale``."""
    init = logical(lecun_normal(scale), axes)
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=init,
        rngs=rngs,
    )


class FastWeightLayerState(NamedTuple):
    """State of a :class:`FastWeightAttention` layer.

    Attributes:
      memory: the fast weights (and ``z`` under attention normalisation), float32.
      conv: the last ``conv_size − 1`` projected inputs of the short convolution, or None.
    """

    memory: FastWeightState
    conv: jax.Array | None = None


class FastWeightAttention(nnx.Module):
    """Multi-head fast weight attention (Schlag, Irie, Schmidhuber, 2021).

    One bias-free projection gives ``q, k, v`` and (for the delta rule) one write strength per
    head, ``β = σ(w_β·x)`` (and for the gated delta rule a decay gate ``α = σ(w_α·x + b_α)``);
    φ and the normalisation are applied per head; the memory is read with scale ``1/√d_head``;
    heads are concatenated and projected back without bias. Optional (:class:`FastWeightConfig`):
    a short causal convolution with SiLU on q, k, v, a per-head output RMSNorm, and an output
    gate ``SiLU(W_g x)`` after it (the options of fla's DeltaNet, :mod:`fwjax.interop.fla`).

    Shapes: ``x: [B, T, d_model] -> y: [B, T, d_model]``. Computed in ``dtype``; parameters
    are stored in ``param_dtype``; the memory and the FAVOR+ projection are float32.
    """

    def __init__(
        self,
        config: FastWeightConfig,
        d_model: int,
        num_heads: int,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        out_scale: float = 1.0,
        rngs: nnx.Rngs,
    ):
        if d_model % num_heads:
            raise ValueError(f"{num_heads=} must divide {d_model=}")
        self.config = config
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.dtype = dtype
        # Per head: one write-strength logit (delta rules) and one decay-gate logit (gated).
        self.num_gates = {UpdateRule.SUM: 0, UpdateRule.DELTA: 1, UpdateRule.GATED_DELTA: 2}[
            config.update_rule
        ]
        # DeltaProduct: N keys, values and write strengths per head and token.
        n = config.householder_steps
        if n > 1:
            self.num_gates = n
        self.qkv_width = (1 + 2 * n) * d_model
        width = self.qkv_width + self.num_gates * num_heads
        dtypes = dict(dtype=dtype, param_dtype=param_dtype)
        self.qkvb = _dense(d_model, width, (EMBED, HEADS), **dtypes, rngs=rngs)
        self.out = _dense(d_model, d_model, (HEADS, EMBED), **dtypes, rngs=rngs, scale=out_scale)
        fm = config.feature_map
        # Optional submodules/variables are wrapped in nnx.data so that None stays a data slot.
        self.projection = nnx.data(
            FavorProjection(
                feature_maps.draw_favor_projection(rngs.params(), self.head_dim, fm.num_features)
            )
            if fm.needs_projection
            else None
        )
        conv_init = nnx.initializers.normal(1.0 / math.sqrt(config.conv_size))
        self.conv = nnx.data(
            nnx.Param(conv_init(rngs.params(), (config.conv_size, self.qkv_width), param_dtype))
            if config.short_conv
            else None
        )
        # α = σ(w_α·x + b_α), b_α initialised to 3 (α ≈ 0.95: a slowly decaying memory).
        self.gate_bias = nnx.data(
            nnx.Param(jnp.full((num_heads,), 3.0, param_dtype))
            if config.update_rule is UpdateRule.GATED_DELTA
            else None
        )
        self.norm = nnx.data(
            nnx.RMSNorm(self.head_dim, epsilon=config.norm_eps, **dtypes, rngs=rngs)
            if config.output_norm
            else None
        )
        # The output gate SiLU(W_g x) (fla DeltaNet's use_gate).
        self.out_gate = nnx.data(
            _dense(d_model, d_model, (EMBED, HEADS), **dtypes, rngs=rngs)
            if config.output_gate
            else None
        )

    @property
    def key_dim(self) -> int:
        """Rows ``K`` of each head's fast weight matrix (the feature map's output dimension)."""
        return self.config.feature_map.output_dim(self.head_dim)

    def init_state(self, batch_size: int) -> FastWeightLayerState:
        memory = init_fast_weight_state(
            batch_size, self.num_heads, self.key_dim, self.head_dim, self.config.normalization
        )
        conv = None
        if self.conv is not None:
            width = self.conv[...].shape[-1]
            conv = jnp.zeros((batch_size, self.config.conv_size - 1, width), self.dtype)
        return FastWeightLayerState(memory, conv)

    def _record_diagnostics(self, k, v, beta, alpha, projection, state) -> None:
        """Sows per-head memory diagnostics (``nnx.Intermediate``, name ``memory``); collect
        them with ``nnx.capture(model, nnx.Intermediate)``."""
        stats = _diagnostics_of(self, k, v, beta, alpha, projection, state)
        self.sow(nnx.Intermediate, "memory", jax.lax.stop_gradient(stats))

    def redraw_projection(self, key: jax.Array) -> None:
        """Draws a new FAVOR+ projection (no-op for other feature maps)."""
        if self.projection is not None:
            d, m = self.projection[...].shape
            self.projection[...] = feature_maps.draw_favor_projection(key, d, m)

    def __call__(
        self,
        x,
        state: FastWeightLayerState | None = None,
        *,
        segment_ids=None,
        remat: bool = False,
    ):
        """``x [B, T, d_model] -> (y [B, T, d_model], FastWeightLayerState)``.

        ``segment_ids``: packed rows, integer ``[B, T]`` document ids: the memory, ``z`` and
        the short convolution's window restart at each document start
        (:mod:`fwjax.ops.segments`); the first document continues ``state``.
        ``remat``: recompute the projections before and after the fast weight op in the
        backward pass (:func:`~fwjax.nn.remat.rematerialised`); the op itself keeps its
        residuals (``Remat.FAST_WEIGHT``).
        """
        prepare, finish = type(self)._prepare, type(self)._finish
        if remat:
            prepare, finish = rematerialised(prepare), rematerialised(finish)
        conv_cache = None if state is None else state.conv
        q, k, v, beta, alpha, conv_state = prepare(self, x, conv_cache, segment_ids)
        projection = None if self.projection is None else self.projection[...]
        cfg = self.config
        y, memory = fast_weight_attention(
            q,
            k,
            v,
            beta,
            feature_map=cfg.feature_map,
            normalization=cfg.normalization,
            update_rule=cfg.update_rule,
            projection=projection,
            scale=1.0 / math.sqrt(self.head_dim),
            state=None if state is None else state.memory,
            impl=cfg.impl,
            chunk_size=cfg.chunk_size,
            alpha=alpha,
            pallas=cfg.pallas,
            segment_ids=segment_ids,
            state_segments=cfg.state_segments,
        )
        if cfg.diagnostics and _capturing(self):
            if segment_ids is not None:
                raise ValueError("memory diagnostics of packed rows (segment_ids) are not built")
            self._record_diagnostics(k, v, beta, alpha, projection, state)
        return finish(self, x, y), FastWeightLayerState(memory, conv_state)

    def _prepare(self, x, conv_cache, segment_ids=None):
        """The op's inputs: ``q, k, v [B, T, H, D]``, ``β, α [B, T, H]`` (or None) and the short
        convolution's new cache."""
        b, t, _ = x.shape
        h, dh, cfg = self.num_heads, self.head_dim, self.config
        proj = self.qkvb(x)
        qkv, b_logits = proj[..., : self.qkv_width], proj[..., self.qkv_width :]
        conv_state = None
        if self.conv is not None:
            qkv, conv_state = causal_depthwise_conv(
                qkv, self.conv[...].astype(qkv.dtype), conv_cache, segment_ids
            )
            qkv = jax.nn.silu(qkv)
        n = cfg.householder_steps
        q, k, v = jnp.split(qkv, [h * dh, (1 + n) * h * dh], axis=-1)
        q = q.reshape(b, t, h, dh)
        # One key and value per head, or N of them (DeltaProduct): [B, T, (N,) H, D].
        k, v = (z.reshape(b, t, h, dh) if n == 1 else z.reshape(b, t, n, h, dh) for z in (k, v))
        if cfg.silu_l2_qk:
            q, k = (feature_maps.l2_norm(jax.nn.silu(z)) for z in (q, k))
        beta = alpha = None
        if self.num_gates:
            logits = b_logits.astype(jnp.float32).reshape(b, t, self.num_gates, h)
            beta = cfg.beta_range * jax.nn.sigmoid(logits[:, :, 0])
            if n > 1:  # DeltaProduct: one write strength per step, [B, T, N, H]
                beta = cfg.beta_range * jax.nn.sigmoid(logits)
            if self.gate_bias is not None:
                alpha = jax.nn.sigmoid(logits[:, :, 1] + self.gate_bias[...])
        return q, k, v, beta, alpha, conv_state

    def _finish(self, x, y):
        """The layer's output from the op's ``y [B, T, H, D]`` (and the input ``x``, for the
        output gate)."""
        b, t, h, dh = y.shape
        if self.norm is not None:
            y = self.norm(y)
        if self.out_gate is not None:
            y = y * jax.nn.silu(self.out_gate(x)).reshape(b, t, h, dh)
        return self.out(y.astype(self.dtype).reshape(b, t, h * dh))


# Flax before 0.12.6 has no ``nnx.capture``: the training step then sets this flag around the
# loss and collects the sown values with ``nnx.pop``.
SOWING_WITHOUT_CAPTURE = contextvars.ContextVar("fwjax_sowing_without_capture", default=False)


def _capturing(module: nnx.Module) -> bool:
    """Whether sown values are being collected: inside ``nnx.capture`` (flax ≥ 0.12.6; sowing
    outside it is deprecated from 0.12.8), or, on older flax, inside the training step's loss
    (sowing elsewhere, e.g. under ``jit`` in ``generate``, would mutate a module of another
    trace)."""
    return hasattr(module, "__captures__") or SOWING_WITHOUT_CAPTURE.get()


def _diagnostics_of(layer: FastWeightAttention, k, v, beta, alpha, projection, state):
    cfg = layer.config
    fk = memory_keys(k, cfg.feature_map, cfg.normalization, projection)
    memory = None if state is None else state.memory
    trace, final = diagnostics.memory_trace(
        fk,
        v,
        beta,
        alpha,
        None if memory is None else memory.fast_weights,
        attention_normalized=cfg.normalization.uses_normalizer,
        initial_normalizer=None if memory is None else memory.normalizer,
    )
    return diagnostics.summarize(trace, final, beta)


def causal_depthwise_conv(x, kernel, cache=None, segment_ids=None):
    """Causal depthwise convolution over time: ``y_t = Σ_j kernel[j] · x_{t − (J−1) + j}``.

    Args:
      x: ``[B, T, C]``.
      kernel: ``[J, C]`` (the last row multiplies the current step).
      cache: the previous ``J − 1`` inputs ``[B, J − 1, C]``, or None for zeros.
      segment_ids: packed rows, integer ``[B, T]``: a step sees only the steps of its own
        document (the cache belongs to the row's first document); None: one sequence per row.

    Returns:
      ``(y [B, T, C], new_cache [B, J − 1, C])``: the last ``J − 1`` inputs of the row's last
      document (zeros before its start), which a carried row continues.
    """
    j = kernel.shape[0]
    b, t, c = x.shape
    if cache is None:
        cache = jnp.zeros((b, j - 1, c), x.dtype)
    xp = jnp.concatenate([cache.astype(x.dtype), x], axis=1)  # [B, J − 1 + T, C]
    new_cache = xp[:, xp.shape[1] - (j - 1) :]
    taps = [xp[:, i : i + t] for i in range(j)]  # tap i holds x_{t − (J−1−i)}
    if segment_ids is not None:
        segments.document_starts(segment_ids, (b, t))  # validates shape and dtype
        segment_ids = jnp.asarray(segment_ids)
        # The document of every entry of xp: the cache belongs to the row's first document.
        ids = jnp.concatenate([jnp.repeat(segment_ids[:, :1], j - 1, axis=1), segment_ids], 1)
        for i in range(j - 1):
            visible = ids[:, i : i + t] == segment_ids
            taps[i] = jnp.where(visible[..., None], taps[i], 0)
        last = ids[:, ids.shape[1] - (j - 1) :] == segment_ids[:, -1:]
        new_cache = jnp.where(last[..., None], new_cache, 0)
    y = sum(kernel[i] * taps[i] for i in range(j))
    return y, new_cache


class BaseConv(nnx.Module):
    """Zoology's ``BaseConv`` mixer with a short kernel: ``y = conv(u) ⊙ (W u + b) + u``, with
    ``conv`` a causal depthwise convolution (with bias) of ``kernel_size`` taps (Arora et al.,
    2023; ``zoology/mixers/base_conv.py``). It gives the next layer each token's recent
    neighbours, which is how Zoology's recall models bind a key to the value after it.

    Shapes: ``x: [B, T, d_model] -> y``; the state is the convolution's cache (the last
    ``kernel_size − 1`` inputs) or None.
    """

    def __init__(
        self,
        d_model: int,
        kernel_size: int = 3,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        bound = 1.0 / math.sqrt(kernel_size)  # PyTorch's Conv1d init (fan-in = kernel size)
        init = nnx.initializers.uniform(2 * bound)
        self.kernel = nnx.Param(init(rngs.params(), (kernel_size, d_model), param_dtype) - bound)
        self.bias = nnx.Param(init(rngs.params(), (d_model,), param_dtype) - bound)
        self.projection = nnx.Linear(
            d_model, d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def init_state(self, batch_size: int):
        j, d = self.kernel[...].shape
        return jnp.zeros((batch_size, j - 1, d), self.dtype)

    def __call__(self, x, state=None, *, segment_ids=None):
        conv, cache = causal_depthwise_conv(x, self.kernel[...].astype(x.dtype), state, segment_ids)
        y = (conv + self.bias[...].astype(x.dtype)) * self.projection(x) + x
        return y, (None if state is None else cache)


class KVCache(NamedTuple):
    """State of a :class:`SoftmaxAttention` layer: a fixed-length key/value buffer."""

    keys: jax.Array  # [B, max_len, H, D]
    values: jax.Array  # [B, max_len, H, D]
    length: jax.Array  # int32 scalar: number of filled positions


class SoftmaxAttention(nnx.Module):
    """Causal multi-head softmax attention with the same interface as :class:`FastWeightAttention`.

    Without a state the whole sequence attends causally to itself; with a :class:`KVCache`
    (``init_state``) new keys/values are appended and queries attend to every filled position
    up to their own (memory grows with the context, unlike fast weights). With ``rotary`` the
    queries and keys are rotated by their absolute positions (:func:`rotary_embedding`; the
    cached keys are stored rotated). Computed in ``dtype``; parameters stored in ``param_dtype``.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        max_len: int = 2048,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rotary: bool = False,
        out_scale: float = 1.0,
        rngs: nnx.Rngs,
    ):
        if d_model % num_heads:
            raise ValueError(f"{num_heads=} must divide {d_model=}")
        self.num_heads, self.head_dim, self.max_len = num_heads, d_model // num_heads, max_len
        if rotary and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head dimension; got {self.head_dim}")
        self.dtype = dtype
        self.rotary = rotary
        dtypes = dict(dtype=dtype, param_dtype=param_dtype)
        self.qkv = _dense(d_model, 3 * d_model, (EMBED, HEADS), **dtypes, rngs=rngs)
        self.out = _dense(d_model, d_model, (HEADS, EMBED), **dtypes, rngs=rngs, scale=out_scale)

    def init_state(self, batch_size: int) -> KVCache:
        shape = (batch_size, self.max_len, self.num_heads, self.head_dim)
        return KVCache(
            jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype), jnp.zeros((), jnp.int32)
        )

    def __call__(self, x, state: KVCache | None = None, *, segment_ids=None):
        """``x [B, T, d_model] -> (y, KVCache or None)``; ``segment_ids``: packed rows without a
        cache, integer ``[B, T]``: a query attends only to its own document's keys."""
        b, t, _ = x.shape
        if segment_ids is not None and state is not None:
            raise ValueError("segment_ids (packed rows) with a KVCache are not supported")
        h, dh = self.num_heads, self.head_dim
        q, k, v = (z.reshape(b, t, h, dh) for z in jnp.split(self.qkv(x), 3, axis=-1))
        start = jnp.zeros((), jnp.int32) if state is None else state.length
        if self.rotary:
            positions = start + jnp.arange(t)
            q, k = rotary_embedding(q, positions), rotary_embedding(k, positions)
        if state is None:
            y = softmax_attention(q, k, v, causal=True, segment_ids=segment_ids)
            return self.out(y.reshape(b, t, h * dh)), None
        keys = jax.lax.dynamic_update_slice_in_dim(state.keys, k.astype(self.dtype), start, 1)
        values = jax.lax.dynamic_update_slice_in_dim(state.values, v.astype(self.dtype), start, 1)
        logits = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), keys.astype(jnp.float32))
        logits = logits / math.sqrt(dh)
        visible = jnp.arange(self.max_len)[None, :] <= (start + jnp.arange(t))[:, None]
        weights = jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1)
        y = jnp.einsum("bhts,bshd->bthd", weights, values.astype(jnp.float32)).astype(x.dtype)
        return self.out(y.reshape(b, t, h * dh)), KVCache(keys, values, start + t)


def rotary_embedding(x, positions, base: float = 10000.0):
    """Rotary position embedding (Su et al., 2021, "RoFormer"), half-split (GPT-NeoX) layout.

    Channel pairs ``(x_i, x_{i+D/2})`` are rotated by the angle ``p · base^{−2i/D}`` of their
    position ``p``, so the dot product of a rotated query and key depends only on their offset.

    Args:
      x: ``[B, T, H, D]`` with even ``D``.
      positions: ``[T]`` integer positions.

    Returns:
      ``[B, T, H, D]`` in ``x``'s dtype (the rotation is computed in float32).
    """
    d = x.shape[-1]
    inv = 1.0 / (base ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))  # [D/2]
    angles = positions.astype(jnp.float32)[:, None] * inv  # [T, D/2]
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
