"""Transformer blocks and the language model, with fast weight, softmax or hybrid layers."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fwjax.nn.attention import (
    BaseConv,
    FastWeightAttention,
    SoftmaxAttention,
    _dense,
    lecun_normal,
)
from fwjax.nn.config import (
    Activation,
    AttentionKind,
    ModelConfig,
    NormPosition,
    Positional,
    Remat,
)
from fwjax.nn.partitioning import EMBED, LAYERS, MLP, VOCAB, logical
from fwjax.nn.recurrent_fwp import (
    DeltaLSTMAttention,
    DeltaRNNAttention,
    RecurrentDeltaAttention,
    SRWMAttention,
)
from fwjax.nn.remat import (
    BLOCK_POLICIES,
    rematerialised,
    update_written,
    variable_leaves,
    written_variables,
)
from fwjax.ops import segments

_ACTIVATIONS = {Activation.RELU: jax.nn.relu, Activation.GELU: jax.nn.gelu}


class FeedForward(nnx.Module):
    """``W₂ dropout(act(W₁ x + b₁)) + b₂`` with ``act`` ReLU (Transformer-XL, the paper) or GELU
    (GPT-2). LeCun-normal weights; ``out_scale`` multiplies the std of ``W₂``. Computed in
    ``dtype``, parameters stored in ``param_dtype``."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        dropout: float,
        *,
        dtype,
        param_dtype=jnp.float32,
        activation: Activation = Activation.RELU,
        out_scale: float = 1.0,
        rngs: nnx.Rngs,
    ):
        dtypes = dict(dtype=dtype, param_dtype=param_dtype)
        init_in = logical(lecun_normal(), (EMBED, MLP))
        init_out = logical(lecun_normal(out_scale), (MLP, EMBED))
        self.up = nnx.Linear(d_model, d_ff, **dtypes, kernel_init=init_in, rngs=rngs)
        self.down = nnx.Linear(d_ff, d_model, **dtypes, kernel_init=init_out, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.activation = Activation(activation)

    def __call__(self, x):
        return self.down(self.dropout(_ACTIVATIONS[self.activation](self.up(x))))


_FAST_WEIGHT_MIXERS = {
    AttentionKind.FAST_WEIGHT: FastWeightAttention,
    AttentionKind.RECURRENT_DELTA: RecurrentDeltaAttention,
    AttentionKind.SRWM: SRWMAttention,
    AttentionKind.DELTA_RNN: DeltaRNNAttention,
    AttentionKind.DELTA_LSTM: DeltaLSTMAttention,
}


class TransformerBlock(nnx.Module):
    """Attention and feed-forward sublayers with residuals; post-LN (the paper) or pre-LN."""

    def __init__(self, kind: AttentionKind, config: ModelConfig, *, rngs: nnx.Rngs):
        dtypes = dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype))
        self.norm_position = config.norm_position
        self.remat = config.remat
        # GPT-2: projections into the residual stream start 1/√(2L) smaller.
        out_scale = (2 * config.num_layers) ** -0.5 if config.scale_residual_init else 1.0
        if kind is AttentionKind.BASE_CONV:
            self.attention = BaseConv(config.d_model, **dtypes, rngs=rngs)
        elif kind in _FAST_WEIGHT_MIXERS:  # the mixers configured by ``config.fast_weight``
            self.attention = _FAST_WEIGHT_MIXERS[kind](
                config.fast_weight,
                config.d_model,
                config.num_heads,
                **dtypes,
                out_scale=out_scale,
                rngs=rngs,
            )
        else:
            self.attention = SoftmaxAttention(
                config.d_model,
                config.num_heads,
                config.max_len,
                **dtypes,
                rotary=config.positional is Positional.ROTARY,
                out_scale=out_scale,
                rngs=rngs,
            )
        self.ff = nnx.data(
            FeedForward(
                config.d_model,
                config.d_ff,
                config.dropout,
                **dtypes,
                activation=config.activation,
                out_scale=out_scale,
                rngs=rngs,
            )
            if config.d_ff
            else None
        )
        self.norm1 = nnx.LayerNorm(config.d_model, **dtypes, rngs=rngs)
        self.norm2 = nnx.LayerNorm(config.d_model, **dtypes, rngs=rngs)
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs)

    def init_state(self, batch_size: int):
        return self.attention.init_state(batch_size)

    def __call__(self, x, state=None, segment_ids=None):
        """``x [B, T, d_model] -> (x', state')``, rematerialised per ``config.remat``;
        ``segment_ids``: packed rows (integer ``[B, T]`` document ids) for the attention."""
        if self.remat is Remat.NONE:
            return self._forward(x, state, segment_ids)
        if self.remat is Remat.FAST_WEIGHT and isinstance(self.attention, FastWeightAttention):
            return self._forward(x, state, segment_ids, around_op=True)
        forward = rematerialised(type(self)._forward, BLOCK_POLICIES[self.remat])
        return forward(self, x, state, segment_ids)

    def _forward(self, x, state, segment_ids=None, around_op: bool = False):
        """The block; ``around_op``: everything but the fast weight op is rematerialised."""
        kwargs = {"segment_ids": segment_ids}
        if around_op:
            kwargs["remat"] = True
        attention = functools.partial(self.attention, **kwargs)
        ff = type(self)._feed_forward
        ff = rematerialised(ff) if around_op else ff
        if self.norm_position is NormPosition.PRE:
            y, state = attention(self.norm1(x), state)
            x = x + self.dropout(y)
            return ff(self, x), state
        y, state = attention(x, state)
        return ff(self, self.norm1(x + self.dropout(y))), state

    def _feed_forward(self, x):
        """The feed-forward sublayer with its residual (and, post-LN, its normalisation);
        nothing when the model has no feed-forward (``d_ff = 0``)."""
        if self.ff is None:
            return x
        if self.norm_position is NormPosition.PRE:
            return x + self.dropout(self.ff(self.norm2(x)))
        return self.norm2(x + self.dropout(self.ff(x)))


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

    The input is ``embed(tokens) · (√d_model if embed_scale) + positions`` (LEARNED: a table of
    ``max_len`` rows; SINUSOIDAL: fixed encodings; ROTARY / NONE: nothing added here). Positions
    count from the carried ``state.position``.

    Packed rows (``segment_ids``, integer ``[B, T]`` document ids): every layer keeps its
    documents apart (memories emptied, softmax masked, :mod:`fwjax.ops.segments`) and absolute
    positions restart at each document start, so a packed row computes what its documents
    compute alone. The row's first document continues the carried state and its positions
    continue ``state.position`` (one counter for the batch: carried packed rows are meant for
    models without absolute positions, as ``carry_state`` training requires).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtypes = dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype))
        std = config.embed_init_std
        embed_init = logical(nnx.initializers.normal(std), (VOCAB, EMBED))
        self.embed = nnx.Embed(
            config.vocab_size, config.d_model, **dtypes, embedding_init=embed_init, rngs=rngs
        )
        self.position_embed = nnx.data(
            nnx.Embed(
                config.max_len,
                config.d_model,
                **dtypes,
                embedding_init=logical(nnx.initializers.normal(std), (None, EMBED)),
                rngs=rngs,
            )
            if config.positional is Positional.LEARNED
            else None
        )
        if config.scan_layers:
            self.blocks = _stacked_blocks(config, rngs)
        else:
            self.blocks = nnx.List(
                [TransformerBlock(kind, config, rngs=rngs) for kind in config.layer_kinds]
            )
        pre = config.norm_position is NormPosition.PRE
        self.final_norm = nnx.data(
            nnx.LayerNorm(config.d_model, **dtypes, rngs=rngs) if pre else None
        )
        self.head = nnx.data(
            None
            if config.tie_embeddings
            else _dense(config.d_model, config.vocab_size, (EMBED, VOCAB), **dtypes, rngs=rngs)
        )
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs)

    def init_state(self, batch_size: int) -> LMState:
        if self.config.scan_layers:  # one stacked module: every layer starts alike
            layers = (self.blocks.init_state(batch_size),) * self.config.num_layers
        else:
            layers = tuple(block.init_state(batch_size) for block in self.blocks)
        return LMState(layers, jnp.zeros((), jnp.int32))

    def __call__(self, tokens, state: LMState | None = None, segment_ids=None):
        t = tokens.shape[1]
        start = jnp.zeros((), jnp.int32) if state is None else state.position
        x = self.embed(tokens)
        if self.config.embed_scale:
            x = x * np.sqrt(self.config.d_model)
        positions = start + jnp.arange(t)
        if segment_ids is not None:
            starts = segments.document_starts(segment_ids, tokens.shape)
            first = segments.start_index(starts)
            # [B, T]: the first document continues from ``start``, later ones count from 0.
            positions = jnp.where(first == 0, positions, positions - first - start)
        if self.config.positional is Positional.SINUSOIDAL:
            x = x + sinusoidal_positions(positions, self.config.d_model).astype(x.dtype)
        elif self.config.positional is Positional.LEARNED:
            x = x + self.position_embed(positions)  # out-of-range positions give NaN
        x = self.dropout(x)
        layers = None if state is None else state.layers
        if self.config.scan_layers:
            n = self.config.num_layers
            x, layer_states = _scan_blocks(self.blocks, x, layers, n, segment_ids)
        else:
            layer_states = []
            for i, block in enumerate(self.blocks):
                x, s = block(x, None if layers is None else layers[i], segment_ids)
                layer_states.append(s)
        if self.final_norm is not None:
            x = self.final_norm(x)
        logits = self.embed.attend(x) if self.head is None else self.head(x)
        return logits.astype(jnp.float32), LMState(tuple(layer_states), start + t)


