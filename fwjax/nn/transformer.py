"""Transformer blocks and the language model, with fast weight, softmax or hybrid layers."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fwjax.nn.attention import FastWeightAttention, SoftmaxAttention, _dense, logical
from fwjax.nn.config import AttentionKind, ModelConfig, NormPosition


class FeedForward(nnx.Module):
    """``W₂ dropout(relu(W₁ x + b₁)) + b₂`` (the Transformer-XL feed-forward of the paper)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float, *, dtype, rngs: nnx.Rngs):
        init_in = logical(nnx.initializers.lecun_normal(), ("embed", "mlp"))
        init_out = logical(nnx.initializers.lecun_normal(), ("mlp", "embed"))
        self.up = nnx.Linear(d_model, d_ff, dtype=dtype, kernel_init=init_in, rngs=rngs)
        self.down = nnx.Linear(d_ff, d_model, dtype=dtype, kernel_init=init_out, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x):
        return self.down(self.dropout(jax.nn.relu(self.up(x))))


class TransformerBlock(nnx.Module):
    """Attention and feed-forward sublayers with residuals; post-LN (the paper) or pre-LN."""

    def __init__(self, kind: AttentionKind, config: ModelConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.dtype)
        self.norm_position = config.norm_position
        if kind is AttentionKind.FAST_WEIGHT:
            self.attention = FastWeightAttention(
                config.fast_weight, config.d_model, config.num_heads, dtype=dtype, rngs=rngs
            )
        else:
            self.attention = SoftmaxAttention(
                config.d_model, config.num_heads, config.max_len, dtype=dtype, rngs=rngs
            )
        self.ff = FeedForward(config.d_model, config.d_ff, config.dropout, dtype=dtype, rngs=rngs)
        self.norm1 = nnx.LayerNorm(config.d_model, dtype=dtype, rngs=rngs)
        self.norm2 = nnx.LayerNorm(config.d_model, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs)

    def init_state(self, batch_size: int):
        return self.attention.init_state(batch_size)

    def __call__(self, x, state=None):
        if self.norm_position is NormPosition.PRE:
            y, state = self.attention(self.norm1(x), state)
            x = x + self.dropout(y)
            x = x + self.dropout(self.ff(self.norm2(x)))
        else:
            y, state = self.attention(x, state)
            x = self.norm1(x + self.dropout(y))
            x = self.norm2(x + self.dropout(self.ff(x)))
        return x, state


class LMState(NamedTuple):
    """State of a :class:`TransformerLM`: one state per layer and the next position index."""

    layers: tuple[Any, ...]
    position: jax.Array  # int32 scalar


def sinusoidal_positions(positions: jax.Array, d_model: int) -> jax.Array:
    """Sinusoidal encodings ``[..., d_model]`` of integer ``positions`` (Vaswani et al., 2017)."""
    inv = 1.0 / (10000 ** (np.arange(0, d_model, 2) / d_model))
    angles = positions[..., None].astype(jnp.float32) * inv
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class TransformerLM(nnx.Module):
    """Decoder-only language model: ``tokens [B, T] -> logits [B, T, vocab]`` (float32).

    Each layer's attention kind comes from ``config.layer_kinds`` (fast weight, softmax, or a mix).
    ``__call__(tokens, state)`` continues from a carried :class:`LMState` (from ``init_state`` or a
    previous call); without one, the sequence starts from empty memories and the returned state
    carries the fast weights (softmax layers keep no cache unless started from ``init_state``).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = jnp.dtype(config.dtype)
        embed_init = logical(nnx.initializers.normal(1.0), ("vocab", "embed"))
        self.embed = nnx.Embed(
            config.vocab_size, config.d_model, dtype=dtype, embedding_init=embed_init, rngs=rngs
        )
        self.blocks = nnx.List(
            [TransformerBlock(kind, config, rngs=rngs) for kind in config.layer_kinds]
        )
        pre = config.norm_position is NormPosition.PRE
        self.final_norm = nnx.data(
            nnx.LayerNorm(config.d_model, dtype=dtype, rngs=rngs) if pre else None
        )
        self.head = nnx.data(
            None
            if config.tie_embeddings
            else _dense(
                config.d_model, config.vocab_size, ("embed", "vocab"), dtype=dtype, rngs=rngs
            )
        )
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs)

    def init_state(self, batch_size: int) -> LMState:
        return LMState(
            tuple(block.init_state(batch_size) for block in self.blocks), jnp.zeros((), jnp.int32)
        )

    def __call__(self, tokens, state: LMState | None = None):
        t = tokens.shape[1]
        start = jnp.zeros((), jnp.int32) if state is None else state.position
        x = self.embed(tokens) * np.sqrt(self.config.d_model)
        if self.config.positional:
            x = x + sinusoidal_positions(start + jnp.arange(t), self.config.d_model).astype(x.dtype)
        x = self.dropout(x)
        layer_states = []
        for i, block in enumerate(self.blocks):
            x, s = block(x, None if state is None else state.layers[i])
            layer_states.append(s)
        if self.final_norm is not None:
            x = self.final_norm(x)
        logits = self.embed.attend(x) if self.head is None else self.head(x)
        return logits.astype(jnp.float32), LMState(tuple(layer_states), start + t)


def sample_logits(key, logits, temperature: float = 1.0, top_k: int | None = None):
    """Samples token ids from ``logits [B, V]``; temperature 0 is greedy, top_k keeps k best."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)


def generate(
    model: TransformerLM, prompt, max_new_tokens: int, *, key, temperature=1.0, top_k=None
):
    """Autoregressive sampling: ``prompt [B, P] -> [B, P + max_new_tokens]``.

    The prompt is processed in parallel from ``init_state``; each new token is one jitted step
    that carries the state (O(1) memory per step for fast weight layers, a KV cache for softmax
    layers, which bounds ``P + max_new_tokens`` by ``config.max_len``).
    """
    model.eval()
    graphdef, params = nnx.split(model)

    @jax.jit
    def run(params, prompt, key):
        m = nnx.merge(graphdef, params)
        logits, state = m(prompt, m.init_state(prompt.shape[0]))

        def step(carry, key):
            last_logits, state = carry
            token = sample_logits(key, last_logits, temperature, top_k)
            logits, state = m(token[:, None], state)
            return (logits[:, -1], state), token

        carry = (logits[:, -1], state)
        _, tokens = jax.lax.scan(step, carry, jax.random.split(key, max_new_tokens))
        return jnp.concatenate([prompt, tokens.T.astype(prompt.dtype)], axis=1)

    return run(params, prompt, key)


def redraw_favor_projections(model: nnx.Module, key: jax.Array) -> None:
    """Redraws every FAVOR+ projection in ``model`` (the PER_STEP policy calls this each step)."""
    layers = [m for _, m in nnx.iter_graph(model) if isinstance(m, FastWeightAttention)]
    for layer, k in zip(layers, jax.random.split(key, max(len(layers), 1)), strict=False):
        layer.redraw_projection(k)
