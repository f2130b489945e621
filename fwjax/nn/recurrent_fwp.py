"""Recurrent and self-referential fast weight programmer layers: the Recurrent Delta Net (Irie,
Schlag, Csordás, Schmidhuber, 2021), whose slow network also reads its own previous output
(:func:`fwjax.ops.recurrent_delta.recurrent_delta_rule`), and the modern self-referential weight
matrix (Irie et al., 2022; :func:`fwjax.ops.srwm.srwm`)."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
from flax import nnx

from fwjax.nn.attention import _dense
from fwjax.nn.config import FastWeightConfig
from fwjax.nn.partitioning import EMBED, HEADS
from fwjax.ops.recurrent_delta import (
    RecurrentDeltaState,
    RecurrentWeights,
    recurrent_delta_rule,
)
from fwjax.ops.srwm import SRWMState, srwm


class RecurrentDeltaLayerState(NamedTuple):
    """State of a :class:`RecurrentDeltaAttention` layer: the op's
    :class:`~fwjax.ops.recurrent_delta.RecurrentDeltaState` (fast weights and previous output)."""

    memory: RecurrentDeltaState


class RecurrentDeltaAttention(nnx.Module):
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
        if d_model % num_heads:
            raise ValueError(f"{num_heads=} must divide {d_model=}")
        self.config = config
        self.num_heads, self.head_dim, self.dtype = num_heads, d_model // num_heads, dtype
        dtypes = dict(dtype=dtype, param_dtype=param_dtype)
        self.qkvb = _dense(d_model, 3 * d_model + num_heads, (EMBED, HEADS), **dtypes, rngs=rngs)
        self.out = _dense(d_model, d_model, (HEADS, EMBED), **dtypes, rngs=rngs, scale=out_scale)
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
        if segment_ids is not None:
            raise ValueError(
                "packed rows (segment_ids) are not supported by the Recurrent Delta Net"
            )
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


class SRWMAttention(nnx.Module):
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
        if d_model % num_heads:
            raise ValueError(f"{num_heads=} must divide {d_model=}")
        self.config = config
        self.num_heads, self.head_dim, self.dtype = num_heads, d_model // num_heads, dtype
        h, dh = num_heads, self.head_dim
        std = 1.0 / math.sqrt(dh)
        init = nnx.initializers.normal(std)
        self.w_y, self.w_q, self.w_k = (
            nnx.Param(init(rngs.params(), (h, dh, dh), param_dtype)) for _ in range(3)
        )
        self.w_b = nnx.Param(init(rngs.params(), (h, dh, 4), param_dtype) + beta_init)
        self.out = _dense(
            d_model,
            d_model,
            (HEADS, EMBED),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
            scale=out_scale,
        )

    def _slow(self) -> SRWMState:
        return SRWMState(self.w_y[...], self.w_q[...], self.w_k[...], self.w_b[...])

    def init_state(self, batch_size: int) -> SRWMLayerState:
        return SRWMLayerState(
            SRWMState(*(jnp.zeros((batch_size, *p.shape), jnp.float32) for p in self._slow()))
        )

    def __call__(self, x, state: SRWMLayerState | None = None, *, segment_ids=None):
        """``x [B, T, d_model] -> (y, SRWMLayerState)``."""
        if segment_ids is not None:
            raise ValueError("packed rows (segment_ids) are not supported by the SRWM layer")
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