def _stacked_blocks(config: ModelConfig, rngs: nnx.Rngs) -> TransformerBlock:
    """``num_layers`` blocks as ONE module whose variables carry a leading layer axis
    (``nnx.vmap`` over split RNG streams; the layer axis is named ``layers``, never split)."""
    kind = config.layer_kinds[0]

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS})
    def make(rngs):
        return TransformerBlock(kind, config, rngs=rngs)

    return make(rngs)


def stack_block_states(blocks) -> dict:
    """The states of a sequence of blocks (modules or their ``nnx.State`` s) as one pure dict
    of arrays stacked along a new leading layer axis: the values of ``scan_layers`` blocks.

    To turn an unrolled model's layers (RNG streams included) into a scanned model's::

        state = nnx.state(scanned)
        pure = nnx.to_pure_dict(nnx.state(unrolled))
        pure["blocks"] = stack_block_states(unrolled.blocks)
        nnx.replace_by_pure_dict(state, pure)
        nnx.update(scanned, state)
    """
    pure = [nnx.to_pure_dict(b if isinstance(b, nnx.State) else nnx.state(b)) for b in blocks]
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *pure)


def _scan_blocks(blocks: TransformerBlock, x, states, num_layers: int, segment_ids=None):
    """``x`` through stacked ``blocks`` as one ``lax.scan`` over the layer axis, so the block is
    traced and compiled once whatever the depth.

    The scan body rebuilds layer ``i``'s block from slice ``i`` of the stacked variables
    (``nnx.merge``) and runs it; the variables the blocks wrote (dropout's RNG counters) are
    written back stacked. Being a plain ``lax.scan`` over arrays, it runs inside any other JAX
    transform (e.g. the decoding loop of :func:`generate`).

    Args:
      blocks: the stacked blocks (:func:`_stacked_blocks`).
      x: ``[B, T, d_model]``.
      states: one carried state per layer, or None.
      num_layers: the layers stacked in ``blocks``.
      segment_ids: packed rows (integer ``[B, T]``), or None.

    Returns:
      ``(x', per-layer states as a tuple)``.
    """
    graphdef, state = nnx.split(blocks)
    stacked = None if states is None else jax.tree.map(lambda *s: jnp.stack(s), *states)
    written = []

    def body(x, layer):
        block_state, carried = layer
        before = variable_leaves(block_state)
        block = nnx.merge(graphdef, block_state)
        x, new_carried = block(x, carried, segment_ids)
        new_state = nnx.state(block)
        written[:] = written_variables(before, new_state)
        return x, (new_state, new_carried)

    x, (new_state, new) = jax.lax.scan(body, x, (state, stacked))
    update_written(blocks, new_state, written)
    return x, tuple(jax.tree.map(lambda s, i=i: s[i], new) for i in range(num_layers))


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

    When the whole sequence fits the model's positions (always for fast weight models without
    LEARNED positions; ``P + max_new_tokens ≤ config.max_len`` for softmax layers, whose KV
    cache holds ``max_len`` positions, and for LEARNED positions), the prompt is processed in
    parallel from ``init_state`` and each new token is one step that carries the state (O(1)
    memory per step for fast weight layers). Otherwise the context is cropped as in nanoGPT:
    each new token is predicted from the last ``max_len`` tokens, recomputed from scratch with
    positions counted from the window's start.

    Sampling runs in evaluation mode (no dropout) on a copy of ``model``: the model itself keeps
    its mode. The sampler is compiled once per model structure, prompt shape, ``max_new_tokens``,
    ``temperature`` and ``top_k``, and reused by later calls (new parameters or keys do not
    recompile; on flax 0.12.0 another model instance of the same structure compiles once more).

    Raises:
      ValueError: ``max_new_tokens < 0`` or an empty prompt.
    """
    config = model.config
    p = prompt.shape[1]
    if max_new_tokens < 0:
        raise ValueError(f"{max_new_tokens=} must be >= 0")
    if p < 1:
        raise ValueError(f"the prompt has {p} tokens; need at least 1")
    bounded = config.positional is Positional.LEARNED or AttentionKind.SOFTMAX in config.layer_kinds
    window = config.max_len if bounded and p + max_new_tokens > config.max_len else None
    # model.eval() on a copy of the module graph (sharing the arrays): the caller's modules keep
    # their `deterministic` flags.
    view = nnx.merge(*nnx.split(model))
    view.eval()
    graphdef, state = nnx.split(view)
    return _sample(
        graphdef,
        state,
        jnp.asarray(prompt),
        key,
        max_new_tokens=int(max_new_tokens),
        window=window,
        temperature=float(temperature),
        top_k=None if top_k is None else int(top_k),
    )


@functools.partial(
    jax.jit, static_argnames=("graphdef", "max_new_tokens", "window", "temperature", "top_k")
)
def _sample(graphdef, state, prompt, key, *, max_new_tokens, window, temperature, top_k):
    """The compiled body of :func:`generate` (``window`` None: carried state; else cropped)."""
    m = nnx.merge(graphdef, state)
    b, p = prompt.shape
    keys = jax.random.split(key, max_new_tokens)
    if window is None:
        logits, lm_state = m(prompt, m.init_state(b))

        def step(carry, key):
            last_logits, lm_state = carry
            token = sample_logits(key, last_logits, temperature, top_k)
            logits, lm_state = m(token[:, None], lm_state)
            return (logits[:, -1], lm_state), token

        _, tokens = jax.lax.scan(step, (logits[:, -1], lm_state), keys)
        return jnp.concatenate([prompt, tokens.T.astype(prompt.dtype)], axis=1)

    buffer = jnp.zeros((b, p + max_new_tokens), prompt.dtype).at[:, :p].set(prompt)

    def cropped_step(buffer, xs):
        length, key = xs  # tokens so far; predict position `length`
        begin = jnp.maximum(length - window, 0)
        context = jax.lax.dynamic_slice_in_dim(buffer, begin, window, axis=1)
        logits, _ = m(context)  # causal: positions after `length` cannot leak in
        last = jax.lax.dynamic_index_in_dim(logits, length - begin - 1, 1, keepdims=False)
        token = sample_logits(key, last, temperature, top_k).astype(buffer.dtype)
        return jax.lax.dynamic_update_slice_in_dim(buffer, token[:, None], length, 1), None

    buffer, _ = jax.lax.scan(cropped_step, buffer, (p + jnp.arange(max_new_tokens), keys))
    return buffer


def redraw_favor_projections(model: nnx.Module, key: jax.Array) -> None:
    """Redraws every FAVOR+ projection in ``model`` (the PER_STEP policy calls this each step)."""
    layers = [m for _, m in nnx.iter_graph(model) if isinstance(m, FastWeightAttention)]
    for layer, k in zip(layers, jax.random.split(key, max(len(layers), 1)), strict=False):
        layer.redraw_projection(k)
