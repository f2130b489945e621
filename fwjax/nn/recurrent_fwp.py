"""Recurrent and self-referential fast weight programmer layers: the Recurrent Delta Net (Irie,
Schlag, Csordás, Schmidhuber, 2021), whose slow network also reads its own previous output
(:func:`fwjax.ops.recurrent_delta.recurrent_delta_rule`), the Delta RNN and Delta LSTM of the
same paper, whose outputs feed back through recurrent fast weights
(:mod:`fwjax.ops.delta_rnn`), and the modern self-referential weight matrix (Irie et al., 2022;
:func:`fwjax.ops.srwm.srwm`)."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from fwjax.nn.attention import _dense
from fwjax.nn.config import FastWeightConfig
from fwjax.nn.partitioning import EMBED, HEADS
from fwjax.ops import Impl, delta_rule, feature_maps
from fwjax.ops.delta_rnn import GATES, DeltaLSTMState, DeltaRNNState, delta_lstm, delta_rnn
from fwjax.ops.recurrent_delta import (
    RecurrentDeltaState,
    RecurrentWeights,
    recurrent_delta_rule,
)
from fwjax.ops.srwm import SRWMState, srwm


class _RecurrentMixer(nnx.Module):
    """What the layers of this module share: the head layout of the mixer interface of
    :class:`~fwjax.nn.TransformerBlock` (``config, d_model, num_heads``), the bias-free output
    projection of the heads, and no packed rows (their recurrences carry no document resets)."""

    def __init__(self, config: FastWeightConfig, d_model: int, num_heads: int, dtype):
        if d_model % num_heads:
            raise ValueError(f"{num_heads=} must divide {d_model=}")
        self.config = config
        self.num_heads, self.head_dim, self.dtype = num_heads, d_model // num_heads, dtype

    def _out_projection(self, d_model: int, param_dtype, out_scale: float, rngs: nnx.Rngs):
        """``[.., H·d_head] -> [.., d_model]``, no bias; ``out_scale`` multiplies the init std."""
        dtypes = dict(dtype=self.dtype, param_dtype=param_dtype)
        return _dense(d_model, d_model, (HEADS, EMBED), **dtypes, rngs=rngs, scale=out_scale)

    def _check_unpacked(self, segment_ids) -> None:
        if segment_ids is not None:
            raise ValueError(
                f"packed rows (segment_ids) are not supported by {type(self).__name__}"
            )


class RecurrentDeltaLayerState(NamedTuple):
    """State of a :class:`RecurrentDeltaAttention` layer: the op's
    :class:`~fwjax.ops.recurrent_delta.RecurrentDeltaState` (fast weights and previous output)."""

    memory: RecurrentDeltaState


class RecurrentDeltaAttention(_RecurrentMixer):
    """The Recurrent Delta Net layer (the official ``CudaFastWeightRecUpdateTanhLayer``).

    One bias-free projection gives the feed-forward parts ``q^x, k^x, v^x`` and a write-strength
    logit ``b^x`` per head; the recurrent weights ``R_q, R_k, R_v [H, d_head, d_head]`` and
    ``r_b [H, d_head]`` (initialised N(0, 1/d_head), as the official code) feed back
    ``tanh`` of the previous output; the memory is read with scale ``1/√d_head`` and heads are
    projected back without bias. ``config.impl`` picks REFERENCE or RECURRENT (AUTO: RECURRENT);
    the other :class:`FastWeightConfig` fields do not apply (the feature map is the op's
    softmax).

    Shapes: ``x: [B, T, d_model] -> y: [B, T, d_model]``.
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
        super().__init__(config, d_model, num_heads, dtype)
        dtypes = dict(dtype=dtype, param_dtype=param_dtype)
        self.qkvb = _dense(d_model, 3 * d_model + num_heads, (EMBED, HEADS), **dtypes, rngs=rngs)
        self.out = self._out_projection(d_model, param_dtype, out_scale, rngs)
        init = nnx.initializers.normal(1.0 / math.sqrt(self.head_dim))
        h, dh = num_heads, self.head_dim
        self.r_q, self.r_k, self.r_v = (
            nnx.Param(init(rngs.params(), (h, dh, dh), param_dtype)) for _ in range(3)
        )
        self.r_b = nnx.Param(init(rngs.params(), (h, dh), param_dtype))

    def init_state(self, batch_size: int) -> RecurrentDeltaLayerState:
        h, dh = self.num_heads, self.head_dim
        return RecurrentDeltaLayerState(
            RecurrentDeltaState(
                jnp.zeros((batch_size, h, dh, dh), jnp.float32),
                jnp.zeros((batch_size, h, dh), jnp.float32),
            )
        )

    def __call__(self, x, state: RecurrentDeltaLayerState | None = None, *, segment_ids=None):
        """``x [B, T, d_model] -> (y, RecurrentDeltaLayerState)``."""
        self._check_unpacked(segment_ids)
        b, t, _ = x.shape
        h, dh = self.num_heads, self.head_dim
        proj = self.qkvb(x)
        qx, kx, vx = (
            proj[..., i * h * dh : (i + 1) * h * dh].reshape(b, t, h, dh) for i in range(3)
        )
        bx = proj[..., 3 * h * dh :]
        weights = RecurrentWeights(self.r_q[...], self.r_k[...], self.r_v[...], self.r_b[...])
        y, memory = recurrent_delta_rule(
            qx,
            kx,
            vx,
            bx,
            weights,
            None if state is None else state.memory,
            scale=1.0 / math.sqrt(dh),
            impl=self.config.impl,
        )
        return self.out(y.astype(self.dtype).reshape(b, t, h * dh)), RecurrentDeltaLayerState(
            memory
        )


