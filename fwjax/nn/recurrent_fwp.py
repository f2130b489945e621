"""Recurrent fast weight programmer layers (Irie, Schlag, Csordás, Schmidhuber, 2021): the
Recurrent Delta Net, whose slow network also reads its own previous output
(:func:`fwjax.ops.recurrent_delta.recurrent_delta_rule`)."""

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