class SRWMLayerState(NamedTuple):
    """State of an :class:`SRWMAttention` layer: how far the self-referential matrix has moved
    from the layer's slow weights (an :class:`~fwjax.ops.srwm.SRWMState` of differences; zeros
    at the start), as the official code carries it."""

    change: SRWMState


class SRWMAttention(_RecurrentMixer):
    """The modern self-referential weight matrix layer (the official ``SRWMlayer``).

    The input is split into heads and fed to each head's self-referential matrix
    (:func:`fwjax.ops.srwm.srwm`), whose slow initial values ``W_y, W_q, W_k [H, d_head, d_head]``
    (N(0, 1/d_head)) and ``w_b [H, d_head, 4]`` (N(``beta_init``, 1/d_head)) are the trainable
    parameters; heads are projected back without bias. ``config.impl`` picks REFERENCE or
    RECURRENT (AUTO: RECURRENT); the other :class:`FastWeightConfig` fields do not apply.

    Shapes: ``x: [B, T, d_model] -> y: [B, T, d_model]``.
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
        beta_init: float = -1.0,
        rngs: nnx.Rngs,
    ):
        super().__init__(config, d_model, num_heads, dtype)
        h, dh = num_heads, self.head_dim
        std = 1.0 / math.sqrt(dh)
        init = nnx.initializers.normal(std)
        self.w_y, self.w_q, self.w_k = (
            nnx.Param(init(rngs.params(), (h, dh, dh), param_dtype)) for _ in range(3)
        )
        self.w_b = nnx.Param(init(rngs.params(), (h, dh, 4), param_dtype) + beta_init)
        self.out = self._out_projection(d_model, param_dtype, out_scale, rngs)

    def _slow(self) -> SRWMState:
        return SRWMState(self.w_y[...], self.w_q[...], self.w_k[...], self.w_b[...])

    def init_state(self, batch_size: int) -> SRWMLayerState:
        return SRWMLayerState(
            SRWMState(*(jnp.zeros((batch_size, *p.shape), jnp.float32) for p in self._slow()))
        )

    def __call__(self, x, state: SRWMLayerState | None = None, *, segment_ids=None):
        """``x [B, T, d_model] -> (y, SRWMLayerState)``."""
        self._check_unpacked(segment_ids)
        b, t, _ = x.shape
        h, dh = self.num_heads, self.head_dim
        slow = SRWMState(*(jnp.broadcast_to(p, (b, *p.shape)) for p in self._slow()))
        start = (
            slow
            if state is None
            else SRWMState(*(a + c for a, c in zip(slow, state.change, strict=True)))
        )
        y, final = srwm(x.reshape(b, t, h, dh), start, impl=self.config.impl)
        change = SRWMState(*(f - a for f, a in zip(final, slow, strict=True)))
        return self.out(y.astype(self.dtype).reshape(b, t, h * dh)), SRWMLayerState(change)


class DeltaRNNLayerState(NamedTuple):
    """State of a :class:`DeltaRNNAttention` / :class:`DeltaLSTMAttention` layer: the
    feed-forward fast weights ``[B, G·H, D, D]`` (G = 1 for the Delta RNN, 3 for the Delta LSTM)
    and the recurrent part's :class:`~fwjax.ops.delta_rnn.DeltaRNNState` or
    :class:`~fwjax.ops.delta_rnn.DeltaLSTMState`."""

    feed_forward: jax.Array
    recurrent: DeltaRNNState | DeltaLSTMState


class DeltaRNNAttention(_RecurrentMixer):
    """The Delta RNN layer (the official ``CudaFastRNNv2Layer``; Irie et al., 2021).

    One bias-free projection gives, per head and gate, the feed-forward query, key, value and
    write strength and the recurrent key, value and write strength. The feed-forward part is a
    Delta Net (:func:`fwjax.ops.delta_rule`, ELU+1 features with sum normalisation, as the
    official layer) giving ``z_t``; the recurrent part (:func:`fwjax.ops.delta_rnn.delta_rnn`,
    softmax recurrent keys) gives ``h_t = z_t + R_tᵀ softmax(h_{t-1})``, read with scale
    ``1/√d_head`` and projected back without bias.

    ``config.impl`` runs the feed-forward Delta Net (any Impl, ``config.chunk_size`` and
    ``config.pallas`` apply); the recurrent part runs REFERENCE when ``config.impl`` is
    REFERENCE and RECURRENT otherwise (it has no chunkwise form). The other
    :class:`FastWeightConfig` fields do not apply.

    Shapes: ``x: [B, T, d_model] -> y: [B, T, d_model]``.
    """

    gates = 1

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
        super().__init__(config, d_model, num_heads, dtype)
        dtypes = dict(dtype=dtype, param_dtype=param_dtype)
        # Per gate: q, k, v, recurrent k, recurrent v ([D] each) and two write strengths.
        width = self.gates * num_heads * (5 * self.head_dim + 2)
        self.proj = _dense(d_model, width, (EMBED, HEADS), **dtypes, rngs=rngs)
        self.out = self._out_projection(d_model, param_dtype, out_scale, rngs)

    def init_state(self, batch_size: int) -> DeltaRNNLayerState:
        b, g, h, d = batch_size, self.gates, self.num_heads, self.head_dim
        zeros = lambda *shape: jnp.zeros(shape, jnp.float32)
        if g == 1:
            recurrent = DeltaRNNState(zeros(b, h, d, d), zeros(b, h, d))
        else:
            recurrent = DeltaLSTMState(zeros(b, g, h, d, d), zeros(b, h, d), zeros(b, h, d))
        return DeltaRNNLayerState(zeros(b, g * h, d, d), recurrent)

    def __call__(self, x, state: DeltaRNNLayerState | None = None, *, segment_ids=None):
        """``x [B, T, d_model] -> (y, DeltaRNNLayerState)``."""
        self._check_unpacked(segment_ids)
        b, t, _ = x.shape
        g, h, d = self.gates, self.num_heads, self.head_dim
        proj = self.proj(x)
        vectors = proj[..., : 5 * g * h * d].reshape(b, t, 5, g, h, d)
        betas = jax.nn.sigmoid(proj[..., 5 * g * h * d :].reshape(b, t, 2, g, h))
        # Feed-forward fast weights: one Delta Net per gate and head (G·H heads).
        heads = lambda x: x.reshape(b, t, g * h, *x.shape[4:])
        phi = lambda x: feature_maps.sum_norm(feature_maps.elu_p1(x))
        impl = Impl(self.config.impl)
        z, feed_forward = delta_rule(
            heads(phi(vectors[:, :, 0])),
            heads(phi(vectors[:, :, 1])),
            heads(vectors[:, :, 2]),
            heads(betas[:, :, 0]),
            None if state is None else state.feed_forward,
            scale=1.0,
            impl=impl,
            chunk_size=self.config.chunk_size,
            pallas=self.config.pallas,
        )
        z = z.reshape(b, t, g, h, d)
        # Recurrent fast weights, fed back the previous output.
        rec_impl = Impl.REFERENCE if impl is Impl.REFERENCE else Impl.RECURRENT
        # The recurrent keys' softmax in float32, the precision the recurrent op computes in.
        rec_k = jax.nn.softmax(vectors[:, :, 3].astype(jnp.float32), axis=-1)
        rec = (z, rec_k, vectors[:, :, 4], betas[:, :, 1])
        previous = None if state is None else state.recurrent
        if g == 1:
            y, recurrent = delta_rnn(*(x[:, :, 0] for x in rec), previous, impl=rec_impl)
        else:
            y, recurrent = delta_lstm(*rec, previous, impl=rec_impl)
        y = (y / math.sqrt(d)).astype(self.dtype).reshape(b, t, h * d)
        return self.out(y), DeltaRNNLayerState(feed_forward, recurrent)


class DeltaLSTMAttention(DeltaRNNAttention):
    """The Delta LSTM layer (the official ``CudaFastLSTMv4Layer``; Irie et al., 2021): the
    :class:`DeltaRNNAttention` layout with three gates (input gate, update term, output gate),
    each with its own feed-forward Delta Net and recurrent fast weights, combined by
    :func:`fwjax.ops.delta_rnn.delta_lstm` (coupled input/forget gate). Shapes as
    :class:`DeltaRNNAttention`."""

    gates = GATES
